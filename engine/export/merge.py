"""The merge itself, in an engine process: the base in 16-bit, the adapter applied, merged, saved,
and the saved folder checked against the unmerged model.

Why the tolerance is what it is. The merged model computes (W + s·BA)·x with W + s·BA rounded
once to the export dtype; base + adapter computes W·x + s·B(A·x), each product rounded on its own.
Both are the same model up to the dtype's rounding (bf16 keeps 8 significant bits, fp16 11), so
the check allows what that rounding does to this model's logits, and no more:
- where an fp32 copy of the model is cheap (memory.merge.fp32_reference_fits: up to 16 GiB), the
  check measures it: the largest difference between base + adapter in the export dtype and in
  fp32, on the same prompts. The merged model may differ from base + adapter by ROUNDING_FACTOR
  times that. Measured on the tiny model (CPU, 3 prompts of its data), the merged bf16 model was
  up to 2.0x as far from fp32 as base + adapter in bf16 was (0.50 against 0.25 after 400 steps,
  0.16 against 0.25 after 120), fp16 up to 1.8x; the difference the check sees, merged against
  base + adapter, was at most 2.3x (0.55);
- always, at least TOLERANCE of the largest |logit| (at least of 1): 5% in bf16, 1% in fp16.
  After 2 steps the tiny model's difference was 0.6% and 0.08% of its largest logit; after 400
  steps, with logits up to 5.4, the bf16 one was 10%: rounding grows as training sharpens a model,
  which is why the measured figure takes over where it can.
Both stay far below what a missing, mis-scaled or half-applied adapter changes (the adapter moves
the tiny model's logits by 5.8). The export reports the adapter's own effect too, and warns when
it is below the tolerance (then the check cannot tell the adapter from none).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import RunConfig
from engine.errors import UserError
from engine.memory.merge import CHECK_MAX_TOKENS, CHECK_PROMPTS

TOLERANCE = {"bf16": 0.05, "fp16": 0.01}  # of max(1, largest |logit|): see the module docstring
ROUNDING_FACTOR = 4.0  # times the dtype's own rounding of this model's logits, where measured

# Used only when the run's data cannot be read any more (moved, or a hub dataset offline).
FALLBACK_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
)


@dataclass
class Check:
    """The verification's figures."""

    max_logit_diff: float
    tolerance: float
    adapter_effect: float
    prompts: int
    tokens: int
    source: str  # "the run's data" or "fallback prompts (...)"
    basis: str = ""  # what set the tolerance (`tolerance` says)

    @property
    def passed(self) -> bool:
        return self.max_logit_diff <= self.tolerance


def tolerance(dtype: str, largest_logit: float, own_rounding: float | None = None) -> tuple[float, str]:
    """The check's tolerance and what set it: ROUNDING_FACTOR times the dtype's own rounding of
    this model's logits (measured against fp32; None where it was not), at least TOLERANCE of the
    largest logit."""
    relative = TOLERANCE[dtype] * max(1.0, largest_logit)
    basis = f"{TOLERANCE[dtype]:.0%} of the largest logit"
    if own_rounding is not None and ROUNDING_FACTOR * own_rounding > relative:
        return ROUNDING_FACTOR * own_rounding, (
            f"{ROUNDING_FACTOR:g} × {dtype}'s own rounding of these logits, {own_rounding:.3g} against fp32"
        )
    if own_rounding is not None:
        basis += f"; {dtype}'s own rounding, {own_rounding:.3g} against fp32, is smaller"
    return relative, basis


