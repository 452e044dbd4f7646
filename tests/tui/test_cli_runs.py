"""`qlc sample`, `qlc attach` and `qlc runs` on run directories with a history, with the fake engine
in place of `python -m engine`: what they say before, while and after an engine works."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import fake_engine
import pytest
from pilot_helpers import CRASHED_RUN, FINISHED_RUN, recorded_events

from engine import protocol
from engine.run import launcher, runs
from tui import output
from tui.cli import main
from tui.commands import runs as runs_cli

NEW_RUN = "20260103-100000-tiny-demo"


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "400")


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sampling_a_run_without_a_checkpoint_says_so_before_loading_anything(
    runs_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """It used to start an engine, load the base model and only then find no checkpoint (20-30 s)."""
    early = [e for e in fake_engine.synthetic_run(30, save_every=0, finish=False)]
    fake_engine.make_run_dir(runs_root, NEW_RUN, early)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an engine was started to find out there is no checkpoint")

    monkeypatch.setattr(launcher, "launch_sample", refuse)
    started = time.monotonic()
    code, _, err = _run(["--runs-dir", str(runs_root), "sample", NEW_RUN, "hi"], capsys)
    assert code == 2 and time.monotonic() - started < 5
    assert err.strip().count("\n") == 0, err
    # The run's engine is gone (no finished event): it will never save one, so say how to go on.
    assert (
        f"run {NEW_RUN} has no checkpoint (it crashed before its first checkpoint: start it again" in err
    ), err
    # `qlc stop` and `qlc resume` give the same way out, not each other.
    code, _, err = _run(["--runs-dir", str(runs_root), "stop", NEW_RUN], capsys)
    assert code == 2 and "crashed before its first checkpoint: start it again with `qlc train`" in err, err
    code, _, err = _run(["--runs-dir", str(runs_root), "resume", NEW_RUN], capsys)
    assert code == 2 and "start it again with `qlc train`" in err and "qlc stop" not in err, err


def test_sampling_says_what_it_loads_then_streams_the_reply(
    finished_run: Path, runs_root: Path, monkeypatch: pytest.MonkeyPatch, capsys, quiet: None
) -> None:
    monkeypatch.setattr(launcher, "launch_sample", fake_engine.launch_sample)
    code, out, err = _run(["--runs-dir", str(runs_root), "sample", FINISHED_RUN, "hi"], capsys)
    assert code == 0, err
    newest = runs.checkpoints(finished_run)[-1].name
    assert f"loading builtin:tiny-llama + {newest}" in err  # before the engine's long load
    assert fake_engine.REPLY in out and "tokens in" in out


def test_attaching_to_a_crashed_run_says_it_crashed_and_how_to_resume(
    crashed_run: Path, runs_root: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """It used to replay the history and exit 1 without a word."""
    code, out, err = _run(["--runs-dir", str(runs_root), "attach", CRASHED_RUN], capsys)
    assert code == 1
    assert "step" in out  # the history first
    (line,) = err.strip().splitlines()
    assert "the engine exited without finishing" in line
    assert str(crashed_run / runs.ENGINE_LOG) in line
    assert f"`qlc resume {CRASHED_RUN}` continues it from checkpoint-80" in line


def test_a_resumed_run_that_crashed_is_not_taken_for_its_first_session(
    runs_root: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """A stopped session, then a resumed one that died: attach says the last one crashed."""
    first = list(fake_engine.synthetic_run(40))
    first[-1] = protocol.Finished(status="stopped", step=40, last_checkpoint="checkpoints/checkpoint-40")
    again = [e for e in fake_engine.synthetic_run(80) if not isinstance(e, protocol.Finished)]
    fake_engine.make_run_dir(runs_root, NEW_RUN, first + again)
    code, _, err = _run(["--runs-dir", str(runs_root), "attach", NEW_RUN], capsys)
    assert code == 1 and "without finishing" in err


def test_a_run_that_ends_between_logged_steps_is_listed_at_its_last_step(
    runs_root: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """max_steps 5 with logging_steps 2: the run finished at step 5, not at the 4 last logged."""
    events = [e for e in fake_engine.synthetic_run(4) if not isinstance(e, protocol.Finished)]
    events += [protocol.Finished(status="completed", step=5, final_loss=2.5, adapter_path="adapter")]
    fake_engine.make_run_dir(runs_root, NEW_RUN, events)
    (summary,) = [runs.summarize(d) for d in runs.list_run_dirs(runs_root)]
    assert (summary.step, summary.last_loss) == (5, 2.5)


@pytest.mark.parametrize(("tail", "shown"), [("0", 0), ("3", 3), ("1000", None)])
def test_attach_tail_shows_that_many_step_lines(
    tail: str, shown: int | None, runs_root: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """--tail 0 used to show the whole history (steps[:-0] is empty: nothing hidden)."""
    events = list(fake_engine.synthetic_run(40))
    steps = sum(isinstance(e, protocol.Step) for e in events)
    fake_engine.make_run_dir(runs_root, NEW_RUN, events)
    code, out, _ = _run(["--runs-dir", str(runs_root), "attach", NEW_RUN, "--tail", tail], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if line.lstrip().startswith("step ")]
    assert len(lines) == (steps if shown is None else shown)
    if shown is not None:
        assert f"… {steps - shown} earlier step events" in out


def test_commands_take_the_runs_folder_after_their_name_too(
    runs_root: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    fake_engine.make_run_dir(runs_root, NEW_RUN, list(fake_engine.synthetic_run(4)))
    code, out, _ = _run(["runs", "--runs-dir", str(runs_root)], capsys)
    assert code == 0 and NEW_RUN in out
    code, _, err = _run(["attach", "last", "--runs-dir", str(runs_root / "none")], capsys)
    assert code == 2 and f"no runs under --runs-dir {runs_root / 'none'}: no such folder" in err, err


# Every command that reads runs, with what it needs besides the run.
READERS = [
    ["runs"],
    ["attach", "last"],
    ["stop", "last"],
    ["resume", "last"],
    ["sample", "last", "hi"],
    ["export", "last"],
    ["join", "last", "--node-rank", "1"],
]


@pytest.mark.parametrize("command", READERS, ids=lambda c: c[0])
@pytest.mark.parametrize("where", ["missing", "a-file"])
def test_a_runs_dir_that_is_not_a_folder_is_an_error_not_no_runs(
    command: list[str], where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """`qlc --runs-dir /proc/nope runs` said "no runs yet" and exited 0: a typo read as an empty list."""
    root = tmp_path / where
    if where == "a-file":
        root.write_text("")
    for args in (["--runs-dir", str(root), *command], [*command, "--runs-dir", str(root)]):
        code, out, err = _run(args, capsys)
        assert code == 2 and not out, (args, out)
        (line,) = err.splitlines()
        problem = "no such folder" if where == "missing" else "not a folder"
        assert line == (
            f"qlc: error: no runs under --runs-dir {root}: {problem} "
            "(give the folder your runs are in, or leave --runs-dir out for the default)"
        ), line


def test_a_run_named_under_a_missing_runs_dir_is_named_in_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """As when the folder holds no such run; and the command's own arguments are judged first."""
    root = tmp_path / "nope"
    code, _, err = _run(["--runs-dir", str(root), "stop", "no-such-run"], capsys)
    assert code == 2 and f"no run 'no-such-run' under --runs-dir {root}: no such folder" in err, err
    code, _, err = _run(["--runs-dir", str(root), "sample", "last", " "], capsys)
    assert code == 2 and "the prompt is empty" in err, err


