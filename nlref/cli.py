"""The ``nlref`` command line.

Each subcommand is one module of :mod:`nlref.commands` (``nlref gradcheck``, ...), found
automatically. The exit status is 0 on success, 1 when a check fails and 2 on a usage
error (an unknown option, or a backend that cannot be imported).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

from .commands import CLIError, iter_commands, load_backend

__all__ = ["CLIError", "build_parser", "load_backend", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, with two changes for a command line of numbers:

    - a usage error is **one line** on stderr (``nlref gradcheck: error: ...``, exit 2),
      not the usage block followed by the error;
    - a value that starts with a minus and a digit is a value, not an option:
      ``--atol -1e-9``, ``--query -5,3`` (plain argparse takes only ``-1`` and ``-1.5``).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``nlref`` argument parser, one subparser per module of :mod:`nlref.commands`."""
    from . import __version__

    parser = _Parser(
        prog="nlref",
        description="Reference implementation of the Non-local block (Wang et al., CVPR 2018).",
    )
    parser.add_argument("--version", action="version", version=f"nlref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in iter_commands():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``nlref`` command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 success, 1 a failed check, 2 a usage error (also for no
        subcommand, after printing the help).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args, sys.stdout))
    except CLIError as err:
        print(f"nlref {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
