"""Examples -> token ids and labels: render through the chat template, tokenize, mask.

With responses_only, labels are -100 everywhere except on each assistant turn's content and its
end-of-turn token, on every turn of a multi-turn conversation (render.py finds those character
spans). Tokens are then labelled by their character offsets: a token is trained when it overlaps
a trained span.

The first token of every example is never a label: nothing before it predicts it, and in a packed
row the token before it belongs to another example.

Tokens stay in numpy arrays (int32), a batch of examples at a time: `Encoder.encode` returns one
`EncodedBatch` holding every example of the batch back to back. A fast tokenizer is driven through
its Rust backend (`encode_batch`, the call transformers itself makes), so no Python int is made per
token. `encode` keeps the per-example lists for callers that want them (export's check prompts,
tests).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.data.encoded import IGNORE, Encoded
from engine.data.errors import DataError, at
from engine.data.formats import Example
from engine.data.render import Renderer, Span, jinja_renderer, tokenizer_renderer
from engine.data.templates import ChatTemplate

__all__ = ["IGNORE", "Encoded", "EncodedBatch", "Encoder", "EncoderSpec", "encode", "label_mask"]


@dataclass
class EncodedBatch:
    """Examples back to back: example i is ids[starts[i]:starts[i] + lengths[i]]."""

    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    """int64, one per example: its full length (before any truncation)."""
    trained: np.ndarray
    """int64, one per example: labels that are not -100 among labels[1:window]."""
    where: list[str]
    chats: int = 0
    """How many of the examples are conversations (they need the chat template)."""

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.lengths)[:-1])).astype(np.int64)

    def examples(self) -> list[Encoded]:
        return [
            Encoded(where, self.ids[s : s + n].tolist(), self.labels[s : s + n].tolist())
            for where, s, n in zip(self.where, self.starts.tolist(), self.lengths.tolist(), strict=True)
        ]


def label_mask(offsets: np.ndarray, spans: list[Span]) -> np.ndarray:
    """Which tokens to train: those overlapping a span. `offsets` is (tokens, 2) character offsets.

    Any overlap counts: a token that straddles the start of an answer (" Hello" after "[/INST]")
    carries answer text and must be learned; a zero-width token counts when it sits inside a span.
    Tokens are matched to spans in order: each against the first span ending after the furthest
    start seen so far (offsets of byte-level tokens never go backwards; this keeps the result the
    same if some tokenizer's did)."""
    trained = np.zeros(len(offsets), dtype=bool)
    if not spans or not len(offsets):
        return trained
    bounds = np.asarray(spans, dtype=np.int64)
    a, b = offsets[:, 0], offsets[:, 1]
    k = np.searchsorted(bounds[:, 1], np.maximum.accumulate(a), side="right")
    inside = k < len(bounds)
    s = bounds[np.minimum(k, len(bounds) - 1), 0]
    e = bounds[np.minimum(k, len(bounds) - 1), 1]
    trained[:] = inside & (((b > s) & (a < e)) | ((a == b) & (s <= a) & (a < e)))
    return trained


def _byte_alphabet() -> set[str]:
    """The 256 characters byte-level BPE writes bytes as (GPT-2's bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {chr(b) for b in keep} | {chr(256 + n) for n in range(len(extra))}


def _trims_offsets(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("trim_offsets") is True or any(_trims_offsets(v) for v in node.values())
    if isinstance(node, list):
        return any(_trims_offsets(v) for v in node)
    return False


def byte_lengths(backend_json: str) -> np.ndarray | None:
    """How many bytes of the text each token id stands for, when that is fixed by the id: a
    byte-level BPE (Llama 3, Qwen, GPT-2 style) with no normalizer, no prefix space added, no
    offset trimming and no added token that swallows whitespace. Then a token's character
    offsets follow from the ids alone, and the tokenizer can skip tracking them (its faster
    `encode_batch_fast`). None for any other tokenizer: its offsets are asked for."""
    state = json.loads(backend_json)
    model = state.get("model") or {}
    if state.get("normalizer") is not None or model.get("type") != "BPE" or model.get("byte_fallback"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    pre = state.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" for p in parts):
        return None
    for p in parts:
        if p.get("type") == "ByteLevel" and p.get("add_prefix_space"):
            return None
        if p.get("type") not in ("ByteLevel", "Split", "Digits", "Punctuation"):
            return None
    if _trims_offsets(state.get("post_processor")):
        return None
    added = state.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    size = max([*vocab.values(), *(t["id"] for t in added), -1]) + 1
    table = np.zeros(size, dtype=np.int64)
    alphabet = _byte_alphabet()
    for token, i in vocab.items():
        if not alphabet.issuperset(token):
            return None
        table[i] = len(token)
    for t in added:
        table[t["id"]] = len(t["content"].encode("utf-8"))
    return table


def _byte_positions(text: str) -> np.ndarray:
    """Where each character starts in the UTF-8 bytes (and the total, last)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate(([0], np.cumsum(widths)))


@dataclass
class EncoderSpec:
    """Everything an encoder needs, picklable: a tokenizing worker process builds its own from it."""

    backend_json: str | None
    """The fast tokenizer's tokenizer.json (its Rust backend), None for a slow tokenizer."""
    split_special_tokens: bool
    template: ChatTemplate | None
    template_error: DataError | None
    """Why no template resolved: raised at the first conversation (plain text needs none)."""
    variables: dict[str, Any]
    """The template's variables: the tokenizer's special tokens, as apply_chat_template passes them."""
    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    responses_only: bool
    window: int
    """train.seq_len: `EncodedBatch.trained` counts the labels that survive truncation to it."""
    markers: bool | None = None
    """Force (or forbid) the {% generation %} path; None: use it when the template has markers."""
    offsets_from_ids: bool = True
    """Derive token offsets from the ids where the tokenizer allows it (byte_lengths); False asks
    the tokenizer for them always (tests compare the two)."""

    @classmethod
    def of(
        cls,
        tokenizer: Any,
        template: ChatTemplate | None,
        responses_only: bool,
        window: int,
        template_error: DataError | None = None,
    ) -> EncoderSpec:
        backend = (
            getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        )
        return cls(
            backend_json=backend.to_str() if backend is not None else None,
            split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)),
            template=template,
            template_error=template_error,
            variables=dict(tokenizer.special_tokens_map),
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            vocab_size=len(tokenizer),
            responses_only=responses_only,
            window=window,
        )


