"""`qlc`: no arguments opens the console; subcommands do the same work headless, for scripts.

Exit codes: 0 ok, 1 the run failed (or, for estimate/fit, it does not fit), 2 bad usage or input,
141 stdout was closed (`qlc ... | head`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import tui.commands
from engine import __version__
from engine.errors import UserError


class _Help(argparse.HelpFormatter):
    """Every option's default in its help, where it has one worth saying and does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.option_strings and _worth_saying(action.default) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _worth_saying(default: object) -> bool:
    """A default a reader needs told: not absent, off, empty (0 is a value: 0 == False in a tuple test)."""
    return not (default is None or default is False or default is argparse.SUPPRESS or default in ("", []))


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # one line and exit 2, as for every bad input
        self.exit(2, f"qlc: error: {message} (see `{self.prog} --help`)\n")


# 128 + SIGPIPE, as a Unix tool killed by writing to a closed pipe: no other qlc status uses it.
EXIT_BROKEN_PIPE = 141

# The commands that read or write runs (the others, estimate or presets, never look there).
RUNS_COMMANDS = {"attach", "export", "join", "resume", "runs", "sample", "stop", "train"}
RUNS_DIR_HELP = "where runs live (default: the user data folder, or $QLC_RUNS_DIR)"
SET_HELP = "override one setting of the preset, e.g. --set train.lr=1e-4 (repeat for more)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlc", description="A terminal console for QLoRA fine-tuning.")
    parser.add_argument("--version", action="version", version=f"qlora-console {__version__}")
    parser.add_argument("--runs-dir", help=RUNS_DIR_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for info in sorted(pkgutil.iter_modules(tui.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"tui.commands.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, command in sub.choices.items():
        # `qlc COMMAND --help` opens with what `qlc --help` says of it.
        command.description = command.description or summaries.get(name)
        if name in RUNS_COMMANDS:
            # --runs-dir after the command too (`qlc runs --runs-dir X`); absent there, the global one.
            command.add_argument("--runs-dir", default=argparse.SUPPRESS, help=RUNS_DIR_HELP)
        for action in command._actions:
            if action.dest == "overrides" and not action.help:
                action.help = SET_HELP
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _dispatch(argv)
        finally:
            # Here rather than at exit: a closed pipe that only the last flush finds must end as
            # below too, not as "Exception ignored ... BrokenPipeError" and exit 120 after main.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`qlc estimate X | head -1`): stop quietly, as Unix tools do, with
        # 128 + SIGPIPE. Returning 0 or 1 would be read as a verdict (1: failed, does not fit).
        # What is still buffered goes to /dev/null, so the flush at exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # inside main's try: the flush after --help may meet a closed pipe
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


if __name__ == "__main__":
    sys.exit(main())
