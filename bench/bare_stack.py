"""A bare training script, without qlora-console: what a user would write by hand. The baseline
the engine's overhead is measured against (bench/compare_stacks.py runs it in its own process).

    python bench/bare_stack.py --stack trl-usual|trl-tuned|unsloth --model DIR --data FILE --out JSON

- trl-usual: the usual QLoRA tutorial: BitsAndBytesConfig NF4, peft's
  prepare_model_for_kbit_training, get_peft_model, TRL SFTTrainer (shared/anchors.md row 1).
- trl-tuned: the same without prepare_model_for_kbit_training (gradient checkpointing and input
  gradients enabled directly), with Liger's RMSNorm/SwiGLU/RoPE kernels when installed, and with
  the CUDA allocator's expandable segments: the settings the engine's hf backend uses, so the two
  differ only by the engine.
- unsloth: FastLanguageModel.from_pretrained + get_peft_model(use_gradient_checkpointing=
  "unsloth"), TRL SFTTrainer as Unsloth patches it (anchors.md row 5). Unsloth turns on
  expandable segments and, on a Hopper GPU, padding-free batches by itself.

Same recipe for all: LoRA r=32 alpha=64 on all seven projections, paged 8-bit AdamW, bf16,
gradient checkpointing, SDPA, pre-tokenized rows of seq_len tokens. Records the time from process
start to the end of the first optimizer step, every step's duration and loss, and PyTorch's peaks.
"""

from __future__ import annotations

import time

T_START = time.time()  # before any heavy import: launch-to-first-step counts the imports too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stack", choices=["trl-usual", "trl-tuned", "unsloth"], required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--r", type=int, default=32)
    args = ap.parse_args()

    if args.stack == "trl-tuned":
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # before torch
    if args.stack == "unsloth":
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        import unsloth  # noqa: F401  (first, as Unsloth requires)
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t_load = time.time()
    if args.stack == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(args.model), max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=True
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=args.r,
            lora_alpha=2 * args.r,
            lora_dropout=0.0,
            target_modules=ALL,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=3407,
            max_seq_length=args.seq,
        )
        kernels = "unsloth"
    else:
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(
            str(args.model),
            dtype=torch.bfloat16,
            device_map={"": 0},
            attn_implementation="sdpa",
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        )
        model.config.use_cache = False
        kernels = "none"
        if args.stack == "trl-usual":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        else:
            import importlib.util

            if importlib.util.find_spec("liger_kernel") is not None:
                from liger_kernel.transformers import _apply_liger_kernel_to_instance

                _apply_liger_kernel_to_instance(
                    model=model,
                    rope=True,
                    rms_norm=True,
                    swiglu=True,
                    cross_entropy=False,
                    fused_linear_cross_entropy=False,
                )
                kernels = "liger: rope, rms_norm, swiglu"
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=ALL, task_type="CAUSAL_LM"
            ),
        )
    load_seconds = time.time() - t_load
    tok = AutoTokenizer.from_pretrained(str(args.model))
    ds = load_dataset("json", data_files=str(args.data), split="train")

    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            torch.cuda.synchronize()
            self.t0 = time.time()

        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            steps.append({"step": state.global_step, "end": time.time(), "seconds": time.time() - self.t0})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = float(logs["loss"])

    config = SFTConfig(
        output_dir="/tmp/bare-out",
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        optim="paged_adamw_8bit",
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        max_length=args.seq,
        packing=False,
        seed=42,
        dataloader_num_workers=0,
        # Unsloth sets checkpointing up itself; the TRL stacks let the Trainer enable it.
        gradient_checkpointing=args.stack != "unsloth",
        gradient_checkpointing_kwargs={"use_reentrant": args.stack == "trl-usual"},
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=ds, processing_class=tok, callbacks=[Timer()]
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = [s["seconds"] for s in steps if s["step"] > 2]
    median = statistics.median(steady)
    tokens = args.seq * args.micro_batch * args.grad_accum
    result = {
        "stack": args.stack,
        "kernels": kernels,
        "launch_to_first_step_seconds": steps[0]["end"] - T_START,
        "load_seconds": load_seconds,
        "median_step_seconds": median,
        "tokens_per_second": tokens / median,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "losses": [[s["step"], s.get("loss")] for s in steps],
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))


if __name__ == "__main__":
    main()
