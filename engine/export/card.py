"""The model card (README.md of an exported folder): what the model is, how it was trained, on what
data, how well, and how this folder was produced and checked. Built from the run's resolved
config and its events file, nothing re-typed.

Pure Python (engine.versions reads versions from metadata: no library is imported to read its version).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine import __version__, protocol, versions
from engine.config import RunConfig
from engine.data.templates import family_of
from engine.export.request import ExportRequest
from engine.run import runs

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "safetensors")


@dataclass(frozen=True)
class RunRecord:
    """What the events file says about a run, up to the exported step."""

    status: str
    total_steps: int
    train_loss: tuple[int, float] | None  # (step, loss) of the last logged step at or before the export
    eval_loss: tuple[int, float] | None
    data: protocol.DataReady | None


def read_record(run_dir: Path, step: int | None) -> RunRecord:
    """`step` None means the final adapter: the run's last values. A resumed run repeats steps
    after its checkpoint; the later value of a step is the one the checkpoint continued from."""
    events, _ = runs.read_events(run_dir)
    losses: dict[int, float] = {}
    evals: dict[int, float] = {}
    data = None
    total = 0
    for ev in events:
        if isinstance(ev, protocol.Step):
            losses[ev.step] = ev.loss
            total = ev.total_steps or total
        elif isinstance(ev, protocol.Eval):
            evals[ev.step] = ev.loss
        elif isinstance(ev, protocol.DataReady):
            data = ev
            total = ev.total_steps or total

    def last(values: dict[int, float]) -> tuple[int, float] | None:
        upto = [s for s in values if step is None or s <= step]
        return (max(upto), values[max(upto)]) if upto else None

    status = runs.summarize(run_dir).status
    return RunRecord(status, total, last(losses), last(evals), data)


def library_versions() -> dict[str, str]:
    return {"qlora-console": __version__, **versions.installed(LIBRARIES)}


@dataclass
class CardFacts:
    """What the export itself learned, for the card."""

    files: list[str] = field(default_factory=list)
    device: str = ""
    eos_token_ids: list[int] = field(default_factory=list)
    end_of_turn: str | None = None
    max_logit_diff: float | None = None
    tolerance: float | None = None
    tolerance_basis: str = ""
    adapter_effect: float | None = None
    prompts: int = 0
    tokens: int = 0
    gguf_file: str | None = None
    gguf_type: str | None = None
    chat_template: str | None = None
    """The exported tokenizer's chat template: the run saves the one it rendered the data with beside
    every checkpoint, so None means no template was used."""
    adapter_base: str | None = None
    """adapter_config.json's base_model_name_or_path: what peft loads the adapter onto."""


def _loss(value: tuple[int, float] | None, step: int | None) -> str:
    if value is None:
        return "none logged" + (f" by step {step}" if step is not None else "")
    step, loss = value
    return f"{loss:.4f} at step {step}" if math.isfinite(loss) else f"{loss} at step {step}"


def _base_for_hub(name: str) -> str | None:
    """A hub id for the card's metadata; local paths and built-in models are not hub ids."""
    if name.startswith(("builtin:", "/", ".", "~")) or Path(name).exists() or name.count("/") != 1:
        return None
    return name


def _use_code(merged: bool, facts: CardFacts, chats: bool = True) -> list[str]:
    """The card's code: load the folder, prompt it as the run trained (a chat turn, or text to
    continue), print the answer. Written for transformers 5, where apply_chat_template returns a
    BatchEncoding, not a tensor."""
    if merged:
        lines = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH", dtype="auto")',
        ]
    else:
        lines = [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            'model = AutoPeftModelForCausalLM.from_pretrained("PATH")',
        ]
    lines.append('tokenizer = AutoTokenizer.from_pretrained("PATH")')
    if chats and facts.chat_template is not None:
        lines += [
            "inputs = tokenizer.apply_chat_template(",
            '    [{"role": "user", "content": "Hello"}],',
            '    add_generation_prompt=True, return_dict=True, return_tensors="pt",',
            ")",
        ]
    else:  # trained on text (or without a template, where apply_chat_template would raise)
        lines.append('inputs = tokenizer("Hello", return_tensors="pt")')
    # A merged folder's generation_config.json stops at the end of a turn; peft loads the base's.
    stops = f", eos_token_id={facts.eos_token_ids}" if not merged and facts.eos_token_ids else ""
    return [
        *lines,
        f"output = model.generate(**inputs, max_new_tokens=64{stops})",
        "# generate returns the prompt and the answer: decode the answer",
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]


