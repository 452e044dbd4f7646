"""Sample from a saved checkpoint or the final adapter: base model (quantized as in training) +
the adapter's safetensors, through the run's chat template."""

from __future__ import annotations

from pathlib import Path

from engine import protocol
from engine.errors import UserError
from engine.run import runs
from engine.run.events import Emitter
from engine.run.pins import load_pinned


def sample_checkpoint(
    run_dir: Path, checkpoint: str | None, request: protocol.SampleRequest, emitter: Emitter
) -> int:
    from peft import PeftModel

    from engine.models.loading import load_tokenizer, resolve_model_path
    from engine.train.backends import choose_device, hf
    from engine.train.sampling import generate

    cfg = load_pinned(run_dir)  # the base at the commit the run trained on (engine/run/pins.py)
    adapter = runs.resolve_adapter(run_dir, checkpoint)
    if not (adapter / "adapter_model.safetensors").is_file():
        # peft would fall back to a pickled adapter_model.bin: load safetensors or nothing.
        raise UserError(f"{adapter}: no adapter_model.safetensors", "only safetensors adapters are loaded")
    emitter.emit(
        protocol.StageEvent(
            stage="loading_model", message=f"loading {cfg.model.name_or_path} + {adapter.name}"
        )
    )
    device = choose_device(cfg)
    path = resolve_model_path(cfg)
    # The checkpoint's tokenizer carries the chat template the run trained with.
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(cfg, str(adapter) if has_tokenizer else path)
    model = hf.load_model(cfg, device, path)
    # Adapters are read from safetensors only; PeftModel never unpickles anything here.
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    step = (
        int(adapter.name.removeprefix(runs.CHECKPOINT_PREFIX))
        if adapter.name.startswith(runs.CHECKPOINT_PREFIX)
        else None
    )
    emitter.emit(protocol.StageEvent(stage="sampling", message="generating"))
    generate(
        model, tokenizer, request, emitter, source=adapter.name, step=step, template=cfg.data.template,
        chat=trained_on_chats(run_dir, cfg.data.format),
    )  # fmt: skip
    return 0


def trained_on_chats(run_dir: Path, data_format: str) -> bool:
    """Whether the run rendered its rows through a chat template (engine.run.runs.chat_rows)."""
    events, _ = runs.read_events(run_dir)
    ready = next((e for e in reversed(events) if isinstance(e, protocol.DataReady)), None)
    return runs.chat_rows(ready, data_format)
