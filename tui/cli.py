"""`qlc`: no arguments opens the console; subcommands do the same work headless, for scripts.

Exit codes: 0 ok, 1 the run failed (or, for estimate/fit, it does not fit), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import tui.commands
from engine import __version__
from engine.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as for every bad input
        self.exit(2, f"qlc: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlc", description="A terminal console for QLoRA fine-tuning.")
    parser.add_argument("--version", action="version", version=f"qlora-console {__version__}")
    parser.add_argument(
        "--runs-dir", help="where runs live (default: the user data folder, or $QLC_RUNS_DIR)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for info in sorted(pkgutil.iter_modules(tui.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"tui.commands.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            from tui.app import run_console

            return run_console(args)
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"qlc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `qlc runs | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
