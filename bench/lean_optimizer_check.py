"""The lean 8-bit optimizer step against bitsandbytes' own on CUDA: bit-equal updates, host time.

    python bench/lean_optimizer_check.py --out bench/results/lean-optimizer-<gpu>-<date>.json

The adapter tensors of Llama-3.1-8B at r=32 on all seven projections (448; in bf16, as TRL casts
them for the hf backend, and in fp32, as Unsloth keeps them), paged 8-bit AdamW as the presets use
it: ten steps of each optimizer on the same parameters and gradients; every parameter and every
8-bit state must end bit-equal, and each step's wall time (to the device's last kernel) is
reported (engine.train.backends.lean_optimizer: its slabs update the tensors in a few launches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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


def adapters(layers: int, rank: int, seed: int, dtype: Any) -> list:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(layers):
        for fan_in, fan_out in PROJECTIONS:
            for shape in ((rank, fan_in), (fan_out, rank)):
                w = torch.randn(*shape, generator=g, device="cuda", dtype=dtype) * 0.02
                out.append(torch.nn.Parameter(w))
    return out


def run(lean: bool, steps: int, layers: int, rank: int, dtype: Any) -> tuple[list, Any, list[float]]:
    import bitsandbytes as bnb
    import torch

    from engine.train.backends.lean_optimizer import lean_bnb_step

    params = adapters(layers, rank, seed=0, dtype=dtype)
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.01)
    if lean:
        assert lean_bnb_step(opt), "the lean step did not apply"
    g = torch.Generator(device="cuda").manual_seed(1)
    times = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, device="cuda", dtype=dtype) * 1e-3
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        opt.zero_grad()
    return params, opt, times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()

    import torch

    from bench.gpu_common import versions

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "bench": "bench/lean_optimizer_check.py",
        "gpu": torch.cuda.get_device_name(),
        "versions": versions(),
        "steps": args.steps,
        "dtypes": {},
    }
    failed = 0
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        plain, plain_opt, plain_s = run(False, args.steps, args.layers, args.rank, dtype)
        lean, lean_opt, lean_s = run(True, args.steps, args.layers, args.rank, dtype)
        unequal = sum(not torch.equal(a, b) for a, b in zip(plain, lean, strict=True))
        # Paged state lives in managed memory that torch sees as a CPU tensor: compared on the CPU.
        states = sum(
            not torch.equal(plain_opt.state[a][key].cpu(), lean_opt.state[b][key].cpu())
            for a, b in zip(plain, lean, strict=True)
            for key in ("state1", "state2", "absmax1", "absmax2")
        )
        failed += unequal + states
        row = report["dtypes"][name] = {
            "tensors": len(plain),
            "unequal_tensors": unequal,
            "unequal_states": states,
            "slabs": len(getattr(lean_opt, "_qlc_slabs", None) or []),
            # The first step initialises the state: the medians are of the steps after it.
            "bitsandbytes_step_ms": 1e3 * statistics.median(plain_s[1:]),
            "lean_step_ms": 1e3 * statistics.median(lean_s[1:]),
        }
        print(
            f"{name}: {len(plain)} tensors in {row['slabs']} slabs: bitsandbytes "
            f"{row['bitsandbytes_step_ms']:.1f} ms a step, lean {row['lean_step_ms']:.1f} ms; "
            f"{unequal} tensors and {states} states differ"
        )
        del plain, plain_opt, lean, lean_opt
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
