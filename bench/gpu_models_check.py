"""GPU check of issue 14's model work, in one device call of under 6 minutes:

1. Gemma 3 4B as published, vision tower included (Gemma3ForConditionalGeneration from its
   config.json, random bf16 weights, built in a child process and saved to --work), trained for a
   few steps through BOTH backends by the real `qlc train` on pre-tokenized rows. Checked: every
   LoRA weight the adapter saved sits in the language model, the trainable count is the text
   decoder's alone, the run reports k of 34 text layers checkpointed, and the memory estimate
   against what the run measured (weights after load, the steps' peak).
2. Padding-free rows with the Unsloth backend: one row of three examples (A, B, C) through the
   engine's own Unsloth load and collator; A's tokens changed, B's logits must not move. As a
   control, the same row without the examples' boundaries (one sequence) must move.
3. DIR/models-check-<date>.json with date, GPU, versions and every figure; a compact summary;
   and the training runs as memory-calibration records (DIR/memory-calibration-gemma-3-4b-vision-
   <gpu>-<date>.json, read by bench/memory_table.py and the replay test). `records RESULTS OUT`
   converts an earlier check's results.

The two training runs and the padding-free check run side by side (one H200 holds them all);
each measures its own process's torch peaks, so they do not disturb each other's figures.

    python bench/gpu_models_check.py --out DIR --unsloth-path /tmp/site2
    python bench/gpu_models_check.py --out DIR --dry-run    # CPU: tiny shapes, hf backend only

The device call (shared/gpu/README.md), carry [".whl", ".whl-unsloth"]:
    P="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
    $P --target /tmp/site .whl/*.whl && $P --target /tmp/site2 .whl-unsloth/*.whl &&
    PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \
        python3 bench/gpu_models_check.py --out $OUT --unsloth-path /tmp/site2
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_common import build_model, report_header, token_run_overrides, write_tokens  # noqa: E402

QLC = [sys.executable, "-m", "tui.cli"]
PRESET = "gemma-3-4b-rtx4090"

# google/gemma-3-4b-it's config.json (text_config keys transformers 5.17 reads; rope as it names them).
GEMMA3_4B = {
    "text_config": {
        "model_type": "gemma3_text",
        "vocab_size": 262208,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "sliding_window": 1024,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 896,
        "patch_size": 14,
        "vision_use_head": False,
    },
    "mm_tokens_per_image": 256,
    "image_token_index": 262144,
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
    "tie_word_embeddings": True,
}
# The same structure at CPU size, for --dry-run.
GEMMA3_TINY = {
    **GEMMA3_4B,
    "text_config": {
        **GEMMA3_4B["text_config"],
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 4096,
        "sliding_window": 64,
        "query_pre_attn_scalar": 32,
    },
    "vision_config": {**GEMMA3_4B["vision_config"], "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56},
    "mm_tokens_per_image": 4,
    "image_token_index": 2048,
    "boi_token_index": 2,
    "eoi_token_index": 106,
}  # fmt: skip
GEMMA_SPECIALS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
}


# ---------------------------------------------------------------------------------------------
# Children: the checkpoint build and the padding-free check, each in its own process
# ---------------------------------------------------------------------------------------------


def build_gemma3(out: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Random bf16 weights of `spec` (on the GPU when there is one), saved like a hub checkpoint,
    with a WordLevel tokenizer covering its vocabulary and the Gemma 3 chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast

    from engine.data.templates import GEMMA3

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(Gemma3Config(**spec))
    finally:
        torch.set_default_dtype(previous)
    params = {
        "total": sum(p.numel() for p in model.parameters()),
        "vision_tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
    }
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    n = spec["text_config"]["vocab_size"]
    inverse = {i: s for s, i in GEMMA_SPECIALS.items()}
    vocab = {inverse.get(i, f"t{i}"): i for i in range(n)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    fast.chat_template = GEMMA3
    fast.save_pretrained(out)
    return {"seconds": time.perf_counter() - t0, "device": device, "params": params}


def padding_free(work: Path, unsloth: bool, dry_run: bool, wait_for_build: float) -> dict[str, Any]:
    """Changing example A's tokens leaves example B's logits, in the same padding-free row, as
    they were: the row the engine's collator builds, through the engine's own backend load. On a
    small Llama (Unsloth's own attention kernels, built here) and on the Gemma 3 checkpoint the
    orchestrator builds (Unsloth's multimodal loader, transformers' attention), when it is ready
    within `wait_for_build` seconds."""
    os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")  # Unsloth returns logits only when asked
    from engine.train import backends

    backend = backends.get("unsloth" if unsloth else "hf")
    backend.prepare()  # before transformers is imported
    arch = "tiny" if dry_run else "llama-3.2-1b"
    model_dir = work / f"pf-{arch}"
    out: dict[str, Any] = {"backend": backend.name}
    out["build_seconds"] = build_model(arch, model_dir)
    out[arch] = one_row_check(backend, model_dir, vocab=120_000)
    shutil.rmtree(model_dir, ignore_errors=True)
    deadline = time.monotonic() + wait_for_build
    while not (work / "build.json").is_file() and time.monotonic() < deadline:
        time.sleep(1)
    if (work / "build.json").is_file():
        vocab = (GEMMA3_TINY if dry_run else GEMMA3_4B)["text_config"]["vocab_size"]
        out["gemma3"] = one_row_check(backend, work / "gemma3", vocab=vocab - 10)
    else:
        out["gemma3"] = {"skipped": f"the Gemma 3 checkpoint was not built within {wait_for_build:.0f} s"}
    checks = [v for v in out.values() if isinstance(v, dict) and "passed" in v]
    out["passed"] = bool(checks) and all(v["passed"] for v in checks)
    return out


def one_row_check(backend: Any, model_dir: Path, vocab: int) -> dict[str, Any]:
    import torch

    from engine.config import RunConfig
    from engine.data.collate import PadCollator
    from engine.memory.checkpointing import CheckpointPlan
    from engine.models.loading import with_compute_dtype
    from engine.run.distributed import Ranks

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = RunConfig()
    cfg.model.name_or_path = str(model_dir)
    cfg.data.source = "rows"
    cfg.train.seq_len = 1024
    cfg.train.gradient_checkpointing = False
    cfg.hardware.backend = backend.name
    cfg, dtype = with_compute_dtype(cfg, device)
    config = json.loads((model_dir / "config.json").read_text())
    layers = config.get("text_config", config)["num_hidden_layers"]
    plan = CheckpointPlan(layers, 0, "a forward check")
    model = backend.load_model(cfg, str(model_dir), device, plan, Ranks())
    kernels = backend.apply_kernels(model, cfg, device)
    model = backend.apply_lora(model, cfg, plan, Ranks())
    rows_free = backend.padding_free_rows(model)
    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    a, b, c = ids(300), ids(200), ids(260)
    collate = PadCollator(pad_token_id=0, padding_free=True)

    def logits_of_b(first: list[int], boundaries: bool = True) -> Any:
        rows = [{"input_ids": x, "labels": x} for x in (first, b, c)]
        batch = collate(rows)
        batch.pop("labels")
        if not boundaries:  # one sequence: positions run on, no lengths
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
            batch.pop("packed_seq_lengths")
        elif backend.name != "unsloth":
            batch.pop("packed_seq_lengths")  # transformers reads the boundaries from position_ids
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
        return logits[0, len(first) : len(first) + len(b)].float().cpu()

    model.train()  # the training forward (dropout is 0): the path padding-free rows take
    before, after = logits_of_b(a), logits_of_b(ids(300))
    control_before, control_after = logits_of_b(a, False), logits_of_b(ids(300), False)
    with torch.no_grad():
        alone = (
            model(
                input_ids=torch.tensor([b], device=device),
                position_ids=torch.arange(len(b), device=device)[None],
                use_cache=False,
            )
            .logits[0]
            .float()
            .cpu()
        )
    moved = float((before - after).abs().max())
    control = float((control_before - control_after).abs().max())
    result = {
        "model": config.get("architectures", ["?"])[0],
        "compute_dtype": dtype.name,
        "kernels": kernels,
        "padding_free_rows": rows_free,
        "examples": [len(a), len(b), len(c)],
        "b_logits_max_abs_change_when_a_changes": moved,
        "control_one_sequence_max_abs_change": control,
        "b_in_row_vs_b_alone_max_abs_diff": float((before - alone).abs().max()),
        "logit_scale_max_abs": float(before.abs().max()),
        # Unsloth must take padding-free rows (an hf dry run pads in training; the row is the same).
        "passed": (rows_free or backend.name != "unsloth")
        and moved <= 1e-3
        and control > 10 * max(moved, 1e-3),
        "seconds": time.perf_counter() - t0,
    }
    return result


# ---------------------------------------------------------------------------------------------
# The orchestrator
# ---------------------------------------------------------------------------------------------


def env_for(unsloth_path: str | None) -> dict[str, str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "UNSLOTH_DISABLE_STATISTICS": "1"}
    if unsloth_path:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), unsloth_path, env.get("PYTHONPATH", "")])
    return env


def child(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cwd.mkdir(parents=True, exist_ok=True)  # Unsloth writes its compile cache in the cwd: one each
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        cwd=cwd,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def start_run(backend: str, work: Path, model: Path, data: Path, env: dict[str, str], k: int, steps: int,
              seq: int) -> subprocess.Popen[bytes]:  # fmt: skip
    overrides = token_run_overrides(model, data, seq, 1, 2, steps)
    overrides += [
        f"hardware.backend={backend}",
        f"train.gradient_checkpointing={k}",
        "train.epochs=1",
        "data.split=train",
        "model.arch=null",  # the estimate reads the checkpoint's own config.json, vision_config included
    ]
    cwd = work / backend
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            *QLC,
            "--runs-dir",
            str(cwd / "runs"),
            "train",
            PRESET,
            *[x for o in overrides for x in ("--set", o)],
        ],
        cwd=cwd,
        env=env,
        stdout=(cwd / "qlc.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait(procs: dict[str, subprocess.Popen[bytes]], deadline: float) -> dict[str, int | None]:
    """Each child's exit code; a child still running at the deadline is ended (None)."""
    codes: dict[str, int | None] = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            codes[name] = None
    return codes


def end_engine(work: Path, backend: str) -> None:
    """A run still going at the deadline: its engine outlives `qlc train` by design, so end it by
    the pid its lock holds (the device call ends with the check)."""
    import signal

    from engine.run import runs

    root = work / backend / "runs"
    for run_dir in runs.list_run_dirs(root) if root.is_dir() else []:
        if runs.is_running(run_dir):
            try:
                pid = runs.lock_pid(run_dir)
                os.kill(pid, signal.SIGTERM)
                time.sleep(5)
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass


def lora_params(arch: Any, r: int) -> int:
    return arch.layers * sum(r * (i + o) for i, o in arch.linear_modules().values())


def collect_run(backend: str, work: Path, code: int | None, k: int, arch: Any) -> dict[str, Any]:
    from engine import protocol
    from engine.run import runs

    out: dict[str, Any] = {"backend": backend, "exit": code}
    found = runs.list_run_dirs(work / backend / "runs") if (work / backend / "runs").is_dir() else []
    if not found:
        out["log_tail"] = (work / backend / "qlc.log").read_text(errors="replace")[-2000:]
        return out
    run_dir = found[-1]
    events, _ = runs.read_events(run_dir)
    hello = next((e for e in events if isinstance(e, protocol.Hello)), None)
    ready = next((e for e in events if isinstance(e, protocol.ModelReady)), None)
    est = next((e for e in events if isinstance(e, protocol.EstimateEvent)), None)
    steps = [e for e in events if isinstance(e, protocol.Step)]
    finished = next((e for e in events if isinstance(e, protocol.Finished)), None)
    errors = [e.message for e in events if isinstance(e, protocol.ErrorEvent)]
    expected_trainable = lora_params(arch, 32)
    out.update(
        {
            "status": finished.status if finished else None,
            "errors": errors,
            "backend_used": hello.backend if hello else None,
            "compute_dtype": hello.compute_dtype if hello else None,
            "steps": [[s.step, s.loss, s.step_seconds] for s in steps],
        }
    )
    if ready is not None:
        out["model_ready"] = {
            "layers": ready.layers,
            "checkpointed_layers": ready.checkpointed_layers,
            "checkpoint_ok": (ready.layers, ready.checkpointed_layers) == (arch.layers, k),
            "trainable_params": ready.trainable_params,
            "trainable_expected_text_lora_only": expected_trainable,
            "trainable_ok": ready.trainable_params == expected_trainable,
            "allocated_after_load_gib": ready.memory_allocated_gb,
            "quantization": ready.quantization,
            "repo": ready.repo,
            "commit": ready.commit,
            "kernels": ready.kernels,
            "load_seconds": ready.load_seconds,
        }
    adapter = run_dir / runs.ADAPTER / "adapter_model.safetensors"
    if adapter.is_file():
        from safetensors import safe_open

        with safe_open(str(adapter), "pt") as f:
            keys = list(f.keys())
        outside = [k for k in keys if ".language_model." not in k]
        out["adapter"] = {
            "tensors": len(keys),
            "outside_language_model": outside[:5],
            "ok": bool(keys) and not outside,
        }
    if est is not None:
        weights = next((t for t in est.terms if t.name == "weights"), None)
        peak = max((s.memory_peak_reserved_gb or 0.0 for s in steps[1:]), default=None)
        alloc = max((s.memory_peak_allocated_gb or 0.0 for s in steps[1:]), default=None)
        out["memory"] = {
            "estimate_weights_gib": weights.gb if weights else None,
            "estimate_weights_parts": weights.parts if weights else None,
            # At model_ready the adapters are still fp32 (TRL casts them to bf16 when it builds the
            # trainer): the estimate counts them as they train.
            "lora_fp32_extra_at_load_gib": expected_trainable * 2 / 2**30,
            "estimate_torch_peak_gib": est.torch_peak_gb,
            "measured_peak_reserved_gib": peak,
            "measured_peak_allocated_gib": alloc,
            "peak_error": (est.torch_peak_gb / peak - 1) if peak else None,
        }
    return out


def calibration_records(report: dict[str, Any]) -> dict[str, Any]:
    """The check's training runs as memory-calibration records (engine/memory/calibration.py's
    format), for bench/memory_table.py and the replay test: Gemma 3 4B with its vision tower,
    measured through `qlc train` on rows of exactly seq_len tokens (bench/gpu_common.write_tokens),
    both backends at once on the GPU (torch's peaks are each process's own; no device figure)."""
    from engine.config import ALL_LINEAR

    recipe = report["recipe"]
    records = []
    for backend, run in report["runs"].items():
        mem, ready = run.get("memory") or {}, run.get("model_ready") or {}
        if run.get("status") != "completed" or not mem.get("measured_peak_reserved_gib"):
            continue
        kernels = ready.get("kernels") or []
        records.append(
            {
                "id": f"gemma-3-4b+vision/{backend}/r{recipe['lora_r']}-all/s{recipe['seq_len']}x{recipe['micro_batch']}",
                "source": "qlc train (bench/gpu_models_check.py)",
                "arch": "gemma-3-4b",
                "vision_tower": True,
                "backend": backend,
                "seq_len": recipe["seq_len"],
                "micro_batch": recipe["micro_batch"],
                "grad_accum": recipe["grad_accum"],
                "gradient_checkpointing": True,
                "checkpointed_layers": ready.get("checkpointed_layers", recipe["gradient_checkpointing"]),
                "lora_r": recipe["lora_r"],
                "lora_alpha": 2 * recipe["lora_r"],
                "target_modules": list(ALL_LINEAR),
                "modules_to_save": [],
                "optimizer": "paged_adamw_8bit",
                "oom": False,
                "allocator": "expandable",
                "padding_free": backend == "unsloth",
                "liger": any(k.startswith("liger") for k in kernels),
                "kernels": kernels,
                "peak_allocated_gib": mem.get("measured_peak_allocated_gib"),
                "peak_reserved_gib": mem["measured_peak_reserved_gib"],
                "after_load_allocated_gib": ready.get("allocated_after_load_gib"),
                "engine_estimate": {"torch_peak_gb": mem.get("estimate_torch_peak_gib")},
            }
        )
    return {
        "date": report["date"],
        "gpu": report["gpu"],
        "versions": report["versions"],
        "source": "bench/gpu_models_check.py",
        "derived_from": f"models-check-{report['date']}.json",
        "note": "held out: measured after the constants were fitted, and never fitted to",
        "records": records,
    }


def versions(unsloth_path: str | None) -> dict[str, str]:
    from bench.gpu_common import versions as base

    out = base()
    if unsloth_path:
        for dist in md.distributions(path=[unsloth_path]):
            name = dist.metadata["Name"]
            if name in ("unsloth", "unsloth_zoo", "unsloth-zoo", "trl", "datasets"):
                out[f"{name} (unsloth stack)"] = dist.version
    return out


def main() -> int:
    if sys.argv[1:2] == ["records"]:
        # python bench/gpu_models_check.py records RESULTS.json OUT.json: an earlier check's runs
        # as calibration records.
        source, target = Path(sys.argv[2]), Path(sys.argv[3])
        target.write_text(json.dumps(calibration_records(json.loads(source.read_text())), indent=1) + "\n")
        print(f"{len(json.loads(target.read_text())['records'])} records -> {target}")
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, help="where the JSON results go (required)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlc-models-check"))
    ap.add_argument("--unsloth-path", help="site folder with the Unsloth stack, put first on PYTHONPATH")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, the hf backend only")
    ap.add_argument(
        "--budget", type=float, default=290.0, help="seconds for the whole check (wheels installed before)"
    )
    ap.add_argument("--child", choices=["build", "padding-free"], help=argparse.SUPPRESS)
    ap.add_argument("--unsloth", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "build":
        spec = GEMMA3_TINY if args.dry_run else GEMMA3_4B
        result = build_gemma3(args.work / "gemma3", spec)
        (args.work / "build.json").write_text(json.dumps(result))
        return 0
    if args.child == "padding-free":
        result = padding_free(args.work, args.unsloth, args.dry_run, wait_for_build=180)
        (args.work / "padding-free.json").write_text(json.dumps(result))
        return 0

    if args.out is None:
        ap.error("--out is required")
    t_start = time.monotonic()
    deadline = t_start + args.budget
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("no CUDA GPU: use --dry-run on a CPU", file=sys.stderr)
        return 2
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    unsloth = bool(args.unsloth_path) and cuda and not args.dry_run
    backends_run = ["hf", "unsloth"] if unsloth else ["hf"]
    k = 2 if args.dry_run else 17
    steps, seq = (3, 128) if args.dry_run else (6, 2048)
    report: dict[str, Any] = report_header(
        "gemma-3-4b (Gemma3ForConditionalGeneration, vision tower included)" if not args.dry_run else "tiny gemma3",
        {"seq_len": seq, "micro_batch": 1, "grad_accum": 2, "steps": steps, "lora_r": 32,
         "gradient_checkpointing": k, "preset": PRESET, "dry_run": args.dry_run},
    )  # fmt: skip
    report["versions"] = versions(args.unsloth_path)
    out_file = args.out / f"models-check-{report['date']}{'-dry-run' if args.dry_run else ''}.json"

    def save() -> None:
        report["elapsed_seconds"] = time.monotonic() - t_start
        out_file.write_text(json.dumps(report, indent=2))

    base_env = env_for(None)
    flags = ["--work", str(work)] + (["--dry-run"] if args.dry_run else [])
    # The padding-free check builds its own small model: it starts now, beside the 4B build.
    pf_args = ["--child", "padding-free", *flags] + (["--unsloth"] if unsloth else [])
    pf = child(pf_args, work / "pf", env_for(args.unsloth_path) if unsloth else base_env, work / "pf.log")
    build = child(["--child", "build", *flags], work / "build", base_env, work / "build.log")
    codes = wait({"build": build}, min(deadline, time.monotonic() + 150))
    report["build"] = json.loads((work / "build.json").read_text()) if codes["build"] == 0 else {
        "exit": codes["build"], "log_tail": (work / "build.log").read_text(errors="replace")[-2000:]}  # fmt: skip
    save()
    if codes["build"] != 0:
        print(f"the checkpoint build failed (exit {codes['build']}): {work / 'build.log'}", flush=True)
        print(report["build"]["log_tail"], flush=True)
        wait({"padding-free": pf}, deadline)
        return 1
    print(f"built in {time.monotonic() - t_start:.0f} s: {report['build']['params']}", flush=True)

    model, data = work / "gemma3", work / "tokens.jsonl"
    write_tokens(data, (steps + 2) * 2, seq, vocab=2000 if args.dry_run else 262000)
    runs_started = {
        b: start_run(
            b, work, model, data, env_for(args.unsloth_path) if b == "unsloth" else base_env, k, steps, seq
        )
        for b in backends_run
    }
    codes = wait({**runs_started, "padding-free": pf}, deadline - 15)
    for b in backends_run:
        if codes[b] is None:
            end_engine(work, b)
    from engine.memory import find_architecture

    arch = find_architecture(str(model))
    report["architecture"] = {
        "text": arch.param_counts(),
        "vision": arch.vision.param_counts() if arch.vision else None,
    }
    report["runs"] = {b: collect_run(b, work, codes[b], k, arch) for b in backends_run}
    if not unsloth:
        report["runs"]["unsloth"] = {"skipped": "no CUDA GPU or no --unsloth-path"}
    pf_file = work / "padding-free.json"
    report["padding_free"] = json.loads(pf_file.read_text()) if codes["padding-free"] == 0 and pf_file.is_file() else {
        "exit": codes["padding-free"], "log_tail": (work / "pf.log").read_text(errors="replace")[-2000:]}  # fmt: skip
    save()
    if not args.dry_run:
        records = (
            args.out
            / f"memory-calibration-gemma-3-4b-vision-{report['gpu'].split()[-1].lower()}-{report['date']}.json"
        )
        records.write_text(json.dumps(calibration_records(report), indent=1) + "\n")
    shutil.rmtree(model, ignore_errors=True)  # 8.6 GB: the machine's disk is small
    shutil.rmtree(work / "pf", ignore_errors=True)
    for path in work.glob("pf-*"):
        shutil.rmtree(path, ignore_errors=True)

    print(f"\n== models check ({report['gpu']}, {report['elapsed_seconds']:.0f} s) -> {out_file}")
    for b, r in report["runs"].items():
        if "skipped" in r:
            print(f"{b:8s} skipped: {r['skipped']}")
            continue
        mr, mem, ad = r.get("model_ready", {}), r.get("memory", {}), r.get("adapter", {})
        losses = [s[1] for s in r.get("steps", [])]
        print(
            f"{b:8s} {r.get('status')} exit {r.get('exit')} · losses {[round(x, 3) for x in losses]} · "
            f"ckpt {mr.get('checkpointed_layers')}/{mr.get('layers')} ok={mr.get('checkpoint_ok')} · "
            f"trainable {mr.get('trainable_params')} ok={mr.get('trainable_ok')} · adapter in LM ok={ad.get('ok')}"
        )
        if mem:
            print(
                f"         weights est {mem['estimate_weights_gib']:.3f} GiB vs allocated after load "
                f"{mr.get('allocated_after_load_gib') or 0:.3f} (fp32 LoRA then +{mem['lora_fp32_extra_at_load_gib']:.3f}) · "
                f"peak est {mem['estimate_torch_peak_gib']:.2f} vs reserved {mem['measured_peak_reserved_gib'] or 0:.2f} "
                f"({(mem['peak_error'] or 0):+.1%})"
            )
        if r.get("errors"):
            print(f"         errors: {r['errors']}")
    p = report["padding_free"]
    if "passed" not in p:
        print(f"padding-free: failed (exit {p.get('exit')})")
    for name, c in p.items():
        if isinstance(c, dict) and "passed" in c:
            print(
                f"padding-free {p['backend']} {c['model']}: B moved {c['b_logits_max_abs_change_when_a_changes']:.2e} "
                f"when A changed; one-sequence control {c['control_one_sequence_max_abs_change']:.2e}; "
                f"B in row vs alone {c['b_in_row_vs_b_alone_max_abs_diff']:.2e} · rows padding-free "
                f"{c['padding_free_rows']} · passed={c['passed']}"
            )
        elif isinstance(c, dict):
            print(f"padding-free {name}: {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
