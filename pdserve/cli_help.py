"""One ``--help`` style for every pdserve command line: each flag's help ends with its default.

:class:`HelpFormatter` is :class:`argparse.ArgumentDefaultsHelpFormatter` with three changes:
descriptions keep their line breaks (module docstrings are used as descriptions), a ``None``
default is not shown (the help text says what leaving the flag out means), and a help text that
already states its default (``%(default)s`` or ``(default ...``) is left as written.
:func:`apply` sets it on a parser and every subcommand parser below it.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to the help of every option whose default is not None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is argparse.SUPPRESS or text is argparse.SUPPRESS:
            return action.help
        if "%(default)" in text or "(default" in text.lower():
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        if default == "":
            return f"{text} (default: empty)"
        return f"{text} (default: %(default)s)"


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The subcommand parsers directly below ``parser`` (each listed once)."""
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                if all(p is not q for q in out):
                    out.append(p)
    return out


def apply(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Use :class:`HelpFormatter` in ``parser`` and all its subcommand parsers; returns ``parser``."""
    parser.formatter_class = HelpFormatter
    for p in subparsers(parser):
        apply(p)
    return parser
