"""The one vocabulary the console and the engine share: events (engine -> console) and commands
(console -> engine), one JSON object per line.

Every message is a frozen, tagged msgspec Struct whose `type` field names it. New fields always get
defaults, and decoders ignore fields they do not know, so an older console can read a newer
engine's stream within the same major version. The engine's first line is a `hello` carrying
PROTOCOL_VERSION; a reader refuses a different major version (`check_hello`).

Strict JSON has no NaN or infinity, and a diverging loss is exactly when a user needs to see one:
non-finite floats travel as the strings "NaN", "Infinity" and "-Infinity" and decode back to floats.

This module imports only msgspec and the standard library: the console imports it without torch.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import msgspec

# 1.1: the `exported` event and the export stages; 1.2: stage progress (unit, rate, ETA), "downloading";
# 1.3: hello's compute dtype and why, model_ready's repo, commit and quantization, the "evaluating"
# stage (eval progress), the estimate's checkpointing plan; 1.4: hello's process start (where a
# start went), the estimate's FLOPs per token and the card's peak (utilisation); 1.5: model_ready's
# batch split (train.batch_split); 1.6: checkpoint_saved's `kept` (the checkpoints rotation left),
# exported's tolerance_basis, data_ready's format and template; 1.7: data_ready's skipped (bad
# records left out, data.bad_records: skip)
PROTOCOL_VERSION = "1.7"


class ProtocolError(ValueError):
    """A line that is not a message of this protocol (bad JSON, unknown type, wrong field types)."""


class Message(msgspec.Struct, frozen=True, tag_field="type", kw_only=True, omit_defaults=False):
    """Base of every event and command. `time` is seconds since the epoch, set by the sender."""

    time: float = 0.0


# ---------------------------------------------------------------------------------------------
# Events: engine -> console
# ---------------------------------------------------------------------------------------------

Stage = Literal[
    "starting",
    "downloading",  # model or dataset files from the hub (bytes)
    "loading_model",
    "quantizing",
    "preparing_data",
    "training",
    "evaluating",  # the eval split, batch by batch (current/total)
    "saving",
    "sampling",
    "finishing",
    "merging",  # export: the adapter folded into the 16-bit base weights
    "verifying",  # export: the written folder reloaded and its logits compared
    "converting",  # export: llama.cpp's GGUF conversion
]


class Hello(Message, frozen=True, tag="hello"):
    """First line of every engine process: who is talking, and about which run."""

    protocol: str = PROTOCOL_VERSION
    engine_version: str = ""
    run_id: str = ""
    pid: int = 0
    mode: Literal["train", "resume", "sample", "export", "pull"] = "train"
    resumed_from: str | None = None  # checkpoint directory name when mode == "resume"
    backend: str = ""  # the backend the run will use ("hf", "unsloth")
    backend_reason: str = ""  # why that one (for "auto")
    device: str = ""  # "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"; "2 x cuda (NCCL, ddp)" for several
    world_size: int = 1  # engine processes training together (torchrun); rank 0 sends the events
    trust_remote_code: bool = False  # the model's own Python code runs (the user confirmed it)
    compute_dtype: str = ""  # what the matmuls run in: bf16, fp16 or fp32 (quant.compute_dtype resolved)
    compute_dtype_reason: str = ""  # why ("auto: this CPU has no native bf16 ...")
    started: float = 0.0  # when the engine process started (epoch seconds; 0: unknown)


class StageEvent(Message, frozen=True, tag="stage"):
    """A long phase began or progressed; `total` 0 means the length is unknown.

    Long work (downloads, data preparation) reports progress with the same event: `current` of
    `total` in `unit`, the measured `rate` in units per second and the `eta_s` it implies. Senders
    throttle these (a few per second at most); readers show the latest.
    """

    stage: Stage
    message: str = ""
    current: int = 0
    total: int = 0
    unit: str = ""  # what current/total count: "B" (bytes), "examples", "steps", ...; "" = items
    rate: float | None = None  # units per second, measured over the recent past
    eta_s: float | None = None  # seconds left at that rate; None when unknown


class ModelReady(Message, frozen=True, tag="model_ready"):
    total_params: int = 0
    trainable_params: int = 0
    quantized: bool = True
    memory_allocated_gb: float | None = None  # torch allocator, after load (CUDA only)
    memory_reserved_gb: float | None = None
    host_rss_gb: float | None = None  # resident memory of the engine process
    load_seconds: float = 0.0
    layers: int = 0  # decoder layers of the model
    checkpointed_layers: int = 0  # how many of them recompute their activations in backward
    checkpoint_reason: str = ""  # why that many (train.gradient_checkpointing, the memory budget)
    micro_batch: int = 0  # the rows of one step as the run splits them (0: an engine before 1.5)
    grad_accum: int = 0
    split_reason: str = ""  # why, where train.batch_split is auto and re-split the written rows
    kernels: list[str] = []  # optional fused kernels in use (e.g. "liger: rms_norm, swiglu, rope")
    repo: str = ""  # the hub repo the weights came from ("" for a local folder or the built-in model)
    commit: str = ""  # the commit of `repo` that was loaded: pinned at the run's start, reused on resume
    quantization: str = ""  # the weights as loaded: "4-bit NF4 + double quant, bf16 compute", ...


class MemoryTerm(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    gb: float
    parts: dict[str, float] = {}


class EstimateEvent(Message, frozen=True, tag="estimate"):
    """The memory-budget model's answer for this run's config, sent once at start."""

    terms: list[MemoryTerm] = []
    torch_peak_gb: float = 0.0  # what max_memory_reserved should show
    device_total_gb: float = 0.0  # what nvidia-smi should show
    budget_gb: float | None = None
    verdict: str = ""  # fits / tight / does_not_fit
    gpu: str = ""
    checkpoint_reason: str = ""  # the checkpointing plan these figures are for, in words
    flops_per_token: float = 0.0  # the work of one trained token (engine.memory.flops); 0: unknown
    peak_tflops: float = 0.0  # the card's dense 16-bit tensor peak (presets/gpus.yaml); 0: unknown


class DataReady(Message, frozen=True, tag="data_ready"):
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0  # tokens per epoch after templating and truncation
    trained_tokens: int = 0  # of which carry a loss (responses only)
    truncated: int = 0
    dropped: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    format: str = ""  # the rows' format as read: data.format, or what auto detected ("": before 1.6)
    template: str = ""  # the chat template rendered (a family, or "tokenizer"); "" for text or tokens
    skipped: int = 0  # bad records left out (data.bad_records: skip)


class DeviceStat(msgspec.Struct, frozen=True, kw_only=True):
    """One rank's device at a logged step, when several processes train together."""

    rank: int
    device: str = ""  # "cuda:1", "cpu"
    memory_allocated_gb: float | None = None  # torch allocator (CUDA only)
    memory_peak_reserved_gb: float | None = None
    memory_used_gb: float | None = None  # NVML: the whole device, CUDA context included
    utilization_pct: float | None = None  # NVML: share of the last sample period a kernel ran
    host_rss_gb: float | None = None  # resident memory of the rank's process (a CPU rank's memory)