NOT_RECORDED = "not recorded"


def _dataset(cfg: RunConfig, d: protocol.DataReady | None, chat_template: str | None) -> list[str]:
    """What the data was, as the run recorded it: never a setting that left the choice to the run.
    data_ready says which format auto detected and which template rendered it (protocol 1.6); for
    an older run only a pinned data.format and the template saved with the checkpoint tell."""
    if d is not None and d.format:
        fmt = d.format
        template = {"": "none", "tokenizer": "the tokenizer's own"}.get(d.template, d.template)
    else:
        fmt = cfg.data.format  # a pinned format is what every row was read as: a row that does not fit fails
        if not runs.chat_rows(None, fmt) or chat_template is None:
            template = "none"  # the run saves the template it renders with beside every checkpoint
        elif fmt != "auto":
            template = family_of(chat_template) or "the tokenizer's own"
        else:
            template = f"{NOT_RECORDED} (chosen when the run started)"
    lines = [
        f"- format: {fmt if fmt != 'auto' else NOT_RECORDED + ' (detected when the run started)'}",
        f"- chat template: {template}",
    ]
    if d is None:
        lines += [f"- loss on: {NOT_RECORDED}", f"- examples and tokens: {NOT_RECORDED}"]
    elif d.trained_tokens >= d.train_tokens:
        lines.append("- loss on every token")
    else:
        # Only two things leave a token without a loss: data.responses_only masking what is not an
        # answer, and the labels pre-tokenized data brings.
        what = (
            "responses only" if cfg.data.responses_only and fmt != "tokens" else "the tokens the data labels"
        )
        lines.append(
            f"- loss on {what}: {d.trained_tokens:,} of {d.train_tokens:,} tokens "
            f"({d.trained_tokens / d.train_tokens:.0%})"
        )
    if d is not None:
        lines.append(
            f"- {d.train_examples} train / {d.eval_examples} eval examples, {d.train_tokens:,} tokens per "
            f"epoch, {d.truncated} truncated, {d.dropped} dropped"
        )
    if cfg.data.packing:
        lines.append(f"- packed into rows of {cfg.train.seq_len} tokens")
    return lines


