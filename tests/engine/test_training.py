"""The real engine on the tiny model: NF4 base, LoRA, 8-bit AdamW, through `qlc` and the child
process. One uninterrupted reference run; one run whose console is killed mid-training, which must
keep training, answer a live sample and `qlc stop` through its control FIFO, and, once resumed,
reach the reference's losses at every later step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine import protocol
from engine.models.tiny import DATASET
from engine.run import runs
from tests.conftest import QLC, REPO, qlc

pytestmark = pytest.mark.slow

STEPS = 24
OVERRIDES = [
    f"train.max_steps={STEPS}",
    "train.logging_steps=1",
    "train.save_steps=8",
    "train.save_total_limit=2",
    "train.eval_steps=0",
    "data.val_fraction=0",
    "train.micro_batch=4",
]
SETS = [x for o in OVERRIDES for x in ("--set", o)]


def _steps(run_dir: Path) -> dict[int, float]:
    events, _ = runs.read_events(run_dir)
    return {e.step: e.loss for e in events if isinstance(e, protocol.Step)}


def _tokens(run_dir: Path) -> dict[int, int]:
    events, _ = runs.read_events(run_dir)
    return {e.step: e.tokens_seen for e in events if isinstance(e, protocol.Step)}


def _wait(run_dir: Path, predicate, timeout: float = 180) -> protocol.Event:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in runs.read_events(run_dir)[0]:
            if predicate(ev):
                return ev
        time.sleep(0.1)
    raise AssertionError(f"timed out; engine.log:\n{(run_dir / runs.ENGINE_LOG).read_text()[-3000:]}")


def _console(runs_dir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A `qlc train` following its run in the foreground, in its own process group like a
    terminal; returns it and the run directory it created."""
    proc = subprocess.Popen(
        [*QLC, "--runs-dir", str(runs_dir), "train", "tiny-demo", *SETS, *extra],
        cwd=REPO,
        env={**os.environ, "NO_COLOR": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not runs.list_run_dirs(runs_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    (run_dir,) = runs.list_run_dirs(runs_dir)
    return proc, run_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(root: Path) -> Path:
    """An uninterrupted run, followed in the foreground."""
    result = qlc("--runs-dir", str(root), "train", "tiny-demo", *SETS)
    assert result.returncode == 0, result.stderr + result.stdout
    (run_dir,) = runs.list_run_dirs(root)
    return run_dir


def test_a_tiny_run_trains_checkpoints_and_saves_its_adapter(reference: Path) -> None:
    events, _ = runs.read_events(reference)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "Hello" and kinds[-1] == "Finished"
    hello = events[0]
    assert hello.backend == "hf" and hello.device == "cpu" and "no CUDA GPU" in hello.backend_reason
    ready = next(e for e in events if isinstance(e, protocol.ModelReady))
    assert ready.quantized and 0 < ready.trainable_params < ready.total_params
    # tiny-demo asks for auto checkpointing: with no GPU budget to spend, every layer.
    assert (ready.layers, ready.checkpointed_layers) == (4, 4)
    assert "auto on the CPU" in ready.checkpoint_reason
    losses = _steps(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = (
        sum(losses[s] for s in (1, 2, 3)) / 3,
        sum(losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3,
    )
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    saved = [e for e in events if isinstance(e, protocol.CheckpointSaved)]
    assert [e.step for e in saved] == [8, 16, 24]
    # train.save_total_limit=2: the third save rotated checkpoint-8 out, and its event says so.
    assert [e.kept for e in saved] == [(8,), (8, 16), (16, 24)]
    assert [p.name for p in runs.checkpoints(reference)] == ["checkpoint-16", "checkpoint-24"]
    assert events[-1].status == "completed"
    adapter = reference / runs.ADAPTER
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    # The base really is 4-bit NF4, and the optimizer really is bitsandbytes' 8-bit AdamW.
    log = (reference / runs.ENGINE_LOG).read_text()
    assert "Traceback" not in log
    checkpoint = runs.find_checkpoint(reference)
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
    assert oct((reference).stat().st_mode & 0o777) == "0o700"
    assert oct((reference / runs.CONTROL).stat().st_mode & 0o777) == "0o600"
    # No draft model card ("a fine-tuned version of [None]") beside or in the checkpoints, nor in
    # the adapter: `qlc export` writes the card.
    assert not list(reference.rglob("README.md")), list(reference.rglob("README.md"))


def test_the_run_reports_the_memory_answer_the_console_and_qlc_estimate_give(reference: Path) -> None:
    """On the CPU the run's estimate is the one for its hardware.gpu, planned as there: the figure
    the Memory pane and `qlc estimate` show (it printed torch's 0.10 GB against the pane's 1.4)."""
    from engine.config import load_resolved
    from tui import budget

    events, _ = runs.read_events(reference)
    estimate = next(e for e in events if isinstance(e, protocol.EstimateEvent))
    view = budget.compute(load_resolved(reference / runs.CONFIG))
    assert estimate.device_total_gb == round(view.device_total_gb, 4)
    assert estimate.checkpoint_reason == view.checkpointing and estimate.checkpoint_reason
    shown = qlc("--runs-dir", str(reference.parent), "attach", reference.name)
    line = next(x for x in shown.stdout.splitlines() if x.startswith("memory estimate"))
    assert line.startswith(
        f"memory estimate for {view.gpu} (this run is on the CPU): "
    )  # a CPU run: the card it is for
    # Where the start went, once, after the first step: the engine's own start time in hello.
    (launch,) = [x for x in shown.stdout.splitlines() if "after the engine started" in x]
    assert "start and imports" in launch and "model" in launch and "first step" in launch
    assert (
        f"{view.device_total_gb:.2f} GiB of {view.budget_gb:.2f} GiB" in line and view.checkpointing in line
    )


def test_the_last_step_is_logged_and_a_stop_interrupts_the_evaluation(tmp_path: Path) -> None:
    """max_steps 2 with logging_steps 3: the run reports step 2 and its loss (it reported none, and
    a final loss from the step before). The evaluation after the last step, over a large split,
    shows its progress and ends at `qlc stop` instead of running to its end."""
    sets = {
        "train.max_steps": 2,
        "train.logging_steps": 3,
        "train.micro_batch": 1,
        "train.eval_steps": 2,
        "train.save_steps": 100,
        "data.val_fraction": 0.9,
    }
    args = [x for key, value in sets.items() for x in ("--set", f"{key}={value}")]
    started = qlc("--runs-dir", str(tmp_path), "train", "tiny-demo", "--detach", *args)
    assert started.returncode == 0, started.stderr
    (run_dir,) = runs.list_run_dirs(tmp_path)
    progress = _wait(run_dir, lambda e: isinstance(e, protocol.StageEvent) and e.stage == "evaluating")
    assert progress.total > 100 and progress.unit == "batches" and progress.current >= 1
    asked = time.monotonic()
    stop = qlc("--runs-dir", str(tmp_path), "stop", run_dir.name)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert time.monotonic() - asked < 60
    events, _ = runs.read_events(run_dir)
    steps = [e for e in events if isinstance(e, protocol.Step)]
    finished = events[-1]
    assert [s.step for s in steps] == [2] and isinstance(finished, protocol.Finished)
    assert finished.final_loss == steps[-1].loss
    done = [e for e in events if isinstance(e, protocol.StageEvent) and e.stage == "evaluating"]
    assert done[-1].current < done[-1].total  # the evaluation did not run to its end
    assert not [e for e in events if isinstance(e, protocol.Eval)]
    # Every step was done before the stop: the run completed and saved its adapter.
    assert finished.status == "completed" and finished.step == 2 and finished.adapter_path
    # Launched detached, its stdin is /dev/null: no console let go of it ("training goes on"
    # stood before the hello of every detached launch and resume).
    assert not [e for e in events if isinstance(e, protocol.Log) and "let go" in e.message]


def test_an_evaluation_reports_all_its_batches_before_its_loss(tmp_path: Path) -> None:
    """The Trainer logs the eval loss before it calls on_evaluate: the last progress line (4 of 4
    batches) came after the loss, in qlc train's output and the dashboard's log."""
    done = qlc("--runs-dir", str(tmp_path), "train", "tiny-demo", "--set", "train.max_steps=2")
    assert done.returncode == 0, done.stderr
    (run_dir,) = runs.list_run_dirs(tmp_path)
    events, _ = runs.read_events(run_dir)
    (i,) = [i for i, e in enumerate(events) if isinstance(e, protocol.Eval)]
    last = next(e for e in reversed(events[:i]) if isinstance(e, protocol.StageEvent))
    assert last.stage == "evaluating" and last.current == last.total > 0
    assert not [e for e in events[i:] if isinstance(e, protocol.StageEvent) and e.stage == "evaluating"]
    lines = done.stdout.splitlines()
    assert lines.index(next(ln for ln in lines if ln.startswith("eval "))) > lines.index(
        next(ln for ln in lines if "(100%): eval at step 2" in ln)
    )


def _tree_digest(root: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
        if not p.is_fifo()
    }


def test_a_completed_run_is_not_resumed_and_nothing_is_touched(reference: Path, root: Path) -> None:
    before = _tree_digest(reference)
    result = qlc("--runs-dir", str(root), "resume", reference.name)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "completed: there is nothing to resume" in result.stderr
    assert "Traceback" not in result.stderr
    stopped = qlc("--runs-dir", str(root), "stop", reference.name)
    assert stopped.returncode == 2 and "it completed" in stopped.stderr and "resume" not in stopped.stderr
    assert _tree_digest(reference) == before


def test_the_run_is_listed_with_its_status(reference: Path, root: Path) -> None:
    result = qlc("--runs-dir", str(root), "runs", "--json")
    (row,) = json.loads(result.stdout)
    assert row["status"] == "completed" and row["step"] == STEPS and row["preset"] == "tiny-demo"


def test_sampling_a_checkpoint_streams_text(reference: Path, root: Path) -> None:
    result = qlc(
        "--runs-dir",
        str(root),
        "sample",
        reference.name,
        "What is 2 plus 3?",
        "--checkpoint",
        "16",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    events = [protocol.decode_event(line) for line in result.stdout.splitlines()]
    sample = events[-1]
    assert isinstance(sample, protocol.Sample) and sample.source == "checkpoint-16" and sample.step == 16
    streamed = "".join(e.text for e in events if isinstance(e, protocol.SampleToken))
    assert streamed.strip() == sample.text.strip() and sample.new_tokens > 0


def test_sampling_a_missing_checkpoint_is_one_line(reference: Path, root: Path) -> None:
    result = qlc("--runs-dir", str(root), "sample", reference.name, "hi", "--checkpoint", "7")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no checkpoint at step 7" in result.stderr


def test_a_run_outlives_its_console_stops_through_the_fifo_and_resumes_exactly(
    reference: Path, root: Path, tmp_path: Path
) -> None:
    other = tmp_path / "runs"
    console, run_dir = _console(other)
    _wait(run_dir, lambda e: isinstance(e, protocol.Step) and e.step >= 3)
    os.killpg(console.pid, signal.SIGKILL)  # the SSH session dies with its console
    console.wait()
    killed_at = max(_steps(run_dir))
    _wait(run_dir, lambda e: isinstance(e, protocol.Step) and e.step >= killed_at + 2)
    assert runs.is_running(run_dir)

    stop = qlc("--runs-dir", str(other), "stop", run_dir.name)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    events, _ = runs.read_events(run_dir)
    finished = events[-1]
    assert isinstance(finished, protocol.Finished) and finished.status == "stopped"
    stopped_at = finished.step
    assert stopped_at < STEPS, "the run finished before the stop reached it"
    assert finished.last_checkpoint and finished.last_checkpoint.endswith(f"checkpoint-{stopped_at}")
    assert not runs.is_running(run_dir)
    assert (
        qlc("--runs-dir", str(other), "stop", run_dir.name).returncode == 2
    )  # not running: one line, exit 2

    resumed = qlc("--runs-dir", str(other), "resume", run_dir.name)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    events, _ = runs.read_events(run_dir)
    hellos = [e for e in events if isinstance(e, protocol.Hello)]
    assert [h.mode for h in hellos] == ["train", "resume"] and hellos[
        1
    ].resumed_from == f"checkpoint-{stopped_at}"
    assert events[-1].status == "completed"
    ours, theirs = _steps(run_dir), _steps(reference)
    later = [s for s in theirs if s > stopped_at]
    assert later, "nothing to compare after the stop"
    for step in later:
        assert abs(ours[step] - theirs[step]) <= 1e-4, (
            f"step {step}: resumed {ours[step]} vs uninterrupted {theirs[step]}"
        )
    # The token count goes on from the checkpoint: the same tokens seen as the uninterrupted run.
    ours_tokens, theirs_tokens = _tokens(run_dir), _tokens(reference)
    assert all(ours_tokens[s] == theirs_tokens[s] for s in later), (ours_tokens, theirs_tokens)


def test_tokens_seen_counts_each_token_of_an_epoch_once(tmp_path: Path) -> None:
    """After exactly one epoch the step events have counted the epoch's tokens (the data report's
    train_tokens). At seq_len 24 every conversation is truncated to 24 tokens, so micro-batches
    hold equal rows and go without an attention mask: TRL's own count took such a batch for one
    row (3 tokens of 24 counted, at micro-batch 8). The data holds one broken line, skipped
    (data.bad_records: skip): the run trains on the rest, and says so."""
    mb, seq = 8, 24
    source = tmp_path / "with-a-bad-line.jsonl"
    lines = DATASET.read_text().splitlines()
    source.write_text("\n".join([*lines[:3], '{"messages": [', *lines[3:]]) + "\n")
    sets = {
        "data.source": source,
        "data.bad_records": "skip",
        "train.micro_batch": mb,
        "train.seq_len": seq,
        "train.logging_steps": 22,
        "train.save_steps": 1000,
        "train.eval_steps": 0,
        "data.val_fraction": 0,
        "train.max_steps": 44,
    }
    args = [x for key, value in sets.items() for x in ("--set", f"{key}={value}")]
    result = qlc("--runs-dir", str(tmp_path), "train", "tiny-demo", *args)
    assert result.returncode == 0, result.stderr + result.stdout
    (run_dir,) = runs.list_run_dirs(tmp_path)
    events, _ = runs.read_events(run_dir)
    report = next(e for e in events if isinstance(e, protocol.DataReady))
    assert report.skipped == 1 and "1 bad record skipped" in result.stdout
    (warning,) = [e for e in events if isinstance(e, protocol.WarningEvent) and "bad record" in e.message]
    assert warning.message.startswith(f"1 bad record was skipped (data.bad_records: skip): {source}: line 4:")
    # Rows with no response token left after truncation are dropped (the data report says so).
    assert report.steps_per_epoch == 44 and report.train_examples == 44 * mb
    assert report.train_tokens == report.train_examples * seq
    tokens = _tokens(run_dir)
    assert tokens == {22: report.train_tokens // 2, 44: report.train_tokens}
    steps = [e for e in events if isinstance(e, protocol.Step)]
    assert steps[0].tokens_per_s == 0.0 and steps[1].tokens_per_s > 0


def test_console_quitting_is_not_a_stop_and_a_live_sample_streams(root: Path, tmp_path: Path) -> None:
    """End of stdin means the console went away: the run keeps training to the end, and answers a
    live sample from its FIFO between two steps. (On a CPU, bitsandbytes' inference kernel makes
    later losses differ by ~1e-4 after a live sample, so resume equivalence is tested without one.)"""
    other = tmp_path / "runs"
    proc, run_dir = _console(other, "--set", "train.max_steps=12")
    _wait(run_dir, lambda e: isinstance(e, protocol.Hello))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait(run_dir, lambda e: isinstance(e, protocol.Step) and e.step >= 2)
    live = qlc(
        "--runs-dir",
        str(other),
        "sample",
        run_dir.name,
        "--live",
        "What is 4 plus 4?",
        "--max-new-tokens",
        "8",
        "--json",
    )
    assert live.returncode == 0, live.stderr
    sample = protocol.decode_event(live.stdout.splitlines()[-1])
    assert isinstance(sample, protocol.Sample) and sample.source == "live" and sample.new_tokens > 0
    finished = _wait(run_dir, lambda e: isinstance(e, protocol.Finished))
    assert finished.status == "completed" and finished.step == 12


def _train_to_its_first_step(tmp_path: Path) -> subprocess.Popen[str]:
    """`qlc train tiny-demo` (400 steps, a line each), read up to its first step line."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    args = ["--runs-dir", str(tmp_path), "train", "tiny-demo", "--set", "train.max_steps=400"]
    proc = subprocess.Popen(
        [*QLC, *args, "--set", "train.logging_steps=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step "):
            break
    return proc


@pytest.mark.parametrize("second", ["after-the-first-line", "at-once"])
def test_ctrl_c_twice_stops_waiting_and_the_run_still_stops_and_saves(tmp_path: Path, second: str) -> None:
    """The second Ctrl-C used to say `detached; the run goes on` while the stop the first one sent
    stopped it. And one landing inside the first's print raised before the stop was sent: the
    run trained on to its end. Now the stop is sent first, and both lines say what happens."""
    proc = _train_to_its_first_step(tmp_path)
    assert proc.stderr is not None
    proc.send_signal(signal.SIGINT)
    first = ""
    if second == "after-the-first-line":
        first = proc.stderr.readline()
    else:
        time.sleep(0.001)  # lands while the first handler prints (two at the same instant are one)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = first + rest
    assert proc.returncode == 130, err  # interrupted: told apart from a completed run's 0
    assert "(Ctrl-C again to stop waiting; the run still stops and saves)" in err
    assert "the run goes on" not in err
    if second == "after-the-first-line":
        assert "detached; the run is stopping and saving a checkpoint. See it end with: qlc attach" in err
    (run_dir,) = runs.list_run_dirs(tmp_path)
    deadline = time.monotonic() + 120
    while runs.is_running(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runs.last_status(run_dir) == "stopped" and runs.checkpoints(run_dir)
    assert runs.summarize(run_dir).step < 400


def test_ctrl_c_once_stops_saves_and_exits_130(tmp_path: Path) -> None:
    """One Ctrl-C: the run stops at its step and saves, and qlc exits 130 (it exited 0, as a
    completed run does: a script could not tell them apart)."""
    proc = _train_to_its_first_step(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (run_dir,) = runs.list_run_dirs(tmp_path)
    assert runs.last_status(run_dir) == "stopped" and runs.checkpoints(run_dir)
    assert "stopped" in out
