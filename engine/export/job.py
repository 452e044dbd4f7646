"""The engine's `export` mode: one export, as progress events, written into a temporary folder
beside the target and renamed into place at the end. A failure, a failed check or an interrupt
removes the temporary folder (and any parent folder the export created): an output folder exists
only once it is whole.

    merged        load the base in 16-bit -> apply the adapter -> reference logits -> merge ->
                  save (sharded safetensors, tokenizer + chat template, generation config) ->
                  reload and compare -> model card -> [GGUF] -> rename
    adapter-only  copy the adapter and tokenizer -> compare bytes -> model card -> rename
                  (no torch: it takes a second)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import __version__, protocol
from engine.config import RunConfig
from engine.errors import UserError
from engine.export import card
from engine.export.request import ExportRequest, request_from_args
from engine.hashing import sha256_file
from engine.memory.merge import MergeEstimate
from engine.run import runs
from engine.run.events import Emitter
from engine.run.pins import load_pinned
from engine.train import faults

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
)


class CheckFailed(Exception):
    """The exported folder does not reproduce base + adapter within the tolerance."""


@dataclass
class Progress:
    emitter: Emitter
    total: int
    current: int = 0

    def stage(self, stage: str, message: str) -> None:
        self.current += 1
        self.emitter.emit(
            protocol.StageEvent(stage=stage, message=message, current=self.current, total=self.total)  # type: ignore[arg-type]
        )


@dataclass
class Outcome:
    facts: card.CardFacts = field(default_factory=card.CardFacts)
    dtype: str = ""
    gguf_path: str | None = None
    gguf_note: str = ""
    gguf_error: str = ""
    peak_gpu_gb: float | None = None
    estimate_gb: float | None = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Workspace:
    """The temporary folder beside `out_dir`, and the parent folders this export had to create."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.created: list[Path] = []
        missing = []
        parent = out_dir.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self.created.append(folder)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))

    def commit(self) -> None:
        # mkdtemp's 0700 (and the 0600 safetensors writes) are for the work, not the result: the
        # folder gets the modes any new folder and file would.
        mask = _umask()
        for path in self.tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o666 & ~mask)
        os.chmod(self.tmp, 0o777 & ~mask)
        try:
            self.tmp.rename(self.out_dir)  # onto nothing, or onto an empty folder
        except OSError:
            raise UserError(
                f"--out {self.out_dir}: something was written there during the export",
                "choose another folder",
            ) from None
        self.created = []

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _end_of_turn(tokenizer_dir: Path, template: str) -> tuple[str | None, list[int]]:
    """The family's end-of-turn token and its id, read from tokenizer.json (tokenizers only)."""
    from engine.data.templates import END_OF_TURN, family_of

    family = template if template in END_OF_TURN else None
    chat = _chat_template(tokenizer_dir) if family is None else None
    if chat is not None:
        family = family_of(chat)
    if family is None or not (tokenizer_dir / "tokenizer.json").is_file():
        return None, []
    from tokenizers import Tokenizer

    token = END_OF_TURN[family]
    token_id = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id(token)
    return token, [token_id] if token_id is not None else []


# ---------------------------------------------------------------------------------------------
# Adapter only
# ---------------------------------------------------------------------------------------------


def _export_adapter(request: ExportRequest, cfg: RunConfig, tmp: Path, progress: Progress) -> Outcome:
    source = request.source
    progress.stage("saving", f"copying the adapter and tokenizer of {source.name}")
    copied = [name for name in ADAPTER_FILES if (source / name).is_file()]
    if "adapter_model.safetensors" not in copied:
        raise UserError(
            f"{source}: no adapter_model.safetensors", "the checkpoint is incomplete; pick another"
        )
    copied += [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, tmp / name)
    if not (source / "tokenizer_config.json").is_file():
        from engine.export import merge

        merge.load_tokenizer(cfg, source, merge.base_path(cfg, request.base)).save_pretrained(tmp)
    progress.stage("verifying", "comparing the copies with the run's files")
    for name in copied:
        if sha256_file(tmp / name) != sha256_file(source / name):
            raise CheckFailed(f"{name}: the copy differs from {source / name}")
    token, ids = _end_of_turn(tmp, cfg.data.template)
    out = Outcome(dtype=_adapter_dtype(tmp / "adapter_model.safetensors"))
    out.facts.end_of_turn, out.facts.eos_token_ids = token, ids
    out.facts.adapter_base = _adapter_base(tmp / "adapter_config.json")
    return out


