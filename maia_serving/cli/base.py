"""The subcommand base every verb module fills in (vLLM's ``CLISubcommand`` is the model)."""

from __future__ import annotations

import argparse


class Subcommand:
    """One verb: ``name`` and ``help`` for the top-level listing, ``add_arguments`` for its own flags, ``run``
    returning the exit status. ``main.py`` only collects them; a user error is a ``ValueError`` or ``OSError``,
    printed as one line with exit status 2."""

    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
