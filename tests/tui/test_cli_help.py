"""`qlc COMMAND --help` as a new user reads it: what the command does, every option explained with
its default, and the options that every command shares."""

from __future__ import annotations

import argparse
import re

import pytest

from tui.cli import RUNS_COMMANDS, build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_each_command_explains_itself_and_every_option(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # an option and its help on one line, where they fit
    command = _commands()[name]
    assert command.description, f"qlc {name} --help says nothing of what it does"
    text = command.format_help()
    # The options' entries as rendered: each starts with its first flag, two spaces in.
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    for action in command._actions:
        assert action.help, f"qlc {name}: {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False, "", [], argparse.SUPPRESS):
            (entry,) = [e for e in entries if e.strip().startswith(action.option_strings[0])]
            assert "default" in entry, f"qlc {name} --help: {entry.strip()!r} does not say its default"
    assert ("--runs-dir" in text) == (name in RUNS_COMMANDS)


def test_a_default_of_zero_is_said() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    probe = sub.add_parser("probe", help="a probe")
    probe.add_argument("--count", type=int, default=0, help="how many")
    assert "how many (default: 0)" in " ".join(probe.format_help().split())