def _adapter_base(path: Path) -> str | None:
    """The base model peft loads the adapter onto (AutoPeftModelForCausalLM reads it)."""
    import json

    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def _adapter_dtype(path: Path) -> str:
    """The dtype of the adapter's tensors, from the safetensors header (no framework needed)."""
    import json
    import struct

    names = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return "/".join(sorted(names.get(d, d.lower()) for d in dtypes))


# ---------------------------------------------------------------------------------------------
# Merged
# ---------------------------------------------------------------------------------------------


def _placement(
    request: ExportRequest, cfg: RunConfig, emitter: Emitter
) -> tuple[str, float | None, MergeEstimate | None]:
    from engine.export import merge
    from engine.memory.merge import estimate_merge, host_available_gb, parse_size, place_merge

    try:
        est = estimate_merge(cfg, request.dtype, parse_size(request.max_shard_size))
    except UserError as exc:  # an architecture the memory model does not know: no estimate
        emitter.log(f"no merge estimate ({exc.message}); merging on the CPU", level="warning")
        return "cpu" if request.device != "cuda" else "cuda", None, None
    gpu = merge.gpu_free_gb() if request.device != "cpu" else None
    if request.device == "cuda" and gpu is None:
        # Asked for, and absent: no amount of freed memory helps (the refusal below said so).
        raise UserError(
            "--device cuda: there is no CUDA GPU here",
            "merge on the CPU with --device cpu, or --device auto (the GPU when one has room)",
        )
    place = place_merge(est, gpu, host_available_gb(), request.device)
    if place.refused:
        raise MemoryError(place.reason)
    other = f"; on a GPU it would need {est.gpu_gb:.2f} GiB" if place.device == "cpu" else ""
    emitter.log(f"merge on {place.device}: {place.reason}{other}")
    return place.device, place.need_gb, est


def _export_merged(
    request: ExportRequest, cfg: RunConfig, tmp: Path, progress: Progress, emitter: Emitter
) -> Outcome:
    from peft import PeftModel

    from engine.export import merge
    from engine.memory.merge import fp32_reference_fits, fp32_reference_gb, host_available_gb

    device, estimate_gb, est = _placement(request, cfg, emitter)
    path = merge.base_path(cfg, request.base)
    progress.stage(
        "loading_model", f"loading {request.base or cfg.model.name_or_path} in {request.dtype} on {device}"
    )
    tokenizer = merge.load_tokenizer(cfg, request.source, path)
    model = merge.load_base(cfg, path, request.dtype, device, explicit_base=request.base is not None)
    progress.stage(
        "merging", f"applying {request.source.name} and merging it into the {request.dtype} weights"
    )
    # Adapters are read from safetensors only: without one, peft would unpickle adapter_model.bin.
    if not (request.source / "adapter_model.safetensors").is_file():
        raise UserError(
            f"{request.source}: no adapter_model.safetensors", "only safetensors adapters are loaded"
        )
    model = PeftModel.from_pretrained(model, str(request.source), is_trainable=False)
    prompts, prompt_source = merge.check_prompts(cfg, tokenizer)
    reference = merge.logits(model, prompts)
    with model.disable_adapter():
        effect = merge.max_diff_to(model, prompts, reference)
    model = model.merge_and_unload()
    eos_ids = merge.generation_config(model, tokenizer, cfg.data.template)
    progress.stage(
        "saving", f"writing safetensors (shards of at most {request.max_shard_size}) and the tokenizer"
    )
    model.save_pretrained(tmp, max_shard_size=request.max_shard_size)
    tokenizer.save_pretrained(tmp)
    del model
    merge.release()
    with_fp32 = est is not None and fp32_reference_fits(est, host_available_gb())
    progress.stage(
        "verifying",
        f"reloading the folder and comparing logits on {len(prompts)} prompts"
        + (f" (and base + adapter in fp32, for {request.dtype}'s own rounding)" if with_fp32 else ""),
    )
    reloaded = merge.reload(tmp, request.dtype, device, trust_remote_code=cfg.model.trust_remote_code)
    difference = merge.max_diff_to(reloaded, prompts, reference)
    del reloaded
    merge.release()
    own_rounding = None
    if with_fp32:
        assert est is not None
        if device == "cpu" and estimate_gb is not None:  # the fp32 copy may be the larger of the two
            estimate_gb = max(estimate_gb, fp32_reference_gb(est))
        try:
            truth = merge.fp32_logits(
                cfg, path, request.source, prompts, explicit_base=request.base is not None
            )
            own_rounding = merge.max_diff(reference, truth)
            del truth
        except Exception as exc:  # a refinement of the check: never the reason an export fails
            merge.release()
            emitter.log(
                f"the fp32 reference failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                f"the tolerance is the share of the largest logit",
                level="warning",
            )
    tolerance, basis = merge.tolerance(request.dtype, merge.largest(reference), own_rounding)
    check = merge.Check(
        max_logit_diff=difference,
        tolerance=tolerance,
        adapter_effect=effect,
        prompts=len(prompts),
        tokens=sum(len(p) for p in prompts),
        source=prompt_source,
        basis=basis,
    )
    if prompt_source != "the run's data":
        emitter.log(f"checked on {prompt_source}", level="warning")
    emitter.log(
        f"logits check: merged against base + adapter {check.max_logit_diff:.4g}, tolerance "
        f"{check.tolerance:.4g} ({basis}); the adapter moves logits by {check.adapter_effect:.4g}",
        level="debug",  # for the record (events.jsonl); the result line or the error says the same
    )
    if not check.passed:
        raise CheckFailed(
            f"the exported model's logits differ from base + adapter by {check.max_logit_diff:.4g} "
            f"(tolerance {check.tolerance:.4g}: {basis})"
        )
    if check.adapter_effect <= check.tolerance:
        emitter.emit(
            protocol.WarningEvent(
                message=f"the adapter moves logits by only {check.adapter_effect:.4g}, within the check's "
                f"tolerance {check.tolerance:.4g}: the check cannot tell it from no adapter",
                hint="export a later checkpoint, or check the run learned anything",
            )
        )
    _check_folder(tmp, eos_ids)
    out = Outcome(dtype=request.dtype, peak_gpu_gb=merge.peak_gpu_gb(), estimate_gb=estimate_gb)
    f = out.facts
    f.device = merge.device_label(device)
    f.eos_token_ids = eos_ids
    f.end_of_turn, _ = _end_of_turn(tmp, cfg.data.template)
    f.max_logit_diff, f.tolerance, f.tolerance_basis, f.adapter_effect = (
        check.max_logit_diff,
        check.tolerance,
        check.basis,
        check.adapter_effect,
    )
    f.prompts, f.tokens = check.prompts, check.tokens
    return out


