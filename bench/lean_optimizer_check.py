"""The lean 8-bit optimizer step against bitsandbytes' own on CUDA: bit-equal updates, host time.

    python bench/lean_optimizer_check.py --out bench/results/lean-optimizer-<gpu>-<date>.json

The adapter tensors of Llama-3.1-8B at r=32 on all seven projections (448, bf16, as TRL casts
them), paged 8-bit AdamW as the presets use it: ten steps of each optimizer on the same parameters
and gradients; every parameter must end bit-equal, and each step's wall time (to the device's
last kernel) is reported (engine.train.backends.lean_optimizer)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (in, out) of Llama-3.1-8B's seven projections.
PROJECTIONS = (
    (4096, 4096),
    (4096, 1024),
    (4096, 1024),
    (4096, 4096),
    (4096, 14336),
    (4096, 14336),
    (14336, 4096),
)


def adapters(layers: int, rank: int, seed: int) -> list:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(layers):
        for fan_in, fan_out in PROJECTIONS:
            for shape in ((rank, fan_in), (fan_out, rank)):
                w = torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
                out.append(torch.nn.Parameter(w))
    return out


def run(lean: bool, steps: int, layers: int, rank: int) -> tuple[list, list[float]]:
    import bitsandbytes as bnb
    import torch

    from engine.train.backends.lean_optimizer import lean_bnb_step

    params = adapters(layers, rank, seed=0)
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.01)
    if lean:
        assert lean_bnb_step(opt), "the lean step did not apply"
    g = torch.Generator(device="cuda").manual_seed(1)
    times = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, device="cuda", dtype=torch.bfloat16) * 1e-3
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        opt.zero_grad()
    return params, times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()

    import torch

    from bench.gpu_common import versions

    plain, plain_s = run(False, args.steps, args.layers, args.rank)
    lean, lean_s = run(True, args.steps, args.layers, args.rank)
    unequal = sum(not torch.equal(a, b) for a, b in zip(plain, lean, strict=True))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "bench": "bench/lean_optimizer_check.py",
        "gpu": torch.cuda.get_device_name(),
        "versions": versions(),
        "tensors": len(plain),
        "steps": args.steps,
        "unequal_tensors": unequal,
        # The first step initialises the state: the medians are of the steps after it.
        "bitsandbytes_step_ms": 1e3 * statistics.median(plain_s[1:]),
        "lean_step_ms": 1e3 * statistics.median(lean_s[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{len(plain)} tensors: bitsandbytes {report['bitsandbytes_step_ms']:.1f} ms a step, lean "
        f"{report['lean_step_ms']:.1f} ms; {unequal} tensors differ -> {args.out}"
    )
    return 1 if unequal else 0


if __name__ == "__main__":
    sys.exit(main())