def device_label(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return f"cuda:0 ({torch.cuda.get_device_name(0)})"


def gpu_free_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(0)
    return free / 1024**3


def base_path(cfg: RunConfig, base: str | None) -> str:
    """The 16-bit model to merge into: --base, else the run's model. A pre-quantized (bnb-4bit)
    checkpoint has no 16-bit weights to merge into."""
    from engine.models import loading, tiny, tiny_build

    if base:
        return str(tiny_build.ensure_builtin(base)) if tiny.is_builtin(base) else base
    path = loading.resolve_model_path(cfg)
    if loading.is_prequantized(path, cfg):
        raise UserError(
            f"model.name_or_path {cfg.model.name_or_path!r} is a pre-quantized 4-bit checkpoint: "
            "merging into 4-bit weights would lose most of the adapter",
            "pass --base with its 16-bit original (e.g. the same model without -bnb-4bit)",
        )
    return path


def load_base(cfg: RunConfig, path: str, dtype: str, device: str, explicit_base: bool) -> Any:
    """The base model in 16-bit on `device`: never quantized, whatever the run trained on."""
    from transformers import AutoModelForCausalLM

    from engine.models.loading import torch_dtype

    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype(dtype),
            device_map={"": 0 if device == "cuda" else "cpu"},
            attn_implementation=cfg.model.attn_implementation,
            revision=None if explicit_base else cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except OSError as exc:
        field = "--base" if explicit_base else "model.name_or_path"
        raise UserError(
            f"{field}: cannot load {path!r}: {str(exc).splitlines()[0]}",
            "check the path or hub id (and your network / HF token for gated models)",
        ) from None


def load_tokenizer(cfg: RunConfig, source: Path, base: str) -> Any:
    """The adapter folder's tokenizer: it carries the chat template the run trained with."""
    from engine.models import loading

    return loading.load_tokenizer(cfg, str(source) if (source / "tokenizer_config.json").is_file() else base)


def _examples(cfg: RunConfig, limit: int) -> list[Any]:
    from engine.data.errors import BadRecords
    from engine.data.formats import Normalizer, local_examples, normalized
    from engine.data.sources import is_local

    d = cfg.data
    normalize = Normalizer(d.format, d.columns, d.system_prompt)
    # The first good records: a bad one is passed over (a run with data.bad_records: skip
    # trained without it; with stop, the run would not have started).
    bad = BadRecords("skip")
    if is_local(d.source):
        read = local_examples(d.source, normalize, bad)
    else:
        from engine.data.hub import read_hub

        read = normalized(read_hub(d.source, d.subset, d.split, d.revision), normalize, bad)
    out = []
    for _, example in read:
        out.append(example)
        if len(out) == limit:
            break
    return out


def check_prompts(cfg: RunConfig, tokenizer: Any) -> tuple[list[list[int]], str]:
    """Token ids of the first few examples of the run's data, rendered as training rendered them
    (whole conversations: the logits of answers are compared too), cut to CHECK_MAX_TOKENS."""
    from engine.data import DataError
    from engine.data.masking import encode
    from engine.data.templates import resolve_template

    cap = min(cfg.train.seq_len, CHECK_MAX_TOKENS)
    try:
        examples = _examples(cfg, CHECK_PROMPTS)
        template = (
            resolve_template(tokenizer, cfg.data.template)
            if any(e.kind == "chat" for e in examples)
            else None
        )
        ids = [e.input_ids[:cap] for e in encode(tokenizer, template, examples, responses_only=False)]
        ids = [i for i in ids if len(i) > 1]
        if ids:
            return ids, "the run's data"
        why = "no example of two tokens or more"
    except (DataError, UserError, OSError) as exc:
        why = str(exc)[:120]
    ids = []
    for prompt in FALLBACK_PROMPTS:
        if tokenizer.chat_template:
            out = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )
            ids.append(list(out["input_ids"])[:cap])
        else:
            ids.append(tokenizer(prompt)["input_ids"][:cap])
    return ids, f"fallback prompts ({why})"


def logits(model: Any, prompts: list[list[int]]) -> list[Any]:
    """Each prompt's logits, on the CPU in the model's dtype (kept for the comparison)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            batch = torch.tensor([ids], device=device)
            out.append(model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[0].to("cpu"))
    return out


def _max_abs_diff(x: Any, y: Any, rows: int = 16) -> float:
    """max |x - y| in fp32, a few positions at a time: a whole prompt's fp32 logits are
    tokens x vocabulary x 4 bytes (65 MB for Llama 3 at 128 tokens), and copies add up."""
    return max(
        float((x[i : i + rows].float() - y[i : i + rows].float()).abs().max()) for i in range(0, len(x), rows)
    )


def max_diff_to(model: Any, prompts: list[list[int]], reference: list[Any]) -> float:
    """The largest logit difference between `model` and the kept reference, prompt by prompt
    (only the reference is ever held whole)."""
    return max(
        _max_abs_diff(logits(model, [ids])[0], ref) for ids, ref in zip(prompts, reference, strict=True)
    )


def largest(values: list[Any], rows: int = 16) -> float:
    return max(float(v[i : i + rows].float().abs().max()) for v in values for i in range(0, len(v), rows))


def generation_config(model: Any, tokenizer: Any, template: str) -> list[int]:
    """Put the family's end-of-turn token (Llama 3's <|eot_id|>) among the model's eos ids, keeping
    the ones the base already stops on. Returns the ids set."""
    from engine.data.templates import end_of_turn_ids

    gen = model.generation_config
    ids = list(end_of_turn_ids(tokenizer, template))
    existing = gen.eos_token_id
    for i in existing if isinstance(existing, list) else [existing]:
        if i is not None and i not in ids:
            ids.append(i)
    gen.eos_token_id = ids if len(ids) > 1 else (ids[0] if ids else None)
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return ids


def release() -> None:
    """Collect what the caller deleted and give the GPU's cached blocks back."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gpu_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_reserved() / 1024**3 if torch.cuda.is_available() else None


def fp32_logits(
    cfg: RunConfig, base: str, adapter: Path, prompts: list[list[int]], explicit_base: bool
) -> list[Any]:
    """Base + adapter in fp32 on the CPU: the logits neither dtype's rounding touched. With SDPA
    attention whatever the run used: flash-attention kernels run neither fp32 nor on a CPU."""
    import dataclasses

    from peft import PeftModel

    on_cpu = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_implementation="sdpa"))
    model = load_base(on_cpu, base, "fp32", "cpu", explicit_base)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    out = logits(model, prompts)
    del model
    release()
    return out


def max_diff(xs: list[Any], ys: list[Any]) -> float:
    return max(_max_abs_diff(x, y) for x, y in zip(xs, ys, strict=True))


def reload(path: Path, dtype: str, device: str, trust_remote_code: bool = False) -> Any:
    """The exported folder, loaded the way a user will load it."""
    from transformers import AutoModelForCausalLM

    from engine.models.loading import torch_dtype

    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=torch_dtype(dtype),
        device_map={"": 0 if device == "cuda" else "cpu"},
        trust_remote_code=trust_remote_code,
    )
