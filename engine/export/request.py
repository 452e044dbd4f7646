"""What to export and where, checked before anything loads.

The console and `qlc export` build an `ExportRequest` here (bad input is one line and exit 2,
with nothing started and nothing written), pass it to the engine as arguments, and the engine
checks it again the same way: the output folder may have appeared in between.

Pure Python: the console imports this module.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import RunConfig, load_resolved
from engine.errors import UserError
from engine.memory.merge import SHARD_DEFAULT, parse_size
from engine.run import runs

DTYPES = ("bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
EXPORTS = "exports"  # RUN_DIR/exports/<name>: where an export goes unless --out says otherwise


@dataclass(frozen=True)
class ExportRequest:
    run_dir: Path
    source: Path  # the adapter folder: RUN_DIR/adapter or RUN_DIR/checkpoints/checkpoint-N
    out_dir: Path
    dtype: str  # merged weights: bf16 or fp16; adapter-only: "" (the adapter is copied as trained)
    adapter_only: bool = False
    gguf: str | None = None  # a llama.cpp type (Q4_K_M, Q8_0, ...) or None
    base: str | None = None  # the 16-bit base to merge into; None: the run's model.name_or_path
    device: str = "auto"
    max_shard_size: str = SHARD_DEFAULT

    @property
    def step(self) -> int | None:
        name = self.source.name
        return (
            int(name.removeprefix(runs.CHECKPOINT_PREFIX))
            if name.startswith(runs.CHECKPOINT_PREFIX)
            else None
        )

    def engine_args(self) -> list[str]:
        """`python -m engine export ...` arguments that reproduce this request."""
        args = ["export", str(self.run_dir), "--checkpoint", self.checkpoint_ref, "--out", str(self.out_dir)]
        if self.adapter_only:
            args.append("--adapter-only")
        else:
            args += ["--dtype", self.dtype, "--device", self.device, "--max-shard-size", self.max_shard_size]
        if self.gguf:
            args += ["--gguf", self.gguf]
        if self.base:
            args += ["--base", self.base]
        return args

    @property
    def checkpoint_ref(self) -> str:
        step = self.step
        return "adapter" if step is None else str(step)


def resolve_source(run_dir: Path, checkpoint: str | None) -> Path:
    """`None` or `latest`: the final adapter of a completed run, else its newest checkpoint;
    `adapter` (or `final`); a step number; or a checkpoint folder's name."""

    return runs.resolve_adapter(run_dir, checkpoint)


def default_dtype(cfg: RunConfig) -> str:
    """The run's compute dtype when it is 16-bit (a card without bf16 trains in fp16), else bf16."""
    return cfg.quant.compute_dtype if cfg.quant.compute_dtype in DTYPES else "bf16"


def default_out_dir(run_dir: Path, source: Path, dtype: str, adapter_only: bool) -> Path:
    """RUN_DIR/exports/final-merged-bf16, .../checkpoint-40-merged-bf16, .../final-adapter, ..."""
    label = "final" if source.name == runs.ADAPTER else source.name
    return run_dir / EXPORTS / (f"{label}-adapter" if adapter_only else f"{label}-merged-{dtype}")


def check_out_dir(out: Path, given: bool = True, field: str = "--out") -> None:
    """An output folder must not exist, or be an empty folder; its nearest existing parent must be
    a writable folder. `given`: the user named it in `field` (`--out` on
    the command line, the console dialog's "to" field); else it is the run's default export
    folder, and the message says so. Nothing is left behind: whether the parent takes a folder is
    tried with one made and removed at once."""
    flag = field.startswith("--")
    name = (f"{field} {out}" if flag else str(out)) if given else f"{out} (the default export folder)"
    another = "another " if given else ""  # the default folder was never chosen: "a folder"
    other = f"choose {another or 'a '}folder with {field}" if flag else f"change the folder in {field}"
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"{name}: exists and is not a folder", "choose another path")
        if any(out.iterdir()):
            hint = f"remove it, or {other}"
            if not given:
                hint = f"this export was made before: remove it to make it again, or {other}"
            raise UserError(f"{name}: exists and is not empty", hint)
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not _can_write_in(parent):
        raise UserError(f"{name}: cannot write in {parent}", "choose a folder you can write to")


def _can_write_in(folder: Path) -> bool:
    """A folder the export can make its own in: tried, not asked. os.access says yes to root
    everywhere, /proc included, and the engine then failed with a FileNotFoundError after it had
    started (`qlc export --out /proc/foo`). The probe folder is removed at once."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qlc-write-probe-", dir=folder))
    except OSError:
        return False
    return True


def request_from_args(run_dir: Path, args: Any) -> ExportRequest:
    """`build_request` from the options `qlc export` and `python -m engine export` share (the same
    names on both command lines)."""
    return build_request(
        run_dir,
        checkpoint=args.checkpoint,
        out=args.out,
        dtype=args.dtype,
        adapter_only=args.adapter_only,
        gguf=args.gguf,
        base=args.base,
        device=args.device,
        max_shard_size=args.max_shard_size,
    )


def build_request(
    run_dir: Path,
    *,
    checkpoint: str | None = None,
    out: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    adapter_only: bool = False,
    gguf: str | None = None,
    base: str | None = None,
    device: str = "auto",
    max_shard_size: str = SHARD_DEFAULT,
    check_tools: bool = True,
    out_field: str = "--out",
) -> ExportRequest:
    """Every argument checked; raises UserError (one line, naming the value) on the first problem.
    `out_field`: what the output folder is called where the user typed it."""
    from engine.export import gguf as gguf_tools

    cfg = load_resolved(run_dir / runs.CONFIG)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if adapter_only and dtype is not None:
        raise UserError(
            "--dtype applies to merged weights", "--adapter-only copies the adapter as it was trained"
        )
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    try:
        if parse_size(max_shard_size) <= 0:
            raise ValueError(max_shard_size)
    except ValueError:
        raise UserError(f"--max-shard-size {max_shard_size!r}: expected a size like 5GB or 500MB") from None
    if gguf is not None:
        if adapter_only:
            raise UserError("--gguf converts merged weights", "drop --adapter-only")
        gguf = gguf_tools.check_type(gguf)
        if check_tools:
            gguf_tools.require(gguf)
    if base is not None and not base.strip():
        raise UserError("--base: empty", "a local model folder or a hub id of the 16-bit base model")
    source = resolve_source(run_dir, checkpoint)
    dtype = "" if adapter_only else (dtype or default_dtype(cfg))
    out_dir = Path(out).expanduser() if out else default_out_dir(run_dir, source, dtype, adapter_only)
    out_dir = out_dir.absolute()
    check_out_dir(out_dir, given=bool(out), field=out_field)
    return ExportRequest(
        run_dir=run_dir,
        source=source,
        out_dir=out_dir,
        dtype=dtype,
        adapter_only=adapter_only,
        gguf=gguf,
        base=base,
        device=device,
        max_shard_size=max_shard_size,
    )
