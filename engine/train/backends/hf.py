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

import json
from pathlib import Path
from typing import Any

from engine.config import RunConfig
from engine.errors import UserError
from engine.run.distributed import Ranks
from engine.train.backends import parallel
from engine.train.backends.checkpointing import CheckpointPlan, keep_last_layers

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, DTYPES[name])


def resolve_model_path(cfg: RunConfig) -> str:
    from engine.models import tiny, tiny_build

    name = cfg.model.name_or_path
    if tiny.is_builtin(name):
        return str(tiny_build.ensure_builtin(name))
    return name


def _is_prequantized(path: str, cfg: RunConfig) -> bool:
    """`...-bnb-4bit` checkpoints carry their own quantization_config: load them as they are."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return "quantization_config" in json.loads(config_file.read_text())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    return getattr(config, "quantization_config", None) is not None


def load_tokenizer(cfg: RunConfig, path: str | None = None) -> Any:
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except OSError as exc:
        raise UserError(
            f"model.name_or_path: cannot load a tokenizer from {path!r}: {str(exc).splitlines()[0]}",
            "check the hub id or local path (and your network / HF token for gated models)",
        ) from None
    if tok.pad_token is None:
        # Llama 3 has no pad token; its reserved fine-tune pad token exists for exactly this.
        pad = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in tok.get_vocab() else tok.eos_token
        tok.pad_token = pad
    tok.padding_side = "right"
    return tok


def load_model(cfg: RunConfig, device: str, path: str | None = None, ranks: Ranks = Ranks()) -> Any:
    """The base model, 4-bit NF4 (or as the checkpoint is already quantized), on `device` (this
    rank's GPU; engine/train/backends/parallel.py says where for each strategy)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = path or resolve_model_path(cfg)
    q = cfg.quant
    compute = torch_dtype(q.compute_dtype)
    kwargs: dict[str, Any] = {
        "dtype": compute,
        "device_map": parallel.placement(cfg, device, ranks),
        "attn_implementation": cfg.model.attn_implementation,
        "revision": cfg.model.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    prequantized = _is_prequantized(path, cfg)
    parallel.check_prequantized(cfg, ranks, prequantized)
    if q.load_in_4bit and not prequantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute,
            **parallel.quant_storage(cfg, ranks, compute),
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(
            f"model.name_or_path: cannot load {path!r}: {str(exc).splitlines()[0]}",
            "check the hub id or local path (and your network / HF token for gated models)",
        ) from None
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


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

    lo = cfg.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lo.target_modules if m not in present]
    if missing:
        raise UserError(
            f"lora.target_modules: {', '.join(missing)} not found in this model",
            f"its linear layers include {', '.join(sorted(m for m in present if m.endswith('proj'))[:10])}",
        )
    if checkpointing.enabled and not parallel.sharded(cfg, ranks):  # FSDP checkpoints its own way
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With a frozen base, the embeddings' output needs requires_grad or checkpointed blocks
        # would have no graph to recompute into.
        model.enable_input_require_grads()
        keep_last_layers(model, checkpointing)
    lora = peft.LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.target_modules),
        modules_to_save=list(lo.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


def count_params(model: Any) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        # bitsandbytes packs two 4-bit values per byte: count logical parameters.
        n = p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def training_args(
    cfg: RunConfig,
    output_dir: Path,
    device: str,
    has_eval: bool,
    gradient_checkpointing: bool,
    distributed: dict[str, Any] | None = None,
) -> Any:
    """`gradient_checkpointing` tells the Trainer to (re)enable it at train time; the Unsloth
    backend sets it up itself and passes False, as a bare Unsloth script does."""
    from trl import SFTConfig

    t = cfg.train
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if t.eval_steps else "epoch"
    args: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.micro_batch,
        per_device_eval_batch_size=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        bf16=cfg.quant.compute_dtype == "bf16",
        fp16=cfg.quant.compute_dtype == "fp16",
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        # The default replaces a NaN step loss with the running average: a diverged run would log
        # finite losses and keep saving NaN weights. Log what the step computed.
        logging_nan_inf_filter=False,
        # Count tokens (SafeTrainerMixin._track_num_input_tokens) and log num_input_tokens_seen.
        include_num_input_tokens_seen="non_padding",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps or None,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=t.seq_len,
        use_cpu=device == "cpu",
    )
    args.update(distributed or {})  # DDP / FSDP settings win (engine/train/backends/parallel.py)
    return SFTConfig(**args)


def _trainer_class() -> type:
    from trl import SFTTrainer

    from engine.train.backends.safe_trainer import SafeTrainerMixin

    class EngineTrainer(SafeTrainerMixin, SFTTrainer):
        """SFTTrainer with atomic checkpoints, a non-finite loss guard and fault hooks
        (SafeTrainerMixin), that resumes at the precision it trained in.

        TRL casts a quantized model's LoRA weights to bf16 when the trainer is built; resuming,
        transformers reloads the adapter with peft's default fp32 upcast, so a resumed run would
        train at another precision (and size) than the run it continues. Restore each trainable
        weight's dtype after the reload, before the optimizer is built around it.
        """

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            target = model if model is not None else self.model
            dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for name, param in target.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if not parallel.load_optimizer_on_cpu_ranks(self, checkpoint):
                super()._load_optimizer_and_scheduler(checkpoint)

    return EngineTrainer


def build_trainer(
    model: Any,
    tokenizer: Any,
    cfg: RunConfig,
    data: Any,
    output_dir: Path,
    device: str,
    callbacks: list[Any],
    trainer_checkpointing: bool,
    ranks: Ranks = Ranks(),
) -> Any:
    distributed = parallel.trainer_args(cfg, device, ranks, model)
    return _trainer_class()(
        model=model,
        args=training_args(
            cfg, output_dir, device, data.eval is not None, trainer_checkpointing, distributed=distributed
        ),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
