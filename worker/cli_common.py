"""What every ``certremove`` subcommand module shares: the stderr console and one-line errors."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr (one line, markup escaped) and return the exit to
    raise."""
    err.print(f"[red]error:[/red] {escape(one_line(message))}", highlight=False)
    return typer.Exit(code)


def one_line(message: str) -> str:
    """``message`` with its line breaks folded into spaces."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())