def _chat_template(folder: Path) -> str | None:
    """The saved tokenizer's chat template: chat_template.jinja, or tokenizer_config.json's entry
    (where older versions of transformers saved it)."""
    import json

    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # several named templates: "default" is the chat one
        named = [t for t in template if isinstance(t, dict)]
        template = next((t.get("template") for t in named if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def _check_folder(folder: Path, eos_ids: list[int]) -> None:
    """What a server reads besides the weights: the chat template and the stop ids, as written."""
    import json

    gen = json.loads((folder / "generation_config.json").read_text())
    written = gen.get("eos_token_id")
    written = written if isinstance(written, list) else [written]
    if not set(eos_ids) <= set(written):
        raise CheckFailed(f"generation_config.json: eos_token_id {written} lacks {eos_ids}")
    if _chat_template(folder) is None:
        raise CheckFailed("the saved tokenizer has no chat template")


def _gguf(request: ExportRequest, tmp: Path, out: Outcome, progress: Progress, emitter: Emitter) -> None:
    from engine.export import gguf

    assert request.gguf is not None
    tools = gguf.require(request.gguf)
    name = f"model-{request.gguf}.gguf"
    progress.stage("converting", f"{name} with llama.cpp ({tools.converter})")
    # The converter reads the folder as it will be shipped; it must not see its own output.
    staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=tmp.parent))
    try:
        made = gguf.convert(
            tools,
            tmp,
            staging / name,
            request.gguf,
            request.dtype,
            lambda line: emitter.log(line, level="debug"),
        )
        made.rename(tmp / name)
        out.gguf_path = str(request.out_dir / name)
        out.facts.gguf_file, out.facts.gguf_type = name, request.gguf
    except gguf.ConversionError as exc:
        out.gguf_error = str(exc)
        out.gguf_note = f"conversion failed: {exc}"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


