"""The export's pure parts, without an engine: the request's checks and defaults, the model card
from recorded events, and finding llama.cpp."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

from engine import protocol
from engine.config import load_preset, load_resolved
from engine.data.templates import CHATML, LLAMA3
from engine.errors import UserError
from engine.export import card, gguf
from engine.export.job import add_arguments
from engine.export.request import build_request, check_out_dir
from engine.run import checkpoints, runs


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A stopped, then resumed and completed run, as its events file tells it: steps 3 and 4 were
    trained twice (the resume went back to checkpoint 2), and the later values are the real ones."""
    cfg = load_preset("tiny-demo")
    d = runs.create_run(tmp_path / "runs", cfg)
    events = [
        protocol.Hello(run_id=d.name, mode="train"),
        protocol.DataReady(
            train_examples=570, eval_examples=30, train_tokens=22530, trained_tokens=4793, total_steps=6
        ),
        *(protocol.Step(step=s, total_steps=6, loss=7.0 - s / 10) for s in (1, 2, 3, 4)),
        protocol.Eval(step=2, loss=6.5),
        protocol.CheckpointSaved(step=2, path=str(d / "checkpoints" / "checkpoint-2")),
        protocol.Finished(status="stopped", step=4),
        protocol.Hello(run_id=d.name, mode="resume", resumed_from="checkpoint-2"),
        *(protocol.Step(step=s, total_steps=6, loss=5.0 - s / 10) for s in (3, 4, 5, 6)),
        protocol.Eval(step=6, loss=4.25),
        protocol.CheckpointSaved(step=4, path=str(d / "checkpoints" / "checkpoint-4")),
        protocol.Finished(status="completed", step=6),
    ]
    (d / runs.EVENTS).write_bytes(b"".join(protocol.encode(e) for e in events))
    for step in (2, 4):  # committed as the engine commits a checkpoint (engine.run.checkpoints)
        staged = checkpoints.staging_root(d / runs.CHECKPOINTS, step) / f"checkpoint-{step}"
        staged.mkdir(parents=True)
        (staged / "trainer_state.json").write_text("{}")
        (staged / "adapter_config.json").write_text("{}")
        checkpoints.commit(staged, d / runs.CHECKPOINTS)
        staged.parent.rmdir()
    return d


def test_the_record_takes_the_values_at_the_exported_step(run_dir: Path) -> None:
    at_4 = card.read_record(run_dir, 4)
    assert at_4.train_loss == (4, pytest.approx(4.6))  # the resumed session's step 4, not the first's
    assert at_4.eval_loss == (2, 6.5) and at_4.status == "completed" and at_4.total_steps == 6
    final = card.read_record(run_dir, None)
    assert final.train_loss == (6, pytest.approx(4.4)) and final.eval_loss == (6, 4.25)
    assert final.data is not None and final.data.train_examples == 570
    assert card.read_record(run_dir, 0).train_loss is None


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_card_says_what_the_folder_is(run_dir: Path) -> None:
    request = build_request(run_dir, checkpoint="4")
    facts = card.CardFacts(
        device="cpu", eos_token_ids=[4, 1], end_of_turn="<|eot_id|>", max_logit_diff=0.0117,
        tolerance=0.0945, adapter_effect=1.81, prompts=3, tokens=160, chat_template=LLAMA3,
    )  # fmt: skip
    text = card.render(request, load_preset("tiny-demo"), card.read_record(run_dir, 4), facts)
    assert text.startswith("---\nlibrary_name: transformers\n")
    assert "base_model:" not in text  # a built-in model has no hub id to link
    for needle in (
        "A QLoRA fine-tune of `builtin:tiny-llama`: the checkpoint at step 4",
        "saved in bf16",
        "`<|eot_id|>`: it is among generation_config.json's `eos_token_id` (4, 1)",
        "status completed",
        "step 4 of 6",
        "final train loss: 4.6000 at step 4",
        "final eval loss: 6.5000 at step 2",
        f"`qlc export {run_dir.name} --checkpoint 4 --dtype bf16`",
        "largest logit difference 0.0117 (tolerance 0.0945)",
        "```yaml\nname: tiny-demo",
    ):
        assert needle in text, needle
    # The dataset as it was, not the settings that left it to the run: tiny-demo's data.format and
    # data.template are auto, and what they resolved to is not in the run's record.
    assert _section(text, "Dataset").splitlines()[2:] == [
        "- format: not recorded (detected when the run started)",
        "- chat template: not recorded (chosen when the run started)",
        "- loss on responses only: 4,793 of 22,530 tokens (21%)",
        "- 570 train / 30 eval examples, 22,530 tokens per epoch, 0 truncated, 0 dropped",
    ]
    # The merged folder's generation config stops at the end of a turn: the code passes no stop ids.
    use = _section(text, "Use")
    assert (
        "apply_chat_template(" in use
        and "return_dict=True" in use
        and "eos_token_id" not in use.split("```")[1]
    )


