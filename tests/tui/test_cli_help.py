"""`qlc COMMAND --help` as a new user reads it: what the command does, every option explained with
its default, and the options that every command shares."""

from __future__ import annotations

import argparse

import pytest

from tui.cli import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_each_command_explains_itself_and_every_option(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one option a line
    command = _commands()[name]
    assert command.description, f"qlc {name} --help says nothing of what it does"
    text = command.format_help()
    formatter = command._get_formatter()
    for action in command._actions:
        assert action.help, f"qlc {name}: {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False, "", [], argparse.SUPPRESS):
            assert "default" in (formatter._get_help_string(action) or ""), action.option_strings
    assert "--runs-dir" in text