def test_train_makes_its_runs_dir_so_a_missing_one_is_no_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    code, _, err = _run(["--runs-dir", str(tmp_path / "new"), "train", "no-such-preset"], capsys)
    assert code == 2 and "no-such-preset" in err and "--runs-dir" not in err, err


def test_a_run_given_by_its_path_needs_no_runs_dir(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    code, out, err = _run(["--runs-dir", str(tmp_path / "nope"), "attach", str(finished_run)], capsys)
    assert code == 0 and "step" in out, err


def _holding_the_lock(run_dir: Path) -> int:
    """The run's lock held as its engine holds it: `qlc runs` lists the run as running."""
    return runs.acquire_lock(run_dir)


@pytest.mark.parametrize(("data_ready", "shown"), [(True, "0/400"), (False, "0/{planned}")])
def test_a_running_run_before_its_first_logged_step_shows_the_total_it_knows(
    data_ready: bool, shown: str, runs_root: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """It showed `0` where a completed run shows `400/400`: the total was only read from step
    events, and the first comes after logging_steps steps (minutes on a large model). Still
    loading the model, before the engine's plan, the total is the config's train.max_steps."""
    from engine.config import load_resolved

    # Set up, and training started; or still loading the model, with no total to show yet.
    before = protocol.Step if data_ready else protocol.DataReady
    events = list(itertools.takewhile(lambda e: not isinstance(e, before), fake_engine.synthetic_run(400)))
    fake_engine.make_run_dir(runs_root, NEW_RUN, events)
    lock = _holding_the_lock(runs_root / NEW_RUN)
    try:
        code, out, _ = _run(["--runs-dir", str(runs_root), "runs"], capsys)
    finally:
        os.close(lock)
    assert code == 0
    (row,) = [line.split() for line in out.splitlines() if NEW_RUN in line]
    planned = load_resolved(runs_root / NEW_RUN / runs.CONFIG).train.max_steps
    assert row[1] == "running" and row[4] == shown.format(planned=planned), row


FAILED_RUN = "20260102-100000-tiny-demo"
OOM = "CUDA out of memory: tried to allocate 2.00 GiB [GPU 0; 23.99 GiB total; 21.50 GiB in use]"


def _failed_run(runs_root: Path) -> Path:
    events = [e for e in fake_engine.synthetic_run(40) if not isinstance(e, protocol.Finished)][:12]
    events += [
        protocol.ErrorEvent(
            kind="out_of_memory", message=OOM + "\nthe allocator's own report", hint="lower it"
        ),
        protocol.Finished(status="failed", step=8),
    ]
    return fake_engine.make_run_dir(runs_root, FAILED_RUN, events)


def test_a_failed_run_says_why_on_its_row(
    runs_root: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """Only `--json` had the error: the table said `failed` and no more."""
    fake_engine.make_run_dir(runs_root, NEW_RUN, list(fake_engine.synthetic_run(40)))
    failed = _failed_run(runs_root)
    code, out, _ = _run(["--runs-dir", str(runs_root), "runs"], capsys)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[-1] == "error"
    (row,) = [line for line in rows if FAILED_RUN in line]
    assert row.rstrip().endswith(OOM)  # its first line, whole through a pipe ("[GPU 0" no markup)
    assert "allocator" not in out
    (done,) = [line for line in rows if NEW_RUN in line]
    assert done.split()[1] == "completed" and "CUDA" not in done
    # --json is as it was: the summary's every field, the error whole.
    code, out, _ = _run(["--runs-dir", str(runs_root), "runs", "--json"], capsys)
    listed = {r["id"]: r for r in json.loads(out)}
    assert listed[FAILED_RUN] == json.loads(json.dumps(runs.summarize(failed).to_dict()))
    assert listed[FAILED_RUN]["error"] == OOM + "\nthe allocator's own report"


@pytest.mark.parametrize("width", [140, 120])
def test_a_failed_runs_error_is_cut_to_the_terminal_not_the_run_id(
    width: int,
    runs_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    quiet: None,
) -> None:
    _failed_run(runs_root)
    monkeypatch.setattr(output.out, "width", width)
    code, out, _ = _run(["--runs-dir", str(runs_root), "runs"], capsys)
    assert code == 0
    assert max(len(line.rstrip()) for line in out.splitlines()) <= width
    (row,) = [line.rstrip() for line in out.splitlines() if FAILED_RUN in line]
    assert row.split()[:2] == [FAILED_RUN, "failed"] and " 8/40 " in row
    cut = row.split("  ")[-1].strip()
    assert cut.endswith("…") and OOM.startswith(cut[:-1]), row


def test_a_terminal_too_narrow_for_a_useful_part_of_an_error_shows_the_table_as_before(
    runs_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    _failed_run(runs_root)
    monkeypatch.setattr(output.out, "width", 110)
    code, out, _ = _run(["--runs-dir", str(runs_root), "runs"], capsys)
    assert code == 0 and "error" not in out and "CUDA" not in out
    (row,) = [line for line in out.splitlines() if FAILED_RUN in line]
    assert row.split()[:2] == [FAILED_RUN, "failed"] and " 8/40 " in row


def _stops_sent(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The run directories a command was sent to, instead of their control FIFOs."""
    sent: list[Path] = []
    monkeypatch.setattr(runs, "send_command", lambda run_dir, command: sent.append(run_dir))
    return sent


def test_stop_last_stops_the_newest_running_run_not_a_newer_failed_one(
    runs_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """It took the newest run, which had failed, said "not running" and stopped nothing while an
    older run trained on."""
    training = fake_engine.make_run_dir(
        runs_root, "20260101-100000-tiny-demo", list(fake_engine.synthetic_run(40, finish=False))
    )
    _failed_run(runs_root)
    sent = _stops_sent(monkeypatch)
    lock = _holding_the_lock(training)
    try:
        code, out, err = _run(["--runs-dir", str(runs_root), "stop", "last", "--no-wait"], capsys)
        assert code == 0 and sent == [training] and f"stop sent to {training.name}" in out, err
        # `sample --live` too asks a running engine; it gets no reply here, so it times out.
        code, _, _ = _run(
            ["--runs-dir", str(runs_root), "sample", "last", "hi", "--live", "--timeout", "0"], capsys
        )
        assert code == 1 and sent == [training, training]
    finally:
        os.close(lock)
    # Commands on ended runs still take the newest one: resume finds the failed run.
    code, _, err = _run(["--runs-dir", str(runs_root), "resume", "last"], capsys)
    assert code == 2 and f"run {FAILED_RUN} has no checkpoint" in err, err


def test_stop_last_with_nothing_running_names_the_newest_run_and_how_it_ended(
    runs_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    fake_engine.make_run_dir(runs_root, NEW_RUN, list(fake_engine.synthetic_run(40)))
    _failed_run(runs_root)
    sent = _stops_sent(monkeypatch)
    code, out, err = _run(["--runs-dir", str(runs_root), "stop", "last"], capsys)
    assert code == 2 and not out and not sent
    (line,) = err.splitlines()
    assert f"no run is running under {runs_root}: the newest, {NEW_RUN}, completed" in line, line


def test_a_long_error_through_a_pipe_is_cut_and_pads_no_row(
    runs_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """Every row of `qlc runs` was as wide as the longest error (250 columns and more): each wrapped
    onto blank lines in `qlc runs | less`."""
    fake_engine.make_run_dir(runs_root, NEW_RUN, list(fake_engine.synthetic_run(40)))
    long_error = "RuntimeError: " + "the engine said something long " * 10
    events = [e for e in fake_engine.synthetic_run(40) if not isinstance(e, protocol.Finished)][:12]
    events += [
        protocol.ErrorEvent(kind="engine", message=long_error),
        protocol.Finished(status="failed", step=8),
    ]
    fake_engine.make_run_dir(runs_root, FAILED_RUN, events)
    monkeypatch.setattr(output.out, "width", 100_000)  # what a pipe gets (tui/output.py)
    code, out, _ = _run(["--runs-dir", str(runs_root), "runs"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert all(line == line.rstrip() for line in lines), [len(line) for line in lines]
    (row,) = [line for line in lines if FAILED_RUN in line]
    (done,) = [line for line in lines if NEW_RUN in line]
    assert len(done) < 120 and len(row) <= len(done) + 2 + runs_cli.MAX_ERROR_WIDTH
    cut = row.split("  ")[-1]
    assert cut.endswith("…") and long_error.startswith(cut[:-1]), row
    code, out, _ = _run(["--runs-dir", str(runs_root), "runs", "--json"], capsys)
    assert {r["id"]: r["error"] for r in json.loads(out)}[FAILED_RUN] == long_error


def test_a_run_whose_engine_never_wrote_is_listed(
    runs_root: Path, capsys: pytest.CaptureFixture[str], quiet: None
) -> None:
    """An engine killed before its first event leaves a "created" run: its status had no style,
    and "[]created[/]" was a MarkupError that took the whole `qlc runs` down, every time."""
    fake_engine.make_run_dir(runs_root, NEW_RUN, [])
    fake_engine.make_run_dir(runs_root, FINISHED_RUN, recorded_events())
    assert main(["--runs-dir", str(runs_root), "runs"]) == 0
    shown = capsys.readouterr().out
    assert "created" in shown and FINISHED_RUN in shown


def test_an_ambiguous_run_name_says_how_many_more_match(runs_root: Path) -> None:
    """Six runs matched and five were named, with no word of the sixth."""
    for i in range(6):
        fake_engine.make_run_dir(runs_root, f"20260101-12000{i}-tiny-demo", [])
    with pytest.raises(runs.RunNotFound, match=r"is ambiguous: .* and 1 more \(give more of the id\)"):
        runs.find_run(runs_root, "tiny-demo")


def test_a_run_not_yet_started_is_at_0_of_its_planned_steps(runs_root: Path) -> None:
    """A run just launched was listed at step 0 of 0 (`"total_steps": 0`), its config saying 400."""
    from engine.config import load_resolved

    run_dir = fake_engine.make_run_dir(runs_root, NEW_RUN, [])
    planned = load_resolved(run_dir / runs.CONFIG).train.max_steps
    assert planned and runs.summarize(run_dir).total_steps == planned