def _data_ready(run_dir: Path, **counts: int | str) -> None:
    """Replace the run's data_ready event with one of these counts (or drop it: no counts)."""
    events = [e for e in runs.read_events(run_dir)[0] if not isinstance(e, protocol.DataReady)]
    if counts:
        events.insert(1, protocol.DataReady(train_examples=100, eval_examples=0, **counts))
    (run_dir / runs.EVENTS).write_bytes(b"".join(protocol.encode(e) for e in events))


@pytest.mark.parametrize(
    "data,counts,chat_template,expected",
    [
        # A pinned text run: no template, and every token trained, whatever responses_only says.
        (
            {"format": "text"},
            {"train_tokens": 9000, "trained_tokens": 9000},
            LLAMA3,  # the base tokenizer's own, carried along unused
            ["- format: text", "- chat template: none", "- loss on every token"],
        ),
        # Detected as text (format auto): the detection is not recorded; the counts are.
        (
            {},
            {"train_tokens": 9000, "trained_tokens": 9000},
            LLAMA3,
            [
                "- format: not recorded (detected when the run started)",
                "- chat template: not recorded (chosen when the run started)",
                "- loss on every token",
            ],
        ),
        # Recorded by the run (protocol 1.6): what auto detected and rendered with.
        (
            {},
            {"train_tokens": 9000, "trained_tokens": 9000, "format": "text", "template": ""},
            LLAMA3,
            ["- format: text", "- chat template: none", "- loss on every token"],
        ),
        (
            {},
            {"train_tokens": 9000, "trained_tokens": 3000, "format": "sharegpt", "template": "tokenizer"},
            LLAMA3,
            [
                "- format: sharegpt",
                "- chat template: the tokenizer's own",
                "- loss on responses only: 3,000 of 9,000 tokens (33%)",
            ],
        ),
        # Pinned conversations: the template is the one the run saved with its checkpoints.
        (
            {"format": "messages", "template": "chatml", "packing": True},
            {"train_tokens": 9000, "trained_tokens": 3000},
            CHATML,
            [
                "- format: messages",
                "- chat template: chatml",
                "- loss on responses only: 3,000 of 9,000 tokens (33%)",
            ],
        ),
        (
            {"format": "alpaca", "responses_only": False},
            {"train_tokens": 9000, "trained_tokens": 9000},
            LLAMA3,
            ["- format: alpaca", "- chat template: llama3", "- loss on every token"],
        ),
        # Pre-tokenized data masks with its own labels.
        (
            {"format": "tokens"},
            {"train_tokens": 9000, "trained_tokens": 4500},
            None,
            [
                "- format: tokens",
                "- chat template: none",
                "- loss on the tokens the data labels: 4,500 of 9,000 tokens (50%)",
            ],
        ),
        # No data_ready event (the run died while preparing its data): nothing to count.
        (
            {},
            {},
            None,
            [
                "- format: not recorded (detected when the run started)",
                "- chat template: none",
                "- loss on: not recorded",
                "- examples and tokens: not recorded",
            ],
        ),
    ],
    ids=[
        "text",
        "auto-text",
        "recorded-text",
        "recorded-sharegpt",
        "messages",
        "alpaca-every-token",
        "tokens",
        "no-data-ready",
    ],
)
def test_the_cards_dataset_is_what_the_run_recorded(
    run_dir: Path, data: dict, counts: dict, chat_template: str | None, expected: list[str]
) -> None:
    cfg = load_preset("tiny-demo")
    for key, value in data.items():
        setattr(cfg.data, key, value)
    _data_ready(run_dir, **counts)
    request = build_request(run_dir, checkpoint="4", adapter_only=True)
    facts = card.CardFacts(chat_template=chat_template)
    lines = _section(card.render(request, cfg, card.read_record(run_dir, 4), facts), "Dataset").splitlines()
    assert lines[2 : 2 + len(expected)] == expected
    assert ("- packed into rows of 128 tokens" in lines) == bool(data.get("packing"))
    if counts:
        assert (
            lines[2 + len(expected)]
            == "- 100 train / 0 eval examples, 9,000 tokens per epoch, 0 truncated, 0 dropped"
        )
    # The code prompts as the run trained: a chat turn, or text to continue (a text run's tokenizer
    # still carries the base's template, which it never trained on).
    use = _section(card.render(request, cfg, card.read_record(run_dir, 4), facts), "Use")
    text_run = "- format: text" in expected or "- format: tokens" in expected
    assert ("apply_chat_template(" in use) == (not text_run and chat_template is not None), use