def _backend(backend_json: str, split_special_tokens: bool) -> Any:
    """A private copy of the Rust tokenizer, set up as transformers sets it for a plain call."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend_json)
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = split_special_tokens
    return backend


class Encoder:
    """Encodes batches of examples. Built from a spec (in a worker) or a live tokenizer (in process:
    a slow tokenizer, which has no backend to copy, is then called directly)."""

    def __init__(self, spec: EncoderSpec, tokenizer: Any = None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.backend = _backend(spec.backend_json, spec.split_special_tokens) if spec.backend_json else None
        self.widths = byte_lengths(spec.backend_json) if spec.backend_json and spec.offsets_from_ids else None
        self.renderer: Renderer | None = None
        if spec.template is not None:
            render = jinja_renderer(spec.template, spec.variables)
            if render is None:
                if tokenizer is None:
                    raise RuntimeError("no chat template renderer in this process")
                render = tokenizer_renderer(tokenizer, spec.template)
            self.renderer = Renderer(spec.template, render, spec.markers)
        if self.backend is None and tokenizer is None:
            raise RuntimeError("a slow tokenizer encodes only in the process that loaded it")

    # -- tokenizing ----------------------------------------------------------------------------

    def _ids(self, texts: list[str]) -> list[np.ndarray]:
        if self.backend is not None:
            encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        return [
            np.asarray(ids, dtype=np.int32)
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ]

    def _ids_and_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]] | None:
        if self.backend is not None:
            out = []
            for e in self.backend.encode_batch(texts, add_special_tokens=False):
                ids = np.asarray(e.ids, dtype=np.int32)
                flat = itertools.chain.from_iterable(e.offsets)
                out.append((ids, np.fromiter(flat, dtype=np.int64, count=2 * len(ids)).reshape(-1, 2)))
            return out
        try:
            batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a slow tokenizer has no offsets
            return None
        return [
            (np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
            for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"], strict=True)
        ]

    def _pieces(self, text: str, spans: list[Span]) -> tuple[np.ndarray, np.ndarray]:
        """A slow tokenizer: tokenize the trained and untrained pieces one by one."""
        ids: list[int] = []
        labels: list[int] = []
        cursor = 0
        for s, e in [*spans, (len(text), len(text))]:
            for piece, trained in ((text[cursor:s], False), (text[s:e], True)):
                if piece:
                    piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    labels += (
                        piece_ids if (trained or not self.spec.responses_only) else [IGNORE] * len(piece_ids)
                    )
            cursor = e
        return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)

    # -- examples --------------------------------------------------------------------------------

    def _labelled(self, rendered: list[tuple[str, list[Span]]]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Ids and labels with offsets taken from the ids (see byte_lengths); None for a text whose
        token widths do not add up to its length (the caller asks the tokenizer instead)."""
        assert self.backend is not None and self.widths is not None
        table = self.widths
        encodings = self.backend.encode_batch_fast([text for text, _ in rendered], add_special_tokens=False)
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for (text, spans), e in zip(rendered, encodings, strict=True):
            ids = np.asarray(e.ids, dtype=np.int32)
            if ids.size and int(ids.max()) >= len(table):
                out.append(None)
                continue
            widths = table[ids]
            ends = np.cumsum(widths)
            if text.isascii():
                total, byte_spans = len(text), spans
            else:
                starts = _byte_positions(text)
                total = int(starts[-1])
                byte_spans = [(int(starts[a]), int(starts[b])) for a, b in spans]
            if (int(ends[-1]) if ids.size else 0) != total or (ids.size and not widths.all()):
                out.append(None)
                continue
            offsets = np.stack((ends - widths, ends), axis=1)
            out.append(
                (ids, np.where(label_mask(offsets, byte_spans), ids, np.int32(IGNORE)).astype(np.int32))
            )
        return out

    def _chats(self, chats: list[Example]) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.renderer is None:
            if self.spec.template_error is not None:
                raise self.spec.template_error
            raise at(chats[0].where, "a conversation needs a chat template", "set data.template")
        rendered = [self.renderer.spans(ex) for ex in chats]
        if not self.spec.responses_only:
            return [(ids, ids.copy()) for ids in self._ids([text for text, _ in rendered])]
        fast: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(rendered)
        if self.widths is not None:
            fast = self._labelled(rendered)
        missing = [i for i, got in enumerate(fast) if got is None]
        if not missing:
            return fast  # type: ignore[return-value]
        texts = [rendered[i][0] for i in missing]
        encoded = self._ids_and_offsets(texts)
        for j, i in enumerate(missing):
            text, spans = rendered[i]
            if encoded is None:
                fast[i] = self._pieces(text, spans)
            else:
                ids, offsets = encoded[j]
                fast[i] = (ids, np.where(label_mask(offsets, spans), ids, np.int32(IGNORE)).astype(np.int32))
        return fast  # type: ignore[return-value]

    def _texts(self, texts: list[Example]) -> list[tuple[np.ndarray, np.ndarray]]:
        bos, eos = self.spec.bos_id, self.spec.eos_id
        head = np.asarray([bos] if bos is not None else [], dtype=np.int32)
        tail = np.asarray([eos] if eos is not None else [], dtype=np.int32)
        out = []
        for ids in self._ids([ex.text or "" for ex in texts]):
            ids = np.concatenate((head, ids, tail))
            out.append((ids, ids.copy()))
        return out

    def _tokens(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        ids = ex.input_ids or []
        vocab = self.spec.vocab_size
        if max(ids) >= vocab:
            raise at(
                ex.where,
                f"input_ids holds token id {max(ids)}, beyond this tokenizer's {vocab} tokens",
                "tokenize with the model's tokenizer",
            )
        labels = ex.labels if ex.labels is not None else ids
        bad = next((x for x in labels if x != IGNORE and not 0 <= x < vocab), None)
        if bad is not None:
            raise at(
                ex.where, f"labels holds {bad}: neither -100 (not trained) nor a token id of this tokenizer"
            )
        return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)

    def encode(self, examples: list[Example]) -> EncodedBatch:
        """Every example of the batch, in order."""
        chats = [ex for ex in examples if ex.kind == "chat"]
        texts = [ex for ex in examples if ex.kind == "text"]
        chat_out = iter(self._chats(chats) if chats else [])
        text_out = iter(self._texts(texts) if texts else [])
        ids_parts, label_parts = [], []
        lengths = np.zeros(len(examples), dtype=np.int64)
        trained = np.zeros(len(examples), dtype=np.int64)
        for i, ex in enumerate(examples):
            if ex.kind == "chat":
                ids, labels = next(chat_out)
            elif ex.kind == "text":
                ids, labels = next(text_out)
            else:
                ids, labels = self._tokens(ex)
            if len(labels):
                labels[0] = IGNORE
            lengths[i] = len(ids)
            trained[i] = int(np.count_nonzero(labels[1 : self.spec.window] != IGNORE))
            ids_parts.append(ids)
            label_parts.append(labels)
        return EncodedBatch(
            ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32),
            labels=np.concatenate(label_parts) if label_parts else np.zeros(0, dtype=np.int32),
            lengths=lengths,
            trained=trained,
            where=[ex.where for ex in examples],
            chats=len(chats),
        )


