"""`qlc export` on a full-size model: the merge's measured memory against engine.memory.merge's
estimate, on the GPU (where `--device auto` puts it when there is room) and on the CPU.

    python bench/gpu_export.py --out DIR [--arch llama-3.1-8b] [--skip-cpu]

A full-size architecture with random bf16 weights (bench.gpu_common), a run directory whose
checkpoint holds a LoRA adapter (r=32 on all seven projections, as the rtx4090 preset) with
random, non-zero B matrices, then the real `qlc export` in a child process, twice: once where it
chooses (the GPU), once with --device cpu. Writes DIR/export-<arch>.json after each export (peak
GPU memory from torch and NVML, peak host RSS, the estimate, the check's figures, seconds).
`--arch tiny` dry-runs it all on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import ARCHS, DevicePeak, build_model, gpu_name, versions, write_tokens
from engine import protocol
from engine.config import load_preset
from engine.run import runs

QLC = [sys.executable, "-m", "tui.cli"]


def make_run(root: Path, base: Path, data: Path) -> Path:
    cfg = load_preset(
        "llama-3.1-8b-rtx4090",
        [f"model.name_or_path={base}", f"data.source={data}", "data.format=tokens", "model.arch=null"],
    )
    return runs.create_run(root, cfg)


def make_adapter(run_dir: Path, base: Path, step: int = 10) -> float:
    """A checkpoint as the trainer writes it (adapter, tokenizer, trainer_state.json), with LoRA B
    drawn at random so that the adapter changes the model and the check has something to see."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.config import load_resolved

    t0 = time.perf_counter()
    cfg = load_resolved(run_dir / runs.CONFIG)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16, device_map={"": device})
    lora = peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2e-3)
    ckpt = run_dir / runs.CHECKPOINTS / f"{runs.CHECKPOINT_PREFIX}{step}"
    model.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(ckpt)
    (ckpt / "trainer_state.json").write_text("{}")
    return time.perf_counter() - t0


def export(root: Path, run_dir: Path, out: Path, *extra: str) -> dict:
    peak = DevicePeak().start()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*QLC, "--runs-dir", str(root), "export", run_dir.name, "--out", str(out), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "NO_COLOR": "1"},
    )
    peak.stop()
    events = protocol.decode_lines(proc.stdout.encode())
    result: dict = {
        "args": list(extra),
        "exit": proc.returncode,
        "wall_seconds": time.perf_counter() - t0,
        "device_peak_gib": peak.peak_gib,
        "device_peak_above_baseline_gib": peak.peak_above_baseline_gib,
        "stderr_tail": proc.stderr[-1500:],
        "events": [
            json.loads(protocol.encode(e))
            for e in events
            if not isinstance(e, protocol.Log) or e.level != "debug"
        ],
    }
    done = next((e for e in events if isinstance(e, protocol.Exported)), None)
    if done is not None:
        result["exported"] = json.loads(protocol.encode(done))
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", default="llama-3.1-8b", choices=sorted(ARCHS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlc-export-bench"))
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--stage", choices=["all", "prepare"], default="all")
    args = parser.parse_args()
    work, out = args.work, args.out
    base, root, data = work / "base", work / "runs", work / "data.jsonl"
    if args.stage == "prepare":  # in its own process: the export must start on an empty GPU
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        build = build_model(args.arch, base)
        write_tokens(data, rows=8, seq_len=256, vocab=min(ARCHS[args.arch]["vocab_size"], 128000))
        run_dir = make_run(root, base, data)
        seconds = make_adapter(run_dir, base)
        (work / "prepared.json").write_text(json.dumps({"build_seconds": build, "adapter_seconds": seconds}))
        return 0
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--stage",
            "prepare",
            "--arch",
            args.arch,
            "--work",
            str(work),
            "--out",
            str(out),
        ],
        check=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    (run_dir,) = runs.list_run_dirs(root)
    from engine.config import load_resolved
    from engine.memory.merge import estimate_merge

    est = estimate_merge(load_resolved(run_dir / runs.CONFIG), "bf16")
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": gpu_name(),
        "versions": versions(),
        "arch": args.arch,
        "adapter": "r=32, alpha=64, all seven projections, B ~ N(0, 2e-3)",
        "prepared": json.loads((work / "prepared.json").read_text()),
        "estimate": {
            "terms": {t.name: t.gb for t in est.terms},
            "gpu_gb": est.gpu_gb,
            "gpu_host_gb": est.gpu_host_gb,
            "cpu_gb": est.cpu_gb,
        },
        "exports": [],
    }
    path = out / f"export-{args.arch}.json"
    for extra, target in (
        (["--max-shard-size", "5GB"], work / "merged-auto"),
        (["--device", "cpu"], work / "merged-cpu"),
    ):
        if args.skip_cpu and "cpu" in extra:
            continue
        report["exports"].append(export(root, run_dir, target, *extra))
        path.write_text(json.dumps(report, indent=1))
        print(
            json.dumps({k: v for k, v in report["exports"][-1].items() if k != "events"}, indent=1)[:3000],
            flush=True,
        )
        shutil.rmtree(target, ignore_errors=True)  # disk: one 16 GB folder at a time
    return 0


if __name__ == "__main__":
    sys.exit(main())