def test_an_adapter_cards_code_passes_the_stop_ids_and_prompts_as_the_run_trained(run_dir: Path) -> None:
    request = build_request(run_dir, checkpoint="4", adapter_only=True)
    record = card.read_record(run_dir, 4)
    chat = card.CardFacts(
        eos_token_ids=[4],
        end_of_turn="<|eot_id|>",
        chat_template=LLAMA3,
        adapter_base="/elsewhere/tiny-llama",
    )
    text = card.render(request, load_preset("tiny-demo"), record, chat)
    code = _section(text, "Use").split("```python\n")[1].split("```")[0]
    assert "model.generate(**inputs, max_new_tokens=64, eos_token_id=[4])" in code
    assert "the code passes it to generate (`eos_token_id=[4]`)" in text
    # A local base is named by its path on the training machine: the card says so.
    assert "by its folder on the machine that trained it (`/elsewhere/tiny-llama`)" in text
    # Trained without a chat template (a text run on a base that has none): a plain prompt, as
    # apply_chat_template would raise.
    plain = card.render(request, load_preset("tiny-demo"), record, card.CardFacts())
    code = _section(plain, "Use").split("```python\n")[1].split("```")[0]
    assert 'inputs = tokenizer("Hello", return_tensors="pt")' in code and "apply_chat_template" not in code


def test_a_hub_base_is_linked_in_the_metadata(run_dir: Path) -> None:
    request = build_request(run_dir, checkpoint="2", adapter_only=True)
    cfg = load_preset("llama-3.1-8b-rtx4090")
    text = card.render(request, cfg, card.read_record(run_dir, 2), card.CardFacts())
    assert "base_model: meta-llama/Llama-3.1-8B-Instruct" in text and "library_name: peft" in text
    assert "final eval loss: 6.5000 at step 2" in text


def test_requests_default_to_the_runs_exports_folder(run_dir: Path, tmp_path: Path) -> None:
    newest = build_request(run_dir)
    assert newest.source.name == "checkpoint-4" and newest.dtype == "bf16"
    assert newest.out_dir == run_dir / "exports" / "checkpoint-4-merged-bf16"
    adapter = build_request(run_dir, checkpoint="2", adapter_only=True)
    assert adapter.out_dir == run_dir / "exports" / "checkpoint-2-adapter" and adapter.dtype == ""
    # The engine's arguments reproduce the request exactly.
    request = build_request(run_dir, checkpoint="2", out=tmp_path / "x", dtype="fp16", max_shard_size="2GB")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(request.engine_args()[1:])
    again = build_request(
        args.run_dir, checkpoint=args.checkpoint, out=args.out, dtype=args.dtype, adapter_only=args.adapter_only,
        gguf=args.gguf, base=args.base, device=args.device, max_shard_size=args.max_shard_size,
    )  # fmt: skip
    assert again == request