def encode(
    tokenizer: Any,
    template: ChatTemplate | None,
    examples: list[Example],
    responses_only: bool,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 512,
) -> list[Encoded]:
    """Every example -> ids and labels (Python lists), in order."""
    encoder = Encoder(EncoderSpec.of(tokenizer, template, responses_only, window=0), tokenizer)
    out: list[Encoded] = []
    for first in range(0, len(examples), batch_size):
        out += encoder.encode(examples[first : first + batch_size]).examples()
        if progress:
            progress(len(out), len(examples))
    return out


def spec_digest(spec: EncoderSpec) -> dict[str, Any]:
    """What in a spec decides the tokens (for the cache key): not the padding or truncation a
    tokenizer.json may carry, nor the pad token (padding happens at batch time)."""
    backend = None
    if spec.backend_json is not None:
        state = json.loads(spec.backend_json)
        state.pop("truncation", None)
        state.pop("padding", None)
        backend = json.dumps(state, sort_keys=True)
    template = spec.template.source if spec.template is not None else None
    variables = {k: v for k, v in spec.variables.items() if template is not None and k in template}
    return {
        "backend": backend,
        "split_special_tokens": spec.split_special_tokens,
        "template": [spec.template.name, spec.template.family, template] if spec.template else None,
        "template_error": spec.template_error.message if spec.template_error else None,
        "variables": variables,
        "bos_id": spec.bos_id,
        "eos_id": spec.eos_id,
        "vocab_size": spec.vocab_size,
        "responses_only": spec.responses_only,
        "window": spec.window,
    }


# -- tokenizing worker processes (engine/data/build.py starts them) ---------------------------------

_WORKER: Encoder | None = None


def init_worker(spec: EncoderSpec) -> None:
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _WORKER
    _WORKER = Encoder(spec)


def encode_in_worker(examples: list[Example]) -> EncodedBatch:
    assert _WORKER is not None, "init_worker was not called"
    return _WORKER.encode(examples)
