"""Executors Conductor runs itself: ``llm`` (calls a model) and ``command`` (what `conductor worker` runs).

``handoff`` needs no code here: Conductor only publishes tasks and waits for an external executor.
"""
