"""Run by tests/engine/test_distributed.py under torchrun (2 CPU processes, gloo).

accelerate turns FSDP on only for GPU process groups, so the engine cannot train with FSDP on
CPUs. What CPUs can check is the layout FSDP-QLoRA rests on: the engine's own loader
(hf.load_model with strategy fsdp) stores the 4-bit weights in the compute dtype, and FSDP2's
fully_shard, wrapping the decoder layers parallel.layer_classes names, splits them across the
ranks while a forward/backward gives the unsharded model's loss and LoRA gradients, a torch AdamW
step moves both alike (bitsandbytes' optimizers cannot step sharded parameters), and a seeded
live sample draws the same tokens on every rank. Prints one JSON line (rank 0).
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from engine import protocol
from engine.config import RunConfig, load_preset
from engine.models.loading import load_tokenizer
from engine.run.distributed import Ranks
from engine.run.events import Emitter
from engine.train.backends import hf, parallel
from engine.train.backends.checkpointing import CheckpointPlan, decoder_layers
from engine.train.sampling import generate


def build(cfg: RunConfig, ranks: Ranks) -> torch.nn.Module:
    model = hf.load_model(cfg, "cpu", ranks=ranks)
    torch.manual_seed(0)
    layers = len(decoder_layers(model)[1])
    model = hf.apply_lora(model, cfg, CheckpointPlan(layers, layers, "test"), ranks=ranks)
    for p in model.parameters():  # as TRL does for a quantized model: adapters in bf16
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    # bitsandbytes' CPU inference kernel (AVX512-BF16, eval mode without gradients) repacks a
    # weight in place and flags its quant state, shared with the module: under FSDP the next
    # all-gather brings the unpacked bytes back while the flag stays, and every later forward is
    # wrong. GPUs have no such kernel; on CPUs keep the kernel training uses.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.train()


def main() -> None:
    dist.init_process_group("gloo")
    ranks = Ranks.from_env()
    cfg = load_preset("tiny-demo", ["hardware.device=cpu", "hardware.strategy=fsdp", "lora.r=8"])
    assert parallel.sharded(cfg, ranks)
    reference, model = build(cfg, ranks), build(cfg, ranks)
    four_bit = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    storage = {str(p.dtype) for p in four_bit}

    mesh = init_device_mesh("cpu", (ranks.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    classes = parallel.layer_classes(model)
    for module in model.modules():
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "generate")

    def numel(p: torch.Tensor) -> int:
        return p.to_local().numel() if hasattr(p, "to_local") else p.numel()

    four_bit_local = sum(
        numel(p) for n, p in model.named_parameters() if "lora" not in n and p.dim() == 2 and p.shape[1] == 1
    )
    four_bit_full = sum(p.numel() for p in four_bit)

    torch.manual_seed(1)
    batch = torch.randint(0, 1000, (2, 48))
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    ref_loss = reference(input_ids=batch, labels=batch).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    worst, largest = 0.0, 0.0
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_B" in name:
            full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            worst = max(worst, (full.float() - ref_grads[name].float()).abs().max().item())
            largest = max(largest, ref_grads[name].float().abs().max().item())

    with torch.no_grad():  # a second pass reads the same weights: sharding lost nothing
        again = model(input_ids=batch, labels=batch).loss

    # bitsandbytes' optimizers are custom ops with no DTensor sharding rule: they cannot step
    # FSDP2's sharded parameters (hence config.validate: fsdp trains with adamw_torch).
    import bitsandbytes as bnb

    try:
        bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad]).step()
        bnb_error = ""
    except NotImplementedError as exc:
        bnb_error = str(exc).splitlines()[0]
    for m in (model, reference):
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2).step()
    with torch.no_grad():
        stepped, ref_stepped = (m(input_ids=batch, labels=batch).loss for m in (model, reference))
    tok = load_tokenizer(cfg)
    request = protocol.SampleRequest(
        prompt="What is 2 plus 3?", max_new_tokens=12, temperature=1.0, top_p=1.0
    )
    text = generate(model, tok, request, Emitter([]), seed=7).text
    texts: list[str | None] = [None] * ranks.world_size
    dist.all_gather_object(texts, text)
    ref_text = generate(reference, tok, request, Emitter([]), seed=7).text
    if ranks.is_main:
        print(
            json.dumps(
                {
                    "world_size": ranks.world_size,
                    "quant_storage": sorted(storage),
                    "four_bit_elements_full": four_bit_full,
                    "four_bit_elements_here": four_bit_local,
                    "loss": loss.item(),
                    "reference_loss": ref_loss.item(),
                    "second_pass_loss": again.item(),
                    "bnb_optimizer_error": bnb_error,
                    "loss_after_adamw_step": stepped.item(),
                    "reference_loss_after_adamw_step": ref_stepped.item(),
                    "lora_b_grad_max_diff": worst,
                    "lora_b_grad_max": largest,
                    "sample_texts": texts,
                    "reference_text": ref_text,
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
