"""The hf backend on several GPUs (or CPU processes): where each rank loads the model, and what
the trainer is told about DDP or FSDP.

- ddp: every rank loads the whole 4-bit model on its own GPU (device_map {"": local_rank});
  accelerate wraps it in DistributedDataParallel and all-reduces the LoRA gradients.
- fsdp: FSDP-QLoRA as transformers and PEFT document it: bitsandbytes stores the 4-bit weights in
  the compute dtype (`bnb_4bit_quant_storage`: what quant.storage auto means under FSDP,
  engine.models.quantization), so FSDP can shard them like any bf16 tensor; FSDP2
  (transformers' default) wraps each decoder layer. Ranks load on the CPU and `fully_shard` moves
  each layer to the GPU as it shards it, so no GPU ever holds the whole model. The optimizer is
  torch's AdamW (config.validate): bitsandbytes' optimizers cannot step sharded (DTensor) weights.

Checkpoints are written as full state dicts (LoRA weights and optimizer state gathered on rank 0),
so a run can resume on another number of processes.
"""

from __future__ import annotations

from typing import Any

from engine.config import RunConfig
from engine.errors import UserError
from engine.run.distributed import Ranks


def sharded(cfg: RunConfig, ranks: Ranks) -> bool:
    return ranks.distributed and cfg.hardware.strategy == "fsdp"


def placement(cfg: RunConfig, device: str, ranks: Ranks) -> Any:
    """from_pretrained's device_map for this rank."""
    if device != "cuda" or sharded(cfg, ranks):
        return {"": "cpu"}
    return {"": ranks.local_rank}


def check_prequantized(cfg: RunConfig, ranks: Ranks, prequantized: bool) -> None:
    if prequantized and sharded(cfg, ranks):
        raise UserError(
            f"model.name_or_path: {cfg.model.name_or_path} is already quantized (its 4-bit weights are "
            "stored as uint8), and FSDP can only shard weights stored in the compute dtype",
            "use the original (16-bit) model, which is quantized on load, or hardware.strategy=ddp",
        )


def layer_classes(model: Any) -> list[str]:
    """The decoder layer classes FSDP wraps one unit each (Llama: LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    found = sorted(names & present)
    if not found:
        raise UserError(
            f"hardware.strategy: fsdp cannot find {cfg_name(model)}'s decoder layers to shard",
            "use hardware.strategy=ddp",
        )
    return found


def cfg_name(model: Any) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def trainer_args(cfg: RunConfig, device: str, ranks: Ranks, model: Any) -> dict[str, Any]:
    """SFTConfig arguments for a distributed run ({} for one process)."""
    if not ranks.distributed:
        return {}
    args: dict[str, Any] = {
        "ddp_backend": "gloo" if device == "cpu" else "nccl",
        # Every LoRA weight takes part in every step: no search for unused parameters.
        "ddp_find_unused_parameters": False,
    }
    if sharded(cfg, ranks):
        args["fsdp"] = True
        # FSDP's own activation checkpointing wraps each decoder layer; transformers' would
        # all-gather every layer's weights once more in the backward pass.
        args["gradient_checkpointing"] = False
        args["fsdp_config"] = {
            # FSDP checkpoints every layer or none: any checkpointing asked for (auto, N) means all.
            "activation_checkpointing": cfg.train.gradient_checkpointing is not False
            and cfg.train.gradient_checkpointing != 0,
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layer_classes(model),
            # Gathered on rank 0 when saving: the adapter and optimizer state are small, and a
            # full state dict resumes on any number of GPUs (a sharded one only on the same).
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True,
            # 4-bit weights cannot be built on the meta device and broadcast: every rank loads.
            "cpu_ram_efficient_loading": False,
        }
    return args


def load_optimizer_on_cpu_ranks(trainer: Any, checkpoint: str | None) -> bool:
    """Resume a multi-process CPU run's optimizer and scheduler; False leaves it to transformers.

    transformers loads a distributed run's optimizer state with map_location=args.device, which
    on gloo CPU ranks reads "cpu:0", a location torch.load cannot restore to. Every rank holds the
    same full state (DDP), so it is read onto the CPU as a single process does.
    """
    import os

    import torch

    args = trainer.args
    if checkpoint is None or args.world_size == 1 or args.device.type != "cpu":
        return False
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return False
    optimizer = os.path.join(checkpoint, "optimizer.pt")
    scheduler = os.path.join(checkpoint, "scheduler.pt")
    if not (os.path.isfile(optimizer) and os.path.isfile(scheduler)):
        return False
    trainer.optimizer.load_state_dict(torch.load(optimizer, map_location="cpu", weights_only=True))
    trainer.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
    return True
