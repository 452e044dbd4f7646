"""Fuzzing the two parsers that read what others wrote: the protocol decoders (a line from an engine
or a console) and the preset loader (a file, and `--set` overrides). Whatever the input, they
return a value or raise their own error type (ProtocolError; UserError), never anything else."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import msgspec
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from engine import protocol
from engine.config import load_preset
from engine.errors import UserError

FUZZ = settings(max_examples=300, deadline=None, database=None)
SLOW_FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# Every code point, lone surrogates included (a str holding one cannot be encoded to UTF-8).
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=200)

EVENT_TAGS = [t.__struct_config__.tag for t in protocol.Event.__args__]
COMMAND_TAGS = [t.__struct_config__.tag for t in protocol.Command.__args__]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "", "nan"])
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _decodes_or_refuses(decode, data: bytes | str) -> None:
    with contextlib.suppress(protocol.ProtocolError):
        decode(data)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes(data: bytes) -> None:
    _decodes_or_refuses(protocol.decode_event, data)
    _decodes_or_refuses(protocol.decode_command, data)


@FUZZ
@given(any_text)
def test_any_text(data: str) -> None:
    _decodes_or_refuses(protocol.decode_event, data)
    _decodes_or_refuses(protocol.decode_command, data)


@FUZZ
@given(
    st.sampled_from(EVENT_TAGS + COMMAND_TAGS + ["", "hello!", "Step"]),
    st.dictionaries(
        st.sampled_from(["step", "loss", "time", "status", "message", "advice", "terms", "prompt", "save"])
        | st.text(max_size=8),
        json_values,
        max_size=6,
    ),
)
def test_messages_with_any_fields(tag: str, fields: dict) -> None:
    line = json.dumps({"type": tag, **fields})
    _decodes_or_refuses(protocol.decode_event, line)
    _decodes_or_refuses(protocol.decode_command, line)


@FUZZ
@given(st.data())
def test_real_messages_with_one_field_broken(data: st.DataObject) -> None:
    """A valid event, one field replaced by any JSON value, the line maybe cut short."""
    sample = data.draw(
        st.sampled_from(
            [
                protocol.Step(step=3, loss=1.5, grad_norm=0.2),
                protocol.Finished(status="failed", step=9, last_checkpoint="checkpoints/checkpoint-8"),
                protocol.ErrorEvent(kind="out_of_memory", message="x", advice=["a"]),
                protocol.EstimateEvent(terms=[protocol.MemoryTerm(name="w", gb=1.0, parts={"a": 1.0})]),
                protocol.Hello(run_id="r", pid=1),
                protocol.SampleRequest(prompt="hi"),
            ]
        )
    )
    obj = json.loads(protocol.encode(sample))
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(json_values)
    line = json.dumps(obj).encode()
    line = line[: data.draw(st.integers(min_value=0, max_value=len(line)))]
    _decodes_or_refuses(protocol.decode_event, line)
    _decodes_or_refuses(protocol.decode_command, line)


@FUZZ
@given(st.floats(), st.floats() | st.none())
def test_any_float_round_trips(loss: float, grad: float | None) -> None:
    """NaN and infinity included: a diverging loss reaches the console as what it is."""
    ev = protocol.decode_event(protocol.encode(protocol.Step(step=1, loss=loss, grad_norm=grad)))
    assert isinstance(ev, protocol.Step)
    assert msgspec.json.encode(ev.loss) == msgspec.json.encode(loss) or (loss != loss and ev.loss != ev.loss)


# ---------------------------------------------------------------------------------------------
# The preset loader
# ---------------------------------------------------------------------------------------------

SECTIONS = {
    "model": ["name_or_path", "arch", "revision", "trust_remote_code", "attn_implementation"],
    "quant": ["load_in_4bit", "quant_type", "double_quant", "compute_dtype", "storage"],
    "lora": ["r", "alpha", "dropout", "target_modules", "modules_to_save"],
    "data": ["source", "format", "columns", "template", "val_fraction", "max_examples", "too_long"],
    "train": [
        "seq_len",
        "micro_batch",
        "lr",
        "epochs",
        "max_steps",
        "warmup_ratio",
        "optimizer",
        "save_steps",
    ],
    "hardware": ["backend", "device", "gpu"],
}
yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities too: YAML writes them as .nan and .inf
    # Beyond what hypothesis draws on its own: an integer no float can hold.
    | st.sampled_from([10**400, -(10**400)])
    | st.text(max_size=15)
    | st.sampled_from(["nf4", "sdpa", "cosine", "auto", "builtin:tiny-llama", "q_proj", "1e-4", "~x/y"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
sections = st.fixed_dictionaries(
    {},
    optional={
        name: st.dictionaries(st.sampled_from([*keys, "typo"]), yaml_values, max_size=4) | yaml_values
        for name, keys in SECTIONS.items()
    },
)


def _loads_or_refuses(path: Path, overrides: list[str] | None = None) -> None:
    with contextlib.suppress(UserError):
        load_preset(str(path), overrides)


@SLOW_FUZZ
@given(any_text)
@example("[" * 1200)  # deeper than PyYAML's recursion can follow
def test_any_preset_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _loads_or_refuses(path)


@SLOW_FUZZ
@given(sections)
def test_any_preset_structure(tmp_path: Path, data: dict) -> None:
    path = tmp_path / "fuzz.yaml"
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        assume(False)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _loads_or_refuses(path)


@SLOW_FUZZ
@given(
    st.lists(
        st.builds(
            lambda key, value: f"{key}={value}",
            st.sampled_from(
                [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys] + ["lr", "r", "", "x.y.z"]
            )
            | st.text(max_size=10),
            st.text(max_size=20) | yaml_values.map(lambda v: json.dumps(v, default=str)),
        )
        | st.text(max_size=20),
        max_size=4,
    )
)
def test_any_overrides(overrides: list[str]) -> None:
    with contextlib.suppress(UserError):
        load_preset("tiny-demo", overrides)
