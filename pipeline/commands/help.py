"""`--help` as every sub-command prints it (`HelpFormatter`), and a default as one would type it (`default_text`,
which docs/cli.md shows too: pipeline/commands/docs.py).

Its own module so that the commands can use it without the docs generator, which imports `pipeline.cli`
(and through it every command).
"""

from __future__ import annotations

import argparse


def default_text(value) -> str:
    """A default as one would type it on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(default_text(v) for v in value)
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """`--help` text: "(required)" on required options, "(default: sdedit,inpaint)" as a user types it, and
    nothing where there is no default or the help already states it (never "(default: None)")."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Paragraphs wrapped; lines that start with two spaces (examples) kept as written."""
        out = []
        for line in text.splitlines():
            out.append(indent + line if line.startswith("  ") else super()._fill_text(line, width, indent))
        return "\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.help is argparse.SUPPRESS or not action.option_strings or "default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction,
                               argparse._HelpAction)) or action.default in (None, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: {default_text(action.default).replace('%', '%%')})"
