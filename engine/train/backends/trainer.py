"""The trainer every backend trains with: TRL's SFTTrainer (which Unsloth patches in place) with the
engine's atomic checkpoints, non-finite loss guard, fault hooks and exact token count
(engine.train.backends.safe_trainer), and its arguments, read from the run config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import RunConfig
from engine.run.distributed import Ranks
from engine.train.backends import parallel


def training_args(
    cfg: RunConfig,
    output_dir: Path,
    device: str,
    has_eval: bool,
    gradient_checkpointing: bool,
    distributed: dict[str, Any] | None = None,
) -> Any:
    """`gradient_checkpointing` tells the Trainer to (re)enable it at train time; a backend that
    sets it up itself (Unsloth) passes False, as a bare Unsloth script does."""
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

    from engine.train.backends.lean_optimizer import drop_lean_zero_grad, lean_bnb_step, lean_zero_grad
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

        def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
            """The Trainer's optimizer; a bitsandbytes 8-bit one on CUDA with less host time per
            parameter (engine.train.backends.lean_optimizer: the same updates), and the model's
            zero_grad over the optimizer's parameters alone (lean_zero_grad)."""
            optimizer = super().create_optimizer(*args, **kwargs)
            lean_bnb_step(self.optimizer)
            # The model the optimizer was built for: the one passed (a delayed FSDP wrap), else ours.
            model = args[0] if args else kwargs.get("model")
            lean_zero_grad(model if model is not None else self.model, self.optimizer)
            return optimizer

        def train(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().train(*args, **kwargs)
            finally:
                drop_lean_zero_grad(self.model)
                if self.model_wrapped is not None and self.model_wrapped is not self.model:
                    drop_lean_zero_grad(self.model_wrapped)

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
    trainer = _trainer_class()(
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
    if cfg.quant.compute_dtype == "fp32":
        # TRL casts a quantized model's adapters to bf16 whatever the run computes in: an fp32 run
        # (a CPU without native bf16, engine.models.dtypes) would then run every LoRA matmul in
        # emulated bf16. Its adapters train in fp32, like the rest of its step.
        import torch

        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    return trainer
