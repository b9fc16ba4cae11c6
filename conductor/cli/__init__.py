"""The command line: click commands that parse, call ``conductor.runtime``/``conductor.inspect``, and render."""
