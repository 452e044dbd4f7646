import math

import msgspec
import pytest

from engine import protocol


def _examples() -> list[protocol.Message]:
    return [
        protocol.Hello(run_id="r1", pid=12, backend="hf", backend_reason="auto: no GPU", device="cpu"),
        protocol.Hello(run_id="r2", trust_remote_code=True),
        protocol.StageEvent(stage="loading_model", message="loading", current=1, total=3),
        protocol.ModelReady(total_params=10, trainable_params=2, memory_allocated_gb=1.5),
        protocol.EstimateEvent(
            terms=[protocol.MemoryTerm(name="weights", gb=5.3, parts={"nf4": 3.2})], torch_peak_gb=10.8
        ),
        protocol.DataReady(train_examples=5, total_steps=9),
        protocol.Step(step=3, loss=1.25, lr=1e-4, grad_norm=0.5, eta_seconds=None),
        protocol.Hello(run_id="r2", device="2 x cuda (NCCL, fsdp)", world_size=2),
        protocol.Step(
            step=4,
            loss=1.0,
            devices=[
                protocol.DeviceStat(
                    rank=0, device="cuda:0", memory_peak_reserved_gb=10.5, utilization_pct=97.0
                ),
                protocol.DeviceStat(
                    rank=1, device="cuda:1", memory_peak_reserved_gb=10.4, utilization_pct=96.0
                ),
            ],
        ),
        protocol.Eval(step=3, loss=2.0, perplexity=7.39),
        protocol.CheckpointSaved(step=3, path="/x/checkpoint-3", size_mb=1.5),
        protocol.SampleStarted(request_id="a", prompt="hi"),
        protocol.SampleToken(request_id="a", text="hel"),
        protocol.Sample(request_id="a", prompt="hi", text="hello", new_tokens=2, stopped_by="eos"),
        protocol.Log(level="warning", message="careful"),
        protocol.WarningEvent(message="w", hint="h"),
        protocol.ErrorEvent(kind="out_of_memory", message="oom", advice=["lower micro_batch"]),
        protocol.Finished(status="stopped", step=3, last_checkpoint="/x/checkpoint-3", final_loss=1.0),
        protocol.Hello(run_id="r1", mode="export", device="cpu"),
        protocol.StageEvent(stage="merging", message="merging", current=3, total=6),
        protocol.Exported(
            out_dir="/x/exports/checkpoint-3-merged-bf16",
            source="checkpoint-3",
            step=3,
            files=["config.json", "model.safetensors"],
            dtype="bf16",
            max_logit_diff=0.01,
            tolerance=0.1,
            eos_token_ids=[4, 1],
            gguf_path="/x/exports/checkpoint-3-merged-bf16/model-Q4_K_M.gguf",
        ),
    ]


@pytest.mark.parametrize("event", _examples(), ids=lambda e: type(e).__name__)
def test_every_event_round_trips(event: protocol.Message) -> None:
    line = protocol.encode(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode_event(line) == event


@pytest.mark.parametrize(
    "command",
    [
        protocol.Stop(),
        protocol.Stop(save=False),
        protocol.Save(),
        protocol.SampleRequest(prompt="hi", max_new_tokens=5, temperature=0.0),
    ],
)
def test_every_command_round_trips(command: protocol.Message) -> None:
    assert protocol.decode_command(protocol.encode(command)) == command


@pytest.mark.parametrize(
    "value,text", [(math.nan, b'"NaN"'), (math.inf, b'"Infinity"'), (-math.inf, b'"-Infinity"')]
)
def test_non_finite_floats_are_explicit(value: float, text: bytes) -> None:
    line = protocol.encode(protocol.Step(step=1, loss=value))
    assert text in line
    msgspec.json.decode(line)  # still strict JSON
    loss = protocol.decode_event(line).loss
    assert (math.isnan(loss) and math.isnan(value)) or loss == value


def test_unknown_fields_are_ignored_so_newer_engines_stay_readable() -> None:
    ev = protocol.decode_event(b'{"type":"step","step":4,"loss":1.5,"a_future_field":[1,2]}')
    assert ev == protocol.Step(step=4, loss=1.5)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json",
        b'{"type":"nope"}',
        b'{"type":"step"}',
        b'{"type":"step","step":"x"}',
        b"[1]",
        "\ud800",
    ],
)
def test_bad_lines_raise_protocol_error_only(line: bytes | str) -> None:
    """More of these, generated, in tests/reliability/test_fuzz.py."""
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_event(line)
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_command(line)


def test_an_older_hello_without_the_remote_code_field_reads_as_off() -> None:
    ev = protocol.decode_event(b'{"type":"hello","protocol":"1.0","run_id":"r"}')
    assert isinstance(ev, protocol.Hello) and ev.trust_remote_code is False


def test_a_different_major_version_is_refused() -> None:
    protocol.check_hello(protocol.Hello(protocol="1.7"))
    with pytest.raises(protocol.ProtocolError, match=r"protocol 2\.0"):
        protocol.check_hello(protocol.Hello(protocol="2.0"))


def test_hello_is_stamped_with_the_current_version() -> None:
    assert protocol.Hello().protocol == protocol.PROTOCOL_VERSION


def test_an_export_result_decodes_with_defaults_for_what_it_leaves_out() -> None:
    ev = protocol.decode_event(b'{"type":"exported","out_dir":"/x"}')
    assert isinstance(ev, protocol.Exported) and ev.kind == "merged" and ev.gguf_path is None


def test_the_export_event_bumped_the_minor_version_only() -> None:
    major, minor = protocol.PROTOCOL_VERSION.split(".")
    assert (major, int(minor) >= 1) == ("1", True)


def test_a_step_from_an_older_engine_has_no_devices() -> None:
    """Runs on one GPU (and engines before multi-GPU support) send no per-rank list."""
    ev = protocol.decode_event(b'{"type":"step","step":2,"loss":1.0}')
    assert ev.devices == [] and protocol.decode_event(b'{"type":"hello"}').world_size == 1