def test_an_output_folder_must_be_new_or_empty(tmp_path: Path) -> None:
    check_out_dir(tmp_path / "new" / "deeper")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(UserError, match="exists and is not empty"):
        check_out_dir(tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="cannot write in"):
            check_out_dir(locked / "out")
    # Where even root cannot make a folder (os.access says yes to root: the engine failed after
    # it had started, with a FileNotFoundError).
    with pytest.raises(UserError, match="cannot write in /proc"):
        check_out_dir(Path("/proc/qlc-export"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qlc-write-probe")]


def test_llama_cpp_is_found_in_a_checkout_or_on_path(tmp_path: Path) -> None:
    checkout = tmp_path / "llama.cpp"
    (checkout / "build" / "bin").mkdir(parents=True)
    (checkout / gguf.CONVERTER).write_text("")
    assert gguf.find_llama_cpp({"PATH": "", gguf.ENV: str(checkout)}) == gguf.LlamaCpp(
        checkout / gguf.CONVERTER, None
    )
    with pytest.raises(UserError, match="llama-quantize was not found"):
        gguf.require("Q4_K_M", {"PATH": "", gguf.ENV: str(checkout)})
    assert gguf.require("Q8_0", {"PATH": "", gguf.ENV: str(checkout)}).quantize is None  # the converter alone
    quantize = checkout / "build" / "bin" / gguf.QUANTIZE
    quantize.write_text(f"#!{sys.executable}\n")
    quantize.chmod(0o755)
    assert gguf.find_llama_cpp({"PATH": "", gguf.ENV: str(checkout)}).quantize == quantize  # type: ignore[union-attr]
    # On PATH, as llama.cpp's packages install them.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in (gguf.CONVERTER, gguf.QUANTIZE):
        (bin_dir / name).write_text(f"#!{sys.executable}\n")
        (bin_dir / name).chmod(0o755)
    found = gguf.find_llama_cpp({"PATH": str(bin_dir)})
    assert found == gguf.LlamaCpp(bin_dir / gguf.CONVERTER, bin_dir / gguf.QUANTIZE)
    assert gguf.find_llama_cpp({"PATH": str(tmp_path / "nothing")}) is None
    with pytest.raises(UserError, match=f"set {gguf.ENV}=/path/to/llama.cpp"):
        gguf.require("Q4_K_M", {"PATH": ""})
    assert gguf.check_type("q4_k_m") == "Q4_K_M" and gguf.check_type("bf16") == "BF16"


def test_the_tolerance_follows_the_dtypes_own_rounding_where_it_was_measured() -> None:
    from engine.export import merge

    # Not measured (a model too large for an fp32 copy): 5% of the largest logit in bf16, 1% in fp16.
    assert merge.tolerance("bf16", 5.4) == (pytest.approx(0.27), "5% of the largest logit")
    assert merge.tolerance("fp16", 0.5)[0] == pytest.approx(0.01)  # at least of 1
    # Measured: the tiny model after 400 steps rounds to 0.245 in bf16, and its merged folder was
    # 0.555 from base + adapter (2.3x): 4x the rounding accepts it, and stays far below the 5.8 the
    # adapter itself moves logits by.
    tol, basis = merge.tolerance("bf16", 5.4, own_rounding=0.245)
    assert tol == pytest.approx(0.98) and "against fp32" in basis and 0.555 < tol < 5.8
    # A rounding smaller than the share leaves the share, and says so.
    tol, basis = merge.tolerance("bf16", 5.4, own_rounding=0.01)
    assert tol == pytest.approx(0.27) and basis.startswith("5% of the largest logit; bf16's own rounding")


def test_the_fp32_reference_runs_only_where_it_is_cheap() -> None:
    from engine.memory.architectures import catalog
    from engine.memory.merge import (
        FP32_REFERENCE_MAX_GIB,
        estimate_merge,
        fp32_reference_fits,
        fp32_reference_gb,
    )

    cfg = load_preset("llama-3.1-8b-rtx4090")
    eight_b = estimate_merge(cfg)
    assert fp32_reference_gb(eight_b) > FP32_REFERENCE_MAX_GIB  # 32 GB of fp32 weights: not on the CPU
    assert not fp32_reference_fits(eight_b, 1000.0)
    one_b = estimate_merge(cfg, arch=catalog()["llama-3.2-1b"])
    need = fp32_reference_gb(one_b)
    assert need < FP32_REFERENCE_MAX_GIB
    assert fp32_reference_fits(one_b, need / 0.8 + 0.1) and not fp32_reference_fits(one_b, need)
    assert not fp32_reference_fits(one_b, None)  # unknown host memory: not risked


def test_a_merge_asked_on_a_gpu_that_is_not_there_says_what_to_ask(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--device cuda` with no CUDA GPU: the refusal's hint was the out-of-memory one ("free
    memory (stop other runs), or a bigger GPU")."""
    from engine.export import job, merge
    from engine.run.events import Emitter

    monkeypatch.setattr(merge, "gpu_free_gb", lambda: None)  # as on a machine with no CUDA
    request = build_request(run_dir, device="cuda")
    with pytest.raises(UserError, match="--device cuda: there is no CUDA GPU here") as caught:
        job._placement(request, load_resolved(run_dir / runs.CONFIG), Emitter([]))
    assert "--device cpu" in caught.value.hint
