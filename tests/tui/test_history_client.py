"""Folding events into a run's history, and the client that reads them from a pipe or a file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import fake_engine
from pilot_helpers import recorded_events

from engine import protocol
from engine.run import runs
from tui import client as client_mod
from tui.client import RunClient, load_history
from tui.history import RunHistory


def test_recorded_run_folds_to_a_completed_history() -> None:
    h = RunHistory()
    h.apply_all(recorded_events())
    assert h.status == "completed"
    assert h.step == h.total_steps == 120
    assert len(h.loss) == 60 and len(h.eval_loss) == 3
    assert [Path(c.path).name for c in h.checkpoints] == ["checkpoint-40", "checkpoint-80", "checkpoint-120"]
    assert h.loss.ys[-1] < h.loss.ys[0]  # it learned
    assert any("finished: completed" in line.text for line in h.log)
    assert h.hello is not None and h.model is not None and h.data is not None


def test_checkpoints_rotated_out_leave_the_history_and_the_sample_sources() -> None:
    from tui.watched import sample_checkpoints

    def saved(step: int, kept: tuple[int, ...] | None) -> protocol.CheckpointSaved:
        return protocol.CheckpointSaved(step=step, path=f"/r/checkpoints/checkpoint-{step}", kept=kept)

    h = RunHistory()
    h.apply_all([saved(40, (40,)), saved(80, (40, 80)), saved(120, (80, 120))])
    assert [c.step for c in h.checkpoints] == [80, 120]
    assert sample_checkpoints(h) == ("checkpoint-80", "checkpoint-120")
    # An engine before protocol 1.6 does not say what it kept: every save stays listed.
    old = RunHistory()
    old.apply_all([saved(40, None), saved(80, None)])
    assert [c.step for c in old.checkpoints] == [40, 80]


def test_a_resumed_session_replaces_the_steps_after_its_checkpoint() -> None:
    first = [e for e in fake_engine.synthetic_run(80) if not isinstance(e, protocol.Finished)]
    again = [e for e in fake_engine.synthetic_run(120) if not isinstance(e, protocol.Step) or e.step > 40]
    h = RunHistory()
    h.apply_all(first + again)
    assert h.sessions == 2 and h.status == "completed"
    assert list(h.loss.xs) == [float(s) for s in range(2, 121, 2)]  # one curve, no duplicate steps


def test_read_events_leaves_a_torn_line_for_later(tmp_path: Path) -> None:
    path = tmp_path / runs.EVENTS
    line = protocol.encode(protocol.Step(step=1, loss=2.0))
    path.write_bytes(line + line[:10])
    events, offset = runs.read_events(tmp_path, 0, limit=4096)
    assert len(events) == 1 and offset == len(line)
    path.write_bytes(line + line + b'{"type":"from_the_future","x":1}\n')
    events, offset = runs.read_events(tmp_path, offset, limit=4096)
    assert len(events) == 1 and offset == path.stat().st_size  # unknown types are skipped
    # A line longer than the chunk is read whole; a stdout line that is no event can be kept.
    events, end = runs.read_events(tmp_path, 0, limit=8)
    assert len(events) == 1 and end == len(line)
    kept = protocol.decode_lines(b"Loading checkpoint shards\n" + line, keep_unreadable=True)
    assert isinstance(kept[0], protocol.Log) and kept[0].source == "stdout" and kept[1].step == 1


def test_load_history_reads_in_bounded_chunks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(client_mod, "CHUNK_BYTES", 4096)
    run_dir = fake_engine.make_run_dir(tmp_path, "r", list(fake_engine.synthetic_run(2000)))
    history, offset = load_history(run_dir)
    assert history.step == 2000 and offset == (run_dir / runs.EVENTS).stat().st_size


def _collect(client: RunClient) -> tuple[list, threading.Thread]:
    posted: list = []
    thread = threading.Thread(target=client.read_loop, args=(posted.append,), daemon=True)
    thread.start()
    return posted, thread


def test_pipe_client_reads_a_launched_engine_and_sends_commands(tmp_path: Path) -> None:
    run_dir = fake_engine.make_run_dir(tmp_path, "live")
    client = RunClient.launch(run_dir, fake_engine.launcher(steps=1000, rate=50))
    posted, thread = _collect(client)
    history = RunHistory()
    deadline = time.monotonic() + 10
    while history.step < 4 and time.monotonic() < deadline:
        history.apply_all(client.drain())
        time.sleep(0.05)
    assert history.step >= 4
    client.send(protocol.Stop())  # down the child's stdin
    thread.join(10)
    history.apply_all(client.drain())
    assert history.finished is not None and history.finished.status == "stopped"
    assert isinstance(posted[-1], RunClient.Ended) and posted[-1].returncode == 0
    # Wake-ups were batched: far fewer than the events they carried.
    wakeups = sum(isinstance(m, RunClient.EventsArrived) for m in posted)
    assert wakeups < history.events


def test_tail_client_follows_a_run_it_did_not_start(tmp_path: Path) -> None:
    run_dir = fake_engine.make_run_dir(tmp_path, "elsewhere")
    proc = fake_engine.launcher(steps=1000, rate=50)(run_dir, pipe=False)
    deadline = time.monotonic() + 10
    while not runs.is_running(run_dir) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    client = RunClient(run_dir, mode="tail")
    posted, thread = _collect(client)
    while not any(isinstance(m, RunClient.Opened) for m in posted) and time.monotonic() < deadline:
        time.sleep(0.02)
    history = next(m for m in posted if isinstance(m, RunClient.Opened)).history
    assert history.hello is not None  # the history from before we attached
    client.send(protocol.Stop())  # no pipe of ours: through the control FIFO
    thread.join(10)
    history.apply_all(client.drain())
    assert history.finished is not None and history.finished.status == "stopped"
    assert proc.wait(5) == 0


def test_a_crash_becomes_a_readable_error(tmp_path: Path) -> None:
    run_dir = fake_engine.make_run_dir(tmp_path, "oom")
    client = RunClient.launch(run_dir, fake_engine.launcher(steps=100, rate=0, fail_at=10))
    _posted, thread = _collect(client)
    thread.join(10)
    history = RunHistory()
    history.apply_all(client.drain())
    assert history.status == "failed"
    assert history.errors and history.errors[0].kind == "out_of_memory" and history.errors[0].advice


def test_training_time_adds_up_over_sessions() -> None:
    """A resumed session's clock starts at 0: the dashboard's elapsed time restarted with it."""
    first = [e for e in fake_engine.synthetic_run(80) if not isinstance(e, protocol.Finished)]
    again = [e for e in fake_engine.synthetic_run(120) if not isinstance(e, protocol.Step) or e.step > 40]
    h = RunHistory()
    h.apply_all(first)
    one = h.trained_s
    assert one == max(e.elapsed_seconds for e in first if isinstance(e, protocol.Step)) > 0
    h.apply_all(again)
    two = max(e.elapsed_seconds for e in again if isinstance(e, (protocol.Step, protocol.Finished)))
    assert h.trained_s == one + two


def test_the_log_clock_counts_from_the_engine_s_start() -> None:
    """The log's stamps counted from the hello, which comes after the imports: "model ready" read
    00:02 after 4.7 s, beside "first step logged 7 s after the engine started". They count from
    the start the hello reports (from the hello itself where it reports none)."""
    h = RunHistory()
    h.apply(protocol.Hello(run_id="r", started=1000.0, time=1001.8))
    h.apply(protocol.Log(message="model ready", time=1004.7))
    assert [round(line.elapsed, 1) for line in h.log][-1] == 4.7  # (the hello logs a line too)
    unknown = RunHistory()
    unknown.apply(protocol.Hello(run_id="r", time=1001.8))
    unknown.apply(protocol.Log(message="model ready", time=1004.7))
    assert round(unknown.log[-1].elapsed, 1) == 2.9
