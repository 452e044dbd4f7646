"""The transformers + peft + trl + bitsandbytes backend, tuned.

What differs from the usual QLoRA recipe, and why (figures: shared/anchors.md, H100, 8B):
- No `prepare_model_for_kbit_training`. It casts embeddings, lm_head and norms to fp32 (+1.96 GiB)
  and makes the residual stream fp32; skipping it saved 5.3 GiB of peak and 24% of step time.
  Gradient checkpointing and input gradients are enabled directly instead.
- Non-reentrant gradient checkpointing, on only as many layers as the memory budget needs
  (engine.train.backends.checkpointing), SDPA attention.
- TRL's SFTTrainer scores the loss with its fused, chunked LM head: full fp32 logits are never built.
- Liger's fused RMSNorm, SwiGLU and RoPE kernels when liger-kernel is installed and a CUDA GPU
  trains (they save fewer activations and launch fewer kernels); Liger's own loss is left out, as
  TRL's chunked loss already avoids the logits.
"""

from __future__ import annotations

from typing import Any

from engine.config import RunConfig
from engine.errors import UserError
from engine.models import quantization
from engine.models.loading import model_config, resolve_model_path, torch_dtype, with_compute_dtype
from engine.run.distributed import Ranks
from engine.train.backends import parallel
from engine.train.backends.base import Backend, lora_settings
from engine.train.backends.checkpointing import CheckpointPlan, keep_last_layers


def load_model(cfg: RunConfig, device: str, path: str | None = None, ranks: Ranks = Ranks()) -> Any:
    """The base model, 4-bit as `quant.*` says (or as the checkpoint is already quantized), on
    `device` (this rank's GPU; engine/train/backends/parallel.py says where for each strategy).
    A multimodal checkpoint (Gemma 3 4B/12B/27B) loads whole, its vision tower quantized and frozen:
    adapters and checkpointing address its text decoder only."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = path or resolve_model_path(cfg)
    cfg, _why = with_compute_dtype(cfg, device)
    compute = torch_dtype(cfg.quant.compute_dtype)
    kwargs: dict[str, Any] = {
        "dtype": compute,
        "device_map": parallel.placement(cfg, device, ranks),
        "attn_implementation": cfg.model.attn_implementation,
        "revision": cfg.model.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    config = model_config(path, cfg)
    ckpt = quantization.of_config(config)
    quantization.check_request(cfg, ckpt, "hf")
    prequantized = ckpt is not None
    parallel.check_prequantized(cfg, ranks, prequantized)
    asked = quantization.requested(cfg.quant, cfg.quant.compute_dtype, sharded=parallel.sharded(cfg, ranks))
    if asked is not None and not prequantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(**quantization.bnb_kwargs(asked, torch_dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(
            f"model.name_or_path: cannot load {path!r}: {str(exc).splitlines()[0]}",
            "check the hub id or local path (and your network / HF token for gated models)",
        ) from None
    if prequantized:
        set_compute_dtype(model, compute)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def set_compute_dtype(model: Any, dtype: Any) -> None:
    """A pre-quantized checkpoint's 4-bit layers compute in the dtype its config saved: make them
    compute in the run's instead (quant.compute_dtype is honoured whatever the checkpoint says)."""
    for module in model.modules():
        if module.__class__.__name__ == "Linear4bit":
            module.compute_dtype = dtype


LIGER_KERNELS = ("rope", "rms_norm", "swiglu")


def apply_kernels(model: Any, cfg: RunConfig, device: str) -> list[str]:
    """Patch the model with Liger's kernels where they run; returns what was applied, for the events."""
    import importlib.util

    if device != "cuda" or not cfg.train.liger or importlib.util.find_spec("liger_kernel") is None:
        return []
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    flags = dict.fromkeys(LIGER_KERNELS, True)
    _apply_liger_kernel_to_instance(
        model=model, cross_entropy=False, fused_linear_cross_entropy=False, **flags
    )
    return [f"liger: {', '.join(LIGER_KERNELS)}"]


def apply_lora(model: Any, cfg: RunConfig, checkpointing: CheckpointPlan, ranks: Ranks = Ranks()) -> Any:
    import peft

    settings = lora_settings(cfg, model)  # checks the targets against the model's text decoder
    if checkpointing.enabled and not parallel.sharded(cfg, ranks):  # FSDP checkpoints its own way
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With a frozen base, the embeddings' output needs requires_grad or checkpointed blocks
        # would have no graph to recompute into.
        model.enable_input_require_grads()
        keep_last_layers(model, checkpointing)
    return peft.get_peft_model(model, peft.LoraConfig(**settings, task_type="CAUSAL_LM"))


class HfBackend(Backend):
    name = "hf"

    def load_model(self, cfg: RunConfig, path: str, device: str, plan: CheckpointPlan, ranks: Ranks) -> Any:
        return load_model(cfg, device, path, ranks=ranks)

    def apply_kernels(self, model: Any, cfg: RunConfig, device: str) -> list[str]:
        return apply_kernels(model, cfg, device)

    def apply_lora(self, model: Any, cfg: RunConfig, plan: CheckpointPlan, ranks: Ranks) -> Any:
        return apply_lora(model, cfg, plan, ranks=ranks)


BACKEND = HfBackend()
