"""A fake engine for the console's tests and benchmarks: no torch, real protocol, real run directory.

It replays a recorded events file (or a synthetic run) through the same sinks and command queue
the real engine uses: events to stdout and RUN_DIR/events.jsonl, the run's lock held while it
lives, commands from stdin and the control FIFO. `stop` saves a fake checkpoint and finishes
"stopped"; `save` adds a checkpoint; `sample` streams a canned reply. So the console's client,
dashboard, stop/sample flows and attach-after-detach are exercised end to end in seconds.

    python tests/tui/fake_engine.py train|resume RUN_DIR [--events FILE | --steps N] [--rate STEPS_PER_S]
    python tests/tui/fake_engine.py sample RUN_DIR --request JSON [--checkpoint NAME]
    python tests/tui/fake_engine.py export RUN_DIR --out DIR [--checkpoint S] [--adapter-only] ...
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import protocol  # noqa: E402
from engine.run import checkpoints, runs  # noqa: E402
from engine.run.control import read_lines  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
RECORDED = DATA / "tiny-run.events.jsonl"
REPLY = "The adapter learned to answer briefly."
T0 = 1_767_225_600.0  # fixed start time of synthetic runs: snapshots must not depend on the clock


def synthetic_run(
    steps: int = 120,
    *,
    logging_steps: int = 2,
    eval_every: int = 40,
    save_every: int = 40,
    run_id: str = "synthetic",
    finish: bool = True,
    t0: float = T0,
    step_seconds: float = 0.5,
) -> Iterator[protocol.Event]:
    """A plausible run: set-up stages, then loss falling from ~7 towards ~2 with some noise."""
    t = t0
    yield protocol.Hello(time=t, engine_version="0.1.0", run_id=run_id, pid=4242, backend="hf", device="cpu")
    for stage, message in (
        ("loading_model", "builtin:tiny-llama"),
        ("quantizing", "NF4, double quant"),
        ("preparing_data", "tiny-instruct.jsonl"),
    ):
        t += 0.4
        yield protocol.StageEvent(time=t, stage=stage, message=message)  # type: ignore[arg-type]
    t += 0.3
    yield protocol.ModelReady(
        time=t, total_params=3_538_944, trainable_params=540_672, load_seconds=1.2, host_rss_gb=0.61
    )
    yield protocol.EstimateEvent(
        time=t,
        terms=[
            protocol.MemoryTerm(name="weights", gb=0.004),
            protocol.MemoryTerm(name="gradients", gb=0.002),
            protocol.MemoryTerm(name="optimizer", gb=0.001),
            protocol.MemoryTerm(name="activations", gb=0.02),
            protocol.MemoryTerm(name="workspace", gb=0.5),
        ],
        torch_peak_gb=0.03,
        device_total_gb=0.53,
        budget_gb=8.0,
        verdict="fits",
        gpu="8GB",
    )
    yield protocol.DataReady(
        time=t,
        train_examples=380,
        eval_examples=20,
        train_tokens=17_100,
        trained_tokens=9_800,
        steps_per_epoch=48,
        total_steps=steps,
    )
    yield protocol.StageEvent(time=t, stage="training", message="", total=steps)
    tokens = 0
    for step in range(logging_steps, steps + 1, logging_steps):
        t += step_seconds * logging_steps
        progress = step / steps
        noise = 0.15 * math.sin(step * 1.7) * (1 - progress)
        loss = 2.0 + 5.0 * math.exp(-5 * progress) + noise
        warm = max(1, int(0.05 * steps))
        lr = 3e-3 * (
            step / warm
            if step < warm
            else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        )
        tokens += 285 * logging_steps
        yield protocol.Step(
            time=t,
            step=step,
            total_steps=steps,
            epoch=step / 48,
            loss=loss,
            lr=lr,
            grad_norm=0.4 + 0.6 * math.exp(-3 * progress) + 0.05 * math.cos(step),
            tokens_seen=tokens,
            tokens_per_s=570.0 + 20 * math.sin(step / 7),
            step_seconds=step_seconds,
            elapsed_seconds=t - t0,
            eta_seconds=(steps - step) * step_seconds,
            memory_peak_reserved_gb=None,
            host_rss_gb=0.74,
        )
        if eval_every and step % eval_every == 0:
            yield protocol.Eval(time=t, step=step, loss=loss + 0.12)
        if save_every and step % save_every == 0:
            yield protocol.CheckpointSaved(
                time=t, step=step, path=f"checkpoints/checkpoint-{step}", seconds=0.2, size_mb=2.2
            )
    if finish:
        t += 0.5
        yield protocol.Finished(
            time=t,
            status="completed",
            step=steps,
            last_checkpoint=f"checkpoints/checkpoint-{steps}",
            adapter_path="adapter",
            final_loss=loss,
            elapsed_seconds=t - t0,
        )


def write_events(path: Path, events: Iterator[protocol.Event] | list[protocol.Event]) -> Path:
    with path.open("wb") as f:
        for ev in events:
            f.write(protocol.encode(ev))
    return path


def load_events(path: Path) -> list[protocol.Event]:
    return [protocol.decode_event(line) for line in path.read_bytes().splitlines() if line.strip()]


def make_run_dir(
    root: Path, name: str, events: list[protocol.Event] | None = None, preset: str = "tiny-demo"
) -> Path:
    """A run directory as engine.run.runs.create_run makes it, with a given history (and its
    checkpoints as directories, so resume and sample-from-checkpoint find them)."""
    from engine.config import load_preset

    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / name
    run_dir.mkdir(mode=0o700)
    cfg = load_preset(preset)
    (run_dir / runs.CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    os.mkfifo(run_dir / runs.CONTROL, 0o600)
    (run_dir / runs.CHECKPOINTS).mkdir()
    if events is not None:
        write_events(run_dir / runs.EVENTS, events)
        for ev in events:
            if isinstance(ev, protocol.CheckpointSaved):
                write_checkpoint(run_dir, ev.step)
    return run_dir


# ---------------------------------------------------------------------------------------------
# Launchers with engine.run.launcher's signatures, for make_app(launcher=..., sample_launcher=...)
# ---------------------------------------------------------------------------------------------


def launcher(steps: int = 40, rate: float = 40.0, events: Path | None = None, fail_at: int | None = None):
    """A `launch_train` look-alike that starts this fake instead of `python -m engine`."""

    def launch_train(run_dir: Path, resume: bool = False, pipe: bool = True) -> subprocess.Popen[bytes]:
        args = [sys.executable, __file__, "resume" if resume else "train", str(run_dir), "--rate", str(rate)]
        args += ["--events", str(events)] if events else ["--steps", str(steps)]
        args += ["--fail-at", str(fail_at)] if fail_at else []
        return subprocess.Popen(
            args,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stderr=open(run_dir / runs.ENGINE_LOG, "ab"),
            start_new_session=True,
        )

    return launch_train


def launch_sample(run_dir: Path, checkpoint: str | None, request_json: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, __file__, "sample", str(run_dir), "--request", request_json]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def launch_export(run_dir: Path, args: list[str]) -> subprocess.Popen[bytes]:
    """engine.run.launcher.launch_export's signature: `args` are `python -m engine` arguments."""
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