def export(request: ExportRequest, emitter: Emitter) -> int:
    started = time.time()
    cfg = load_pinned(request.run_dir)  # the base at the commit the run trained on (engine/run/pins.py)
    steps = (3 if request.adapter_only else 5) + (1 if request.gguf else 0)
    progress = Progress(emitter, steps)
    workspace = Workspace(request.out_dir)
    try:
        faults.export_pause()  # QLC_FAULT=slow_export: the interrupt test's window; else nothing
        if request.adapter_only:
            out = _export_adapter(request, cfg, workspace.tmp, progress)
        else:
            out = _export_merged(request, cfg, workspace.tmp, progress, emitter)
            if request.gguf:
                _gguf(request, workspace.tmp, out, progress, emitter)
        progress.stage("finishing", "writing the model card and moving the folder into place")
        out.facts.files = [*_files(workspace.tmp), "README.md"]
        out.facts.chat_template = _chat_template(workspace.tmp)
        record = card.read_record(request.run_dir, request.step)
        (workspace.tmp / "README.md").write_text(
            card.render(request, cfg, record, out.facts), encoding="utf-8"
        )
        workspace.commit()
    except BaseException:
        workspace.abandon()
        raise
    from engine.memory.merge import process_peak_rss_gb

    f = out.facts
    emitter.emit(
        protocol.Exported(
            out_dir=str(request.out_dir),
            kind="adapter" if request.adapter_only else "merged",
            source=request.source.name,
            step=request.step,
            files=_files(request.out_dir),
            size_mb=_size_mb(request.out_dir),
            dtype=out.dtype,
            device=f.device,
            max_logit_diff=f.max_logit_diff,
            tolerance=f.tolerance,
            tolerance_basis=f.tolerance_basis,
            adapter_effect=f.adapter_effect,
            prompts=f.prompts,
            tokens=f.tokens,
            eos_token_ids=f.eos_token_ids,
            gguf_path=out.gguf_path,
            gguf_note=out.gguf_note,
            peak_gpu_gb=out.peak_gpu_gb,
            peak_host_gb=process_peak_rss_gb(),
            estimate_gb=out.estimate_gb,
            seconds=time.time() - started,
        )
    )
    if out.gguf_error:
        emitter.emit(
            protocol.ErrorEvent(
                kind="gguf",
                message=out.gguf_error,
                hint=f"the merged folder {request.out_dir} is complete; the full converter output is in engine.log",
            )
        )
        return 1
    return 0


def main(args: argparse.Namespace, emitter: Emitter) -> int:
    """`python -m engine export RUN_DIR ...`: returns the exit code (0, 1 failed, 2 bad input)."""
    import traceback

    run_dir = Path(args.run_dir)
    emitter.emit(
        protocol.Hello(
            engine_version=__version__, run_id=run_dir.name, pid=os.getpid(), mode="export", backend="hf"
        )
    )
    try:
        if not (run_dir / runs.CONFIG).is_file():
            raise UserError(f"{run_dir}: not a run directory (no {runs.CONFIG})", "`qlc runs` lists them")
        request = request_from_args(run_dir, args)
        return export(request, emitter)
    except UserError as exc:
        emitter.emit(protocol.ErrorEvent(kind="input", message=exc.message, hint=exc.hint))
        return 2
    except CheckFailed as exc:
        emitter.emit(
            protocol.ErrorEvent(
                kind="verification",
                message=str(exc),
                hint="nothing was written; try --dtype fp16 (3 more bits than bf16) or --adapter-only, "
                "and please report it with the run's engine.log",
            )
        )
        return 1
    except MemoryError as exc:
        emitter.emit(
            protocol.ErrorEvent(
                kind="out_of_memory",
                message=str(exc) or "out of memory while merging",
                hint="free memory (stop other runs), or merge on a machine with more RAM or a bigger GPU",
            )
        )
        return 1
    except KeyboardInterrupt:
        emitter.emit(protocol.ErrorEvent(kind="interrupted", message="export cancelled; nothing was written"))
        return 1
    except Exception as exc:
        from engine.train.failures import is_oom

        traceback.print_exc()  # to engine.log: a bug, keep its traceback
        kind = "out_of_memory" if is_oom(exc) else "internal"
        emitter.emit(
            protocol.ErrorEvent(
                kind=kind,
                message=f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                hint=f"nothing was written; details in {run_dir / runs.ENGINE_LOG}",
            )
        )
        return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine mode's arguments (ExportRequest.engine_args writes them)."""
    from engine.memory.merge import SHARD_DEFAULT

    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint")
    parser.add_argument("--out")
    parser.add_argument("--dtype")
    parser.add_argument("--adapter-only", action="store_true")
    parser.add_argument("--gguf")
    parser.add_argument("--base")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-shard-size", default=SHARD_DEFAULT)
