"""What one decoder layer saves for its backward, architecture by architecture: the memory model's
`layer_saved_per_token` (engine/memory/terms.py, hf backend, no Liger) against autograd's count.

    python -m bench.layer_saved --out bench/results/layer-saved-cpu-<date>.json [--arch NAME ...]

For each catalog architecture (default: all of presets/models), a checkpoint of three decoder
layers at the architecture's real widths (a 1,024-token vocabulary) is built on this machine with
random weights. The engine's own hf backend loads it: NF4 with double quantization, bf16 compute,
LoRA r=16 on every linear layer of the decoder, cast to bf16 as TRL does. One forward of a single row, shorter than
any sliding window so that no layer is masked, then counts what autograd saves inside each layer
(torch.autograd.graph.saved_tensors_hooks, each storage once). The middle layers give the figure;
the first also holds what the forward shares.

This checks the term's structure where no GPU record exists (Phi-4's fused projections, Gemma 3's
27B widths, Llama 3.3 70B) on a CPU. Attention saves per device kernel (the CPU's SDPA is not
CUDA's), so the comparison names that part apart: q, k, v and the output count as the model says
on every device; what a kernel keeps beyond them is the residual.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.attention_saved import saved_per_layer  # noqa: E402

VOCAB = 1024
LAYERS = 3


def run_config(arch: str, model_dir: Path, seq: int) -> Any:
    from engine.config import RunConfig

    cfg = RunConfig()
    cfg.model.name_or_path = str(model_dir)
    cfg.model.arch = arch
    cfg.data.source = "x"
    cfg.quant.compute_dtype = "bf16"
    cfg.lora.r, cfg.lora.alpha = 16, 32
    cfg.train.seq_len, cfg.train.micro_batch = seq, 1
    cfg.train.gradient_checkpointing = False
    cfg.train.liger = False
    cfg.hardware.backend = "hf"
    return cfg


def measure(arch: str, work: Path, seq: int) -> dict[str, Any]:
    import torch

    from bench.gpu_common import build_model, few_layers_config
    from engine.memory import terms
    from engine.memory.architectures import catalog
    from engine.memory.estimate import plan_for
    from engine.train.backends import hf
    from engine.train.backends.checkpointing import CheckpointPlan

    entry = catalog()[arch]
    model_dir = work / arch
    build_model(arch, model_dir, few_layers_config(arch, LAYERS, VOCAB), device="cpu")
    cfg = run_config(arch, model_dir, seq)
    cfg.lora.target_modules = list(entry.linear_modules())  # Phi-4's are fused: qkv_proj, gate_up_proj
    model = hf.load_model(cfg, "cpu", str(model_dir))
    model = hf.apply_lora(model, cfg, CheckpointPlan(LAYERS, 0, "none"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # TRL's cast of the adapters, when it builds the trainer
    model.train()
    ids = torch.randint(3, VOCAB, (1, seq))
    per_layer = saved_per_layer(model.get_base_model(), ids)
    del model
    shutil.rmtree(model_dir, ignore_errors=True)

    plan = plan_for(cfg, entry, "hf", liger=False, expandable=True)
    modelled = terms.layer_saved_per_token(plan)
    measured = statistics.median(per_layer[1:])
    return {
        "arch": arch,
        "bytes_per_token_per_layer": per_layer,
        "measured": measured,
        "modelled": modelled,
        "error": modelled / measured - 1,
        "masked_layers": terms.masked_layers(plan),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", action="append", help="catalog architectures (default: every one)")
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    import torch
    import transformers

    from engine.memory.architectures import catalog

    names = args.arch or sorted(catalog())
    work = Path(tempfile.mkdtemp(prefix="qlc-layer-saved-"))
    results = []
    try:
        for name in names:
            t0 = time.perf_counter()
            r = measure(name, work, args.seq)
            r["seconds"] = time.perf_counter() - t0
            results.append(r)
            print(
                f"{name:16s} measured {r['measured']:9.0f} B/token/layer, modelled {r['modelled']:9.0f} "
                f"({r['error']:+.1%}) in {r['seconds']:.0f} s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "bench": "bench/layer_saved.py",
        "command": " ".join(["python -m bench.layer_saved", *sys.argv[1:]]),
        "device": f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "seq": args.seq,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