# ---------------------------------------------------------------------------------------------
# The fake engine process
# ---------------------------------------------------------------------------------------------


class Emitter:
    """The engine's two sinks, reduced: stdout (skipped once the console is gone) and events.jsonl.
    Kept here rather than borrowed from engine.run.events so the fake depends only on the protocol."""

    def __init__(self, events_file: Path | None) -> None:
        self._out: object | None = sys.stdout.buffer
        self._file = open(events_file, "ab", buffering=0) if events_file else None  # noqa: SIM115
        self._lock = threading.Lock()

    def emit(self, event: protocol.Message) -> None:
        if not event.time:
            event = msgspec.structs.replace(event, time=time.time())
        line = protocol.encode(event)
        with self._lock:
            if self._file is not None:
                self._file.write(line)
            if self._out is not None:
                try:
                    self._out.write(line)  # type: ignore[attr-defined]
                    self._out.flush()  # type: ignore[attr-defined]
                except (BrokenPipeError, OSError, ValueError):
                    self._out = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Commands:
    """Commands from stdin and the run's control FIFO, one queue. End of stdin is not `stop`."""

    def __init__(self, run_dir: Path) -> None:
        self.queue: queue.Queue[protocol.Command] = queue.Queue()
        fifo = os.open(run_dir / runs.CONTROL, os.O_RDWR)  # read-write: never EOF when a writer leaves
        threading.Thread(target=self._read, args=(fifo,), daemon=True).start()
        if not sys.stdin.isatty():
            threading.Thread(target=self._read, args=(sys.stdin.fileno(),), daemon=True).start()

    def _read(self, fd: int) -> None:
        read_lines(fd, self._put)

    def _put(self, line: bytes) -> None:
        if line.strip():
            self.queue.put(protocol.decode_command(line))

    def drain(self) -> list[protocol.Command]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