class Step(Message, frozen=True, tag="step"):
    """One logged optimizer step. Values come from the device only at logging steps."""

    step: int
    total_steps: int = 0
    epoch: float = 0.0
    loss: float = math.nan
    lr: float = 0.0
    grad_norm: float | None = None
    tokens_seen: int = 0
    tokens_per_s: float = 0.0
    step_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    eta_seconds: float | None = None
    memory_allocated_gb: float | None = None
    memory_reserved_gb: float | None = None
    memory_peak_allocated_gb: float | None = None
    memory_peak_reserved_gb: float | None = None
    host_rss_gb: float | None = None
    devices: list[DeviceStat] = []  # every rank's device (runs on several GPUs/processes), rank order


class Eval(Message, frozen=True, tag="eval"):
    step: int
    loss: float = math.nan
    perplexity: float | None = None


class CheckpointSaved(Message, frozen=True, tag="checkpoint_saved"):
    step: int
    path: str
    seconds: float = 0.0
    size_mb: float = 0.0
    # The steps of every checkpoint on disk once this save rotated the oldest out
    # (train.save_total_limit); None from an engine before 1.6, which did not say.
    kept: tuple[int, ...] | None = None


class SampleStarted(Message, frozen=True, tag="sample_started"):
    request_id: str = ""
    prompt: str = ""
    source: str = "live"  # "live" or the checkpoint name
    step: int | None = None


class SampleToken(Message, frozen=True, tag="sample_token"):
    """A piece of streamed text (one or more tokens, decoded)."""

    request_id: str = ""
    text: str = ""


class Sample(Message, frozen=True, tag="sample"):
    """The finished sample."""

    request_id: str = ""
    prompt: str = ""
    text: str = ""
    source: str = "live"
    step: int | None = None
    new_tokens: int = 0
    seconds: float = 0.0
    stopped_by: str = ""  # "eos" or "max_new_tokens"


class Log(Message, frozen=True, tag="log"):
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str = ""
    source: str = "engine"


class WarningEvent(Message, frozen=True, tag="warning"):
    message: str = ""
    hint: str = ""


class ErrorEvent(Message, frozen=True, tag="error"):
    """A failure the user can act on. `kind` is stable for programs; `hint` says what to do."""

    kind: str = "internal"  # config, data, model, out_of_memory, nan_loss, disk_full, internal, ...
    message: str = ""
    hint: str = ""
    step: int | None = None
    advice: list[str] = []  # the memory calculator's ranked suggestions, for out_of_memory


class Finished(Message, frozen=True, tag="finished"):
    status: Literal["completed", "stopped", "failed"]
    step: int = 0
    last_checkpoint: str | None = None
    adapter_path: str | None = None
    final_loss: float | None = None
    elapsed_seconds: float = 0.0


