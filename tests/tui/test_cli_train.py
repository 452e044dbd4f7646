"""`qlc presets` and `qlc train` at the command line. Bad input to `qlc train` (one line, exit 2, no
traceback, no run directory) is the matrix in tests/reliability/test_bad_input.py."""

from __future__ import annotations

from tests.conftest import qlc


def test_presets_lists_the_recipes() -> None:
    result = qlc("presets", "--json")
    assert result.returncode == 0
    assert "tiny-demo" in result.stdout and "gpus" not in [line.strip() for line in result.stdout.split('"')]


def test_presets_refuses_a_card_train_and_estimate_would_refuse() -> None:
    result = qlc("presets", "tiny-demo", "--set", "hardware.gpu=rtx9090")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "qlc: error: --set hardware.gpu=rtx9090: unknown GPU 'rtx9090': the catalog has no such card"
    )
