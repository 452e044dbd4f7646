"""Measure the engine's peak memory over a matrix of configs, for the memory model's calibration.

    python bench/calibrate_memory.py --out DIR --arch llama-3.1-8b [--arch gemma-3-12b ...]

For each architecture: a full-size model with random weights is built, saved and loaded once
through the engine's own loading path (engine.train.backends.hf), wrapped with LoRA (r=32, all seven
projections), and trained for 3 optimizer steps per config through the engine's own trainer and
data pipeline, over seq_len x micro_batch x gradient checkpointing. Each config records PyTorch's
peak allocated and reserved memory and NVML's whole-device peak; an out-of-memory is a result too.
The allocator and the batches are the engine's: expandable segments (engine.allocator) and, for
Unsloth, padding-free rows (Backend.padding_free_rows).

Writes DIR/memory-calibration-<arch>.json in the format engine.memory replays in its tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import ARCHS, DevicePeak, build_model, gpu_name, versions, write_tokens
from engine.config import load_preset

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def calibrate(
    arch: str, work: Path, seqs: list[int], batches: list[int], steps: int, out: Path, backend: str = "hf"
) -> list[dict]:
    from engine import allocator

    allocator.configure()  # the engine's allocator settings, before torch touches CUDA
    if backend == "unsloth":
        from engine.train.backends import unsloth as unsloth_backend

        unsloth_backend.preload()  # before transformers, peft and TRL load
    import torch

    from engine import data
    from engine.models.loading import load_tokenizer
    from engine.train.backends import get as get_backend
    from engine.train.backends import hf
    from engine.train.backends.checkpointing import CheckpointPlan
    from engine.train.backends.trainer import build_trainer

    model_dir = work / f"model-{arch}"
    if not (model_dir / "config.json").is_file():
        print(f"[{arch}] built in {build_model(arch, model_dir):.0f} s", flush=True)
    tokens = work / f"tokens-{max(seqs)}.jsonl"
    write_tokens(
        tokens, rows=steps * max(batches) + 4, seq_len=max(seqs), vocab=min(ARCHS[arch]["vocab_size"], 128000)
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_preset(
        "llama-3.1-8b-rtx4090",
        [
            f"model.name_or_path={model_dir}",
            f"data.source={tokens}",
            "data.format=tokens",
            "data.packing=false",
            "data.val_fraction=0",
            "data.too_long=truncate",
            "lora.r=32",
            "lora.alpha=64",
            "train.grad_accum=1",
            f"train.max_steps={steps}",
            "train.save_steps=100000",
            "train.logging_steps=1",
            "train.eval_steps=0",
            f"hardware.backend={backend}",
        ],
    )
    layers = ARCHS[arch]["num_hidden_layers"]
    every = CheckpointPlan(layers, layers, "calibration")
    # Whatever is allocated before this model loads would inflate every record: measure it, and run
    # each architecture in a fresh process (main() does) so it is zero.
    baseline = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    t0 = time.perf_counter()
    tok = load_tokenizer(base, str(model_dir))
    if backend == "unsloth":
        model = unsloth_backend.load_model(base, str(model_dir), every)
        model = unsloth_backend.apply_lora(model, base, every)
    else:
        model = hf.apply_lora(hf.load_model(base, device, str(model_dir)), base, every)
    print(f"[{arch}] loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    after_load = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    peak = DevicePeak().start()
    records = []
    for gc_on in (True, False):
        for seq in seqs:
            for mb in batches:
                cfg = dataclasses.replace(
                    base,
                    train=dataclasses.replace(
                        base.train, seq_len=seq, micro_batch=mb, gradient_checkpointing=gc_on
                    ),
                )
                if backend == "unsloth":
                    from unsloth import FastLanguageModel

                    FastLanguageModel.for_training(
                        model, use_gradient_checkpointing="unsloth" if gc_on else False
                    )
                elif gc_on:
                    model.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False}
                    )
                else:
                    model.gradient_checkpointing_disable()
                prepared = data.prepare(cfg, tok)
                free = get_backend(backend).padding_free_rows(model)  # as the engine's recipe does
                prepared.collator.padding_free = free
                record = {
                    "arch": arch,
                    "backend": backend,
                    "baseline_allocated_gib": baseline,
                    "after_load_allocated_gib": after_load,
                    "seq_len": seq,
                    "micro_batch": mb,
                    "gradient_checkpointing": gc_on,
                    "lora_r": 32,
                    "target_modules": ALL,
                    "modules_to_save": [],
                    "optimizer": cfg.train.optimizer,
                    "allocator": "expandable" if allocator.expandable_segments() else "default",
                    "padding_free": free,
                    "oom": False,
                }
                trainer = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                peak.reset()
                t1 = time.perf_counter()
                try:
                    with tempfile.TemporaryDirectory() as scratch:
                        trainer = build_trainer(
                            model, tok, cfg, prepared, Path(scratch), device, [], gc_on and backend == "hf"
                        )
                        trainer.train()
                except torch.OutOfMemoryError:
                    record["oom"] = True
                record["seconds"] = time.perf_counter() - t1
                if device == "cuda":
                    record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                record["device_peak_gib"] = peak.peak_gib
                if trainer is not None and not record["oom"]:
                    record["step_seconds"] = trainer.state.log_history[-1].get("train_runtime", 0) / steps
                del trainer
                records.append(record)
                print(json.dumps(record), flush=True)
                write(out, arch, records, backend)  # after every config: a time limit loses nothing
    peak.stop()
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return records


def write(out: Path, arch: str, records: list[dict], backend: str = "hf") -> None:
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": gpu_name(),
        "versions": versions(),
        "source": "bench/calibrate_memory.py",
        "records": records,
    }
    suffix = "" if backend == "hf" else f"-{backend}"
    (out / f"memory-calibration-{arch}{suffix}.json").write_text(json.dumps(result, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", action="append", required=True, choices=sorted(ARCHS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlc-bench"))
    ap.add_argument("--seq", type=int, action="append", help="default 1024 and 4096")
    ap.add_argument("--batch", type=int, action="append", help="default 1 and 2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", choices=["hf", "unsloth"], default="hf")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if len(args.arch) > 1:
        # One process per architecture: memory a finished model leaves behind must not count.
        import subprocess

        for arch in args.arch:
            argv = [a for a in sys.argv[1:]]
            rest, skip = [], False
            for a in argv:
                if skip:
                    skip = False
                    continue
                if a == "--arch":
                    skip = True
                    continue
                rest.append(a)
            subprocess.run([sys.executable, __file__, *rest, "--arch", arch], check=False)
        return 0
    for arch in args.arch:
        calibrate(
            arch,
            args.work,
            args.seq or [1024, 4096],
            args.batch or [1, 2],
            args.steps,
            args.out,
            args.backend,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
