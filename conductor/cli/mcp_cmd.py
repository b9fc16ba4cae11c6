"""``conductor mcp``: serve the project's tasks, plans and workspaces to an MCP client over stdio."""

from __future__ import annotations

import click

from conductor.cli.common import project_option, start_dir


@click.command("mcp")
@project_option
def mcp(project_dir) -> int:  # type: ignore[no-untyped-def]
    """Serve Conductor as an MCP server over stdio (tools: claim, complete, workspace files, planning).

    Configure it in your MCP client as the command `conductor mcp` (with `-C PROJECT` when the client does
    not start it in the project). stdout carries the protocol; messages go to stderr.
    """
    from conductor.mcp_server import serve

    serve(start_dir(project_dir))
    return 0