class Exported(Message, frozen=True, tag="exported"):
    """An export finished: the folder written (renamed into place whole, never half-written)."""

    out_dir: str
    kind: Literal["merged", "adapter"] = "merged"
    source: str = ""  # the adapter folder exported: "adapter" (the final one) or "checkpoint-N"
    step: int | None = None
    files: list[str] = []  # names relative to out_dir
    size_mb: float = 0.0
    dtype: str = ""  # bf16 / fp16 for merged weights; the adapter's own for adapter-only
    device: str = ""  # where the merge ran ("cpu", "cuda:0 (...)")
    max_logit_diff: float | None = None  # largest |exported - (base + adapter)| over the check prompts
    tolerance: float | None = None  # the largest difference the check accepts
    tolerance_basis: str = (
        ""  # what set it (engine/export/merge.py: the dtype's measured rounding, or a share)
    )
    adapter_effect: float | None = None  # largest |(base + adapter) - base|: what the check can detect
    prompts: int = 0  # prompts (from the run's data) the check compared
    tokens: int = 0  # tokens over those prompts
    eos_token_ids: list[int] = []  # generation_config.json's eos_token_id
    gguf_path: str | None = None
    gguf_note: str = ""  # why the GGUF file asked for is missing (the converter failed)
    peak_gpu_gb: float | None = None  # torch's peak reserved during the merge (CUDA only)
    peak_host_gb: float | None = None  # the engine process's peak resident memory
    estimate_gb: float | None = None  # what the memory model said the merge needs where it ran
    seconds: float = 0.0


Event = Union[  # noqa: UP007 - msgspec wants a real Union of tagged types
    Hello,
    StageEvent,
    ModelReady,
    EstimateEvent,
    DataReady,
    Step,
    Eval,
    CheckpointSaved,
    SampleStarted,
    SampleToken,
    Sample,
    Log,
    WarningEvent,
    ErrorEvent,
    Finished,
    Exported,
]

# ---------------------------------------------------------------------------------------------
# Commands: console -> engine (stdin or the run's control FIFO)
# ---------------------------------------------------------------------------------------------


class Stop(Message, frozen=True, tag="stop"):
    """Finish the current optimizer step, save a checkpoint, exit cleanly."""

    save: bool = True


class Save(Message, frozen=True, tag="save"):
    """Save a checkpoint at the next step boundary and keep training."""


# The bounds a sample's settings are checked against, by `qlc sample` and the console alike.
MAX_NEW_TOKENS_LIMIT = 4096
TEMPERATURE_LIMIT = 5.0


class SampleRequest(Message, frozen=True, tag="sample"):
    """Generate from the live model at the next step boundary, then keep training."""

    prompt: str
    request_id: str = ""
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    system: str | None = None


Command = Union[Stop, Save, SampleRequest]  # noqa: UP007

# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
# strict=False turns the strings "NaN"/"Infinity"/"-Infinity" back into floats.
_event_decoder = msgspec.json.Decoder(Event, strict=False)
_command_decoder = msgspec.json.Decoder(Command, strict=False)


def _nonfinite_to_str(msg: Message) -> Message:
    changes = {}
    for name in msg.__struct_fields__:
        value = getattr(msg, name)
        if isinstance(value, float) and not math.isfinite(value):
            changes[name] = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return msgspec.structs.replace(msg, **changes) if changes else msg


def encode(msg: Message) -> bytes:
    """One message as one line of JSON, newline included."""
    return _encoder.encode(_nonfinite_to_str(msg)) + b"\n"


# What else a decoder can raise on hostile input: a str with lone surrogates cannot be encoded
# to UTF-8 (UnicodeEncodeError), and a str/bytes is all it accepts (TypeError).
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, TypeError)


def decode_event(line: bytes | str) -> Event:
    try:
        return _event_decoder.decode(line)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"not an engine event: {exc}") from None


def decode_lines(data: bytes, keep_unreadable: bool = False) -> list[Event]:
    """The events of complete JSON lines, decoded a whole buffer at a time (one call instead of one
    per line: opening a 100,000-step run spends its time here). A line that is not an event (an
    event type from a newer engine, a line torn by a crash, a library printing to stdout) is
    skipped, or with `keep_unreadable` kept as a debug log line; the rest still decode."""
    try:
        return _event_decoder.decode_lines(data)
    except _DECODE_ERRORS:
        pass
    events: list[Event] = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            events.append(decode_event(line))
        except ProtocolError:
            if keep_unreadable:
                text = line.decode("utf-8", "replace")[:200]
                events.append(Log(level="debug", message=text, source="stdout"))
    return events


def decode_command(line: bytes | str) -> Command:
    try:
        return _command_decoder.decode(line)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"not a command: {exc}") from None


def check_hello(hello: Hello) -> None:
    """Refuse a peer whose protocol major version differs from ours."""
    ours, theirs = PROTOCOL_VERSION.split(".")[0], hello.protocol.split(".")[0]
    if ours != theirs:
        raise ProtocolError(
            f"engine speaks protocol {hello.protocol}, this console speaks {PROTOCOL_VERSION}: "
            "install matching versions of qlora-console"
        )
