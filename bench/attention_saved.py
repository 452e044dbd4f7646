"""What an attention mask costs in saved activations, layer by layer: the memory model's
`mask_saved_per_token` (engine/memory/terms.py) against what autograd really keeps.

    python -m bench.attention_saved --out bench/results/attention-saved-<machine>-<date>.json

Each case builds a few decoder layers of a catalog architecture with its real attention geometry
(heads, K/V heads, head width, hidden and MLP widths; a small vocabulary), in bf16 on the GPU when
there is one, runs one forward with every parameter trainable, and counts the bytes autograd saves
inside each layer (torch.autograd.graph.saved_tensors_hooks, each storage counted once, in the
first layer that saves it). Layers of one forward differ only in their mask, so the difference
between a masked and an unmasked layer is what the mask costs. With a mask, transformers repeats K
and V to every query head, and SDPA's kernel may keep the mask as a bias.
- gemma-3-1b at 2048 tokens: its sliding-window layers with the window at 512 (masked) against
  the same layers with a window longer than the row (no mask);
- llama-3.2-1b, one row of two packed examples against one plain row: every layer masked.

The bytes are per token of the row. Nothing here measures device memory: the counts are exact
and the same in a process that holds other memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 1024


def build(arch: str, layers: int, device: str, dtype: Any, window: int | None = None) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.gpu_common import few_layers_config

    cfg = few_layers_config(arch, layers, VOCAB)
    if window is not None:
        cfg["sliding_window"] = window
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    # As the engine trains (engine/train/backends/hf.py): with a KV cache, transformers would not
    # look for packed rows in position_ids, and would build no mask for them.
    model.config.use_cache = False
    model.train()
    return model


def saved_per_layer(model: Any, input_ids: Any, position_ids: Any = None) -> list[float]:
    """Bytes autograd saves inside each decoder layer, per token. Parameters (a norm's weight,
    an adapter's matrices) are saved too, but they are not activations: left out."""
    import torch

    layers = model.model.layers
    per_layer: dict[int, int] = defaultdict(int)
    seen: set[int] = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[int | None] = [None]

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            per_layer[current[0]] += storage.nbytes()
        return t

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=input_ids, position_ids=position_ids)
        del out
    finally:
        for h in hooks:
            h.remove()
    tokens = input_ids.numel()
    return [per_layer[i] / tokens for i in range(len(layers))]


def modelled(arch: str, seq: int, packing: bool) -> dict[str, Any]:
    """The memory model's mask term for this case (hf backend, SDPA, bf16, one row)."""
    from engine.config import RunConfig
    from engine.memory import terms
    from engine.memory.architectures import catalog
    from engine.memory.estimate import plan_for

    cfg = RunConfig()
    cfg.model.arch = arch
    cfg.data.source = "x"
    cfg.data.packing = packing
    cfg.train.seq_len, cfg.train.micro_batch = seq, 1
    cfg.quant.compute_dtype = "bf16"
    plan = plan_for(cfg, catalog()[arch], "hf", liger=False, expandable=True)
    return {
        "masked_layers_of_full_model": terms.masked_layers(plan),
        "mask_saved_per_token": terms.mask_saved_per_token(plan),
        "of_which_repeated_kv": terms.repeated_kv_per_token(plan),
        "of_which_bias": 2 * seq,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--small", action="store_true", help="a CPU check: 256 tokens, windows scaled down")
    args = ap.parse_args()

    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    seq = 256 if args.small else args.seq
    results = []

    # Gemma 3 1B: five sliding-window layers (masked once the row is longer than the window) and a
    # global one; the control's window is longer than the row, so that no layer is masked
    # (transformers drops a sliding mask only when the row is shorter than the window). The same
    # sliding layers, with and without their mask, give its cost.
    window = seq // 4
    ids = torch.randint(3, VOCAB, (1, seq), device=device)
    gemma = build("gemma-3-1b", 6, device, dtype, window=window)
    sliding = [t == "sliding_attention" for t in gemma.config.layer_types]
    masked = saved_per_layer(gemma, ids)
    del gemma
    control = build("gemma-3-1b", 6, device, dtype, window=seq + 1)
    unmasked = saved_per_layer(control, ids)
    del control
    # Layer 0 also holds what the whole forward shares (the mask itself, built once): left out.
    pick = [i for i, s in enumerate(sliding) if s and i > 0]
    results.append(
        {
            "case": f"gemma-3-1b, {seq} tokens, window {window} against window {seq + 1}",
            "bytes_per_token_per_layer": {"masked": masked, "control": unmasked, "sliding": sliding},
            "mask_cost_per_token_measured": statistics.median(masked[i] for i in pick)
            - statistics.median(unmasked[i] for i in pick),
            "model": modelled("gemma-3-1b", seq, packing=False),
        }
    )

    # Llama 3.2 1B: a plain row, then one row of two packed examples (position_ids restart).
    llama = build("llama-3.2-1b", 3, device, dtype)
    plain = saved_per_layer(llama, ids)
    half = seq // 2
    positions = torch.cat([torch.arange(half), torch.arange(seq - half)]).unsqueeze(0).to(device)
    packed = saved_per_layer(llama, ids, positions)
    results.append(
        {
            "case": f"llama-3.2-1b, {seq} tokens, two packed examples against one plain row",
            "bytes_per_token_per_layer": {"plain": plain, "packed": packed},
            "mask_cost_per_token_measured": statistics.median(packed[1:]) - statistics.median(plain[1:]),
            "model": modelled("llama-3.2-1b", seq, packing=True),
        }
    )
    del llama

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "bench": "bench/attention_saved.py",
        "command": " ".join(["python -m bench.attention_saved", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "seq": seq,
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for r in results:
        m = r.get("model") or {}
        said = f", modelled {m['mask_saved_per_token']:.0f}" if m else ""
        cost = r["mask_cost_per_token_measured"]
        print(
            f"{r['case']}: a mask costs {cost:.0f} bytes/token/layer{said}" if cost is not None else r["case"]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
