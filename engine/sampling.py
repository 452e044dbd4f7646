"""Generate text from the live model (between optimizer steps) or from a saved checkpoint,
streaming the reply as `sample_token` events.

The prompt goes through the same chat template the model was trained with, and generation stops
at the family's end-of-turn token (Llama 3's <|eot_id|>), not only at end-of-text.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from engine import protocol
from engine.events import Emitter


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    for token in ("<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if tid is not None:
            ids.append(tid)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def prompt_ids(tokenizer: Any, request: protocol.SampleRequest) -> list[int]:
    messages = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": request.prompt})
    if tokenizer.chat_template:
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
) -> protocol.Sample:
    """Generate one reply and stream it; the model is left in the mode it was in."""
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

    ids = prompt_ids(tokenizer, request)
    device = next(p.device for p in model.parameters())
    inputs = torch.tensor([ids], device=device)
    stops = stop_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
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