def _stream_sample(emitter: Emitter, request: protocol.SampleRequest, source: str, step: int | None) -> None:
    emitter.emit(
        protocol.SampleStarted(request_id=request.request_id, prompt=request.prompt, source=source, step=step)
    )
    words = REPLY.split(" ")
    for i, word in enumerate(words):
        emitter.emit(protocol.SampleToken(request_id=request.request_id, text=(" " if i else "") + word))
        time.sleep(0.01)
    emitter.emit(
        protocol.Sample(
            request_id=request.request_id,
            prompt=request.prompt,
            text=REPLY,
            source=source,
            step=step,
            new_tokens=len(words),
            seconds=0.05,
            stopped_by="eos",
        )
    )


def write_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint folder committed as the real engine commits one (staged, manifest, rename)."""
    root = run_dir / runs.CHECKPOINTS
    staged = checkpoints.staging_root(root, step) / f"checkpoint-{step}"
    staged.mkdir(parents=True, exist_ok=True)
    (staged / "trainer_state.json").write_text("{}")
    final = checkpoints.commit(staged, root)
    staged.parent.rmdir()
    return final


def _save(emitter: Emitter, run_dir: Path, step: int) -> str:
    emitter.emit(protocol.StageEvent(stage="saving", message=f"checkpoint-{step}"))
    ckpt = write_checkpoint(run_dir, step)
    emitter.emit(protocol.CheckpointSaved(step=step, path=str(ckpt), seconds=0.01, size_mb=2.2))
    return str(ckpt)


OOM = protocol.ErrorEvent(
    kind="out_of_memory",
    message="CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity)",
    hint="lower train.micro_batch or train.seq_len; the Memory pane shows what fits",
    advice=["train.micro_batch=1 (saves 2.9 GB)", "train.seq_len=2048 (saves 2.1 GB)"],
)


def _train(
    run_dir: Path, resume: bool, source: list[protocol.Event], rate: float, fail_at: int | None = None
) -> int:
    lock_fd = runs.acquire_lock(run_dir)  # noqa: F841 - held for the life of the process
    emitter = Emitter(run_dir / runs.EVENTS)
    commands = Commands(run_dir)
    start_step = 0
    if resume:
        start_step = int(runs.find_checkpoint(run_dir).name.removeprefix(runs.CHECKPOINT_PREFIX))
    t0 = time.time()
    last_ckpt: str | None = None
    step = start_step
    for ev in source:
        if isinstance(ev, protocol.Hello):
            ev = msgspec.structs.replace(
                ev,
                run_id=run_dir.name,
                pid=os.getpid(),
                mode="resume" if resume else "train",
                resumed_from=f"checkpoint-{start_step}" if resume else None,
            )
        elif isinstance(ev, protocol.Step):
            if ev.step <= start_step:
                continue
            step = ev.step
            if fail_at is not None and step >= fail_at:
                emitter.emit(msgspec.structs.replace(OOM, step=step))
                emitter.emit(protocol.Finished(status="failed", step=step, last_checkpoint=last_ckpt))
                emitter.close()
                return 1
            ev = msgspec.structs.replace(ev, elapsed_seconds=time.time() - t0)
            if rate > 0:
                time.sleep(1.0 / rate)
        elif isinstance(ev, (protocol.Eval, protocol.CheckpointSaved)) and ev.step <= start_step:
            continue
        elif isinstance(ev, protocol.CheckpointSaved):
            last_ckpt = _save(emitter, run_dir, ev.step)
            continue
        elif isinstance(ev, protocol.Finished):
            ev = msgspec.structs.replace(ev, last_checkpoint=last_ckpt, step=step)
        emitter.emit(msgspec.structs.replace(ev, time=0.0))
        for cmd in commands.drain():
            if isinstance(cmd, protocol.Stop):
                last_ckpt = _save(emitter, run_dir, step)
                emitter.emit(protocol.Finished(status="stopped", step=step, last_checkpoint=last_ckpt))
                emitter.close()
                return 0
            if isinstance(cmd, protocol.Save):
                last_ckpt = _save(emitter, run_dir, step)
            elif isinstance(cmd, protocol.SampleRequest):
                _stream_sample(emitter, cmd, "live", step)
    emitter.close()
    return 0


def _export(run_dir: Path, out: Path, checkpoint: str, adapter_only: bool, delay: float) -> int:
    """Stages, then a folder with a card, renamed into place, and the `exported` event."""
    emitter = Emitter(None)
    emitter.emit(protocol.Hello(run_id=run_dir.name, pid=os.getpid(), mode="export", backend="hf"))
    stages = (
        [("saving", "copying")] if adapter_only else [("loading_model", "loading"), ("merging", "merging")]
    )
    stages += [("verifying", "comparing"), ("finishing", "model card")]

    def cancelled(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # as the engine's export takes the console's Cancel (SIGTERM)

    signal.signal(signal.SIGTERM, cancelled)
    try:
        for i, (stage, message) in enumerate(stages, 1):
            emitter.emit(protocol.StageEvent(stage=stage, message=message, current=i, total=len(stages)))  # type: ignore[arg-type]
            time.sleep(delay)
    except KeyboardInterrupt:
        emitter.emit(protocol.ErrorEvent(kind="interrupted", message="export cancelled; nothing was written"))
        emitter.close()
        return 1
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.mkdir(parents=True)
    (tmp / "README.md").write_text("# fake export\n")
    tmp.rename(out)
    source = "adapter" if checkpoint == "adapter" else f"checkpoint-{checkpoint}"
    emitter.emit(
        protocol.Exported(
            out_dir=str(out),
            kind="adapter" if adapter_only else "merged",
            source=source,
            files=["README.md"],
            dtype="bf16",
            max_logit_diff=None if adapter_only else 0.0117,
            tolerance=None if adapter_only else 0.0945,
        )
    )
    emitter.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "resume", "sample", "export"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--events", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rate", type=float, default=40.0, help="steps a second; 0: as fast as possible")
    parser.add_argument("--request")
    parser.add_argument("--checkpoint")
    parser.add_argument("--fail-at", type=int, help="fail with CUDA out of memory at this step")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--adapter-only", action="store_true")
    parser.add_argument(
        "--export-delay", type=float, default=float(os.environ.get("FAKE_EXPORT_DELAY", "0.05"))
    )
    args, _ = parser.parse_known_args(argv)
    if args.mode == "export":
        return _export(args.run_dir, args.out, args.checkpoint, args.adapter_only, args.export_delay)
    if args.mode == "sample":
        emitter = Emitter(None)
        request = protocol.decode_command(args.request)
        assert isinstance(request, protocol.SampleRequest)
        emitter.emit(
            protocol.StageEvent(stage="loading_model", message=f"base + {args.checkpoint or 'adapter'}")
        )
        _stream_sample(emitter, request, args.checkpoint or "adapter", None)
        emitter.close()
        return 0
    source = load_events(args.events) if args.events else list(synthetic_run(args.steps, finish=True))
    return _train(args.run_dir, args.mode == "resume", source, args.rate, args.fail_at)


if __name__ == "__main__":
    sys.exit(main())