def render(request: ExportRequest, cfg: RunConfig, record: RunRecord, facts: CardFacts) -> str:
    base = request.base or cfg.model.name_or_path
    merged = not request.adapter_only
    hub_base = _base_for_hub(base)
    meta: dict[str, object] = {
        "library_name": "transformers" if merged else "peft",
        "pipeline_tag": "text-generation",
        "tags": ["qlora-console", "lora", "qlora", *(["merged"] if merged else [])],
    }
    if hub_base:
        meta["base_model"] = hub_base
    source = "the final adapter" if request.step is None else f"the checkpoint at step {request.step}"
    step = request.step if request.step is not None else (record.train_loss or (0, 0.0))[0]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    lines.append(f"# {request.run_dir.name} ({'merged' if merged else 'LoRA adapter'})")
    lines.append("")
    if merged:
        lines.append(
            f"A QLoRA fine-tune of `{base}`: {source} of run `{request.run_dir.name}`, merged into the "
            f"base model's 16-bit weights and saved in {request.dtype}. It loads like any transformers "
            "model, with no peft needed."
        )
    else:
        lines.append(
            f"The LoRA adapter of a QLoRA fine-tune of `{base}`: {source} of run "
            f"`{request.run_dir.name}`, as trained. Load it with peft on top of the base model."
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        *_use_code(merged, facts, runs.chat_rows(record.data, cfg.data.format)),
        "```",
        "",
    ]
    if not merged and facts.adapter_base and _base_for_hub(facts.adapter_base) is None:
        # A local base (a folder, or a built-in model built on the training machine) is named by
        # its path there: the code above runs only where that path exists.
        lines += [
            f"`adapter_config.json` names the base model by its folder on the machine that trained it "
            f"(`{facts.adapter_base}`), so the code runs there; elsewhere, set its "
            "`base_model_name_or_path` to where that model is.",
            "",
        ]
    if facts.end_of_turn and facts.eos_token_ids:
        ids = ", ".join(str(i) for i in facts.eos_token_ids)
        lines.append(
            f"The model ends its turn with `{facts.end_of_turn}`: "
            + (
                f"it is among generation_config.json's `eos_token_id` ({ids}), so generation stops at "
                "the end of the answer."
                if merged
                else f"the code passes it to generate (`eos_token_id=[{ids}]`) so generation stops at the "
                "end of the answer: peft loads the base's generation config, which may not stop there."
            )
        )
        lines.append("")
    if facts.gguf_file:
        lines += [
            f"`{facts.gguf_file}` is the same model in GGUF ({facts.gguf_type}), for llama.cpp, Ollama and LM Studio:",
            "",
            f"    llama-cli -m {facts.gguf_file} -cnv",
            "",
        ]
    lines += [
        "## Base model",
        "",
        f"- `{base}`" + (f" (revision {cfg.model.revision})" if cfg.model.revision else ""),
    ]
    if request.base:
        lines.append(f"- trained on `{cfg.model.name_or_path}`, merged into `{request.base}`")
    lines += [
        f"- trained on 4-bit {cfg.quant.quant_type.upper()} weights (QLoRA); merged into the 16-bit weights"
        if merged
        else f"- trained on 4-bit {cfg.quant.quant_type.upper()} weights (QLoRA)",
        "",
        "## Training",
        "",
        f"- run `{request.run_dir.name}` (preset `{cfg.name}`), status {record.status}",
        f"- exported: {source}, step {step}" + (f" of {record.total_steps}" if record.total_steps else ""),
        f"- LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout} on "
        f"{', '.join(cfg.lora.target_modules)}"
        + (f"; full copies of {', '.join(cfg.lora.modules_to_save)}" if cfg.lora.modules_to_save else ""),
        f"- lr {cfg.train.lr:g} ({cfg.train.scheduler}), {cfg.train.optimizer}, effective batch "
        f"{cfg.effective_batch} × seq {cfg.train.seq_len}",
        f"- final train loss: {_loss(record.train_loss, request.step)}",
        f"- final eval loss: {_loss(record.eval_loss, request.step)}",
        "",
        "## Dataset",
        "",
        f"- source: `{cfg.data.source}`"
        + (f" (split {cfg.data.split})" if cfg.data.split != "train" else ""),
        *_dataset(cfg, record.data, facts.chat_template),
    ]
    lines += ["", "## How this folder was made", ""]
    versions = library_versions()
    lines.append(
        f"- `qlc export {request.run_dir.name} --checkpoint {request.checkpoint_ref}"
        + (" --adapter-only" if request.adapter_only else f" --dtype {request.dtype}")
        + (f" --gguf {request.gguf}" if request.gguf else "")
        + f"` on {time.strftime('%Y-%m-%d %H:%M %Z')}"
        + (f", merged on {facts.device}" if merged and facts.device else "")
    )
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if merged and facts.max_logit_diff is not None:
        lines.append(
            f"- checked: this folder, reloaded, against the base + adapter unmerged on {facts.prompts} prompts "
            f"of the run's data ({facts.tokens} tokens): largest logit difference {facts.max_logit_diff:.4g} "
            f"(tolerance {facts.tolerance:.4g}{': ' + facts.tolerance_basis if facts.tolerance_basis else ''}); "
            "the adapter itself moves logits by up to "
            f"{facts.adapter_effect:.4g}"
        )
    elif not merged:
        lines.append("- checked: the adapter's files are byte-identical to the run's")
    lines += ["", "## Resolved config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
