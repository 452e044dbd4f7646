"""Generate text from the live model (between optimizer steps) or from a saved checkpoint,
streaming the reply as `sample_token` events.

The prompt goes through the same chat template the model was trained with, and generation stops
at the family's end-of-turn token (Llama 3's <|eot_id|>), not only at end-of-text. A run that
trained on plain text (data format text or tokens) continues the prompt as written instead: its
adapter never saw a chat turn.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from engine import protocol
from engine.run.events import Emitter


def stop_token_ids(tokenizer: Any, model: Any, template: str = "auto") -> list[int]:
    """What ends a reply: the template family's end-of-turn token (Llama 3's <|eot_id|>), the
    tokenizer's end of sequence, and whatever the model's generation config lists."""
    from engine.data.templates import end_of_turn_ids

    ids = list(end_of_turn_ids(tokenizer, template))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    return sorted({i for i in ids if i is not None})


def _restore_training_layout(model: Any) -> None:
    """On a CPU, bitsandbytes repacks a 4-bit weight for its inference kernel the first time an
    eval-mode forward runs without gradients, and training then runs another kernel on it. Undo
    the repacking so that a live sample never changes the numbers training produces."""
    try:
        from bitsandbytes.nn import modules as bnb_modules
    except ImportError:
        return
    inverse = getattr(bnb_modules, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        return
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if isinstance(module, bnb_modules.Linear4bit) and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = inverse(weight.data, state)


def prompt_ids(tokenizer: Any, request: protocol.SampleRequest, chat: bool = True) -> list[int]:
    messages = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": request.prompt})
    if chat and tokenizer.chat_template:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])
    return tokenizer(request.prompt)["input_ids"]


def generate(
    model: Any,
    tokenizer: Any,
    request: protocol.SampleRequest,
    emitter: Emitter,
    source: str = "live",
    step: int | None = None,
    template: str = "auto",
    seed: int | None = None,
    chat: bool = True,
) -> protocol.Sample:
    """Generate one reply and stream it; the model is left in the mode it was in. `tokenizer` must
    carry the chat template the model was trained with; `template` names its family. With `seed`,
    the draws come from that seed and leave the training RNG as it was (FSDP ranks, which must
    all draw the same tokens). `chat` False: the prompt is continued as plain text."""
    import contextlib

    import torch
    from transformers import TextStreamer

    request_id = request.request_id or uuid.uuid4().hex[:8]
    emitter.emit(
        protocol.SampleStarted(request_id=request_id, prompt=request.prompt, source=source, step=step)
    )

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emitter.emit(protocol.SampleToken(request_id=request_id, text=text))

    ids = prompt_ids(tokenizer, request, chat)
    device = next(p.device for p in model.parameters())
    inputs = torch.tensor([ids], device=device)
    stops = stop_token_ids(tokenizer, model, template)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    rng: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if seed is not None:
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    try:
        with torch.no_grad(), rng:
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=request.max_new_tokens,
                do_sample=request.temperature > 0,
                temperature=request.temperature if request.temperature > 0 else None,
                top_p=request.top_p if request.temperature > 0 else None,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                streamer=_Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            )
    finally:
        if was_training:
            _restore_training_layout(model)
            model.train()
    new = out[0, len(ids) :].tolist()
    stopped_by = "eos" if new and new[-1] in stops else "max_new_tokens"
    sample = protocol.Sample(
        request_id=request_id,
        prompt=request.prompt,
        text=tokenizer.decode(new, skip_special_tokens=True),
        source=source,
        step=step,
        new_tokens=len(new),
        seconds=time.perf_counter() - t0,
        stopped_by=stopped_by,
    )
    emitter.emit(sample)
    return sample
