"""The calibration worker's in-process sweep leaves each configuration as a fresh engine run would
have it: checkpointing on exactly the layers asked for, nothing left over from the configuration
before (hooks, flags, adapters, TRL's patched forward). A shrunk Llama on the CPU, 4-bit."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import calibration_plan as cp
from bench.calibrate_memory import Worker
from bench.channel import Channel
from bench.gpu_common import build_model, shrunk_config, write_tokens

pytestmark = pytest.mark.slow


def _spec(arch: str, gc: str, lora: cp.Lora) -> dict:
    shape = cp.Shape(64, 2, gc, 1.0)
    plan = cp.ConfigPlan(f"{arch}/hf/{lora.name}/{gc}", arch, "hf", lora, shape, 2, 1.0, 1.0, 1.0)
    spec = plan.spec()
    spec["layers"] = shrunk_config(arch)["num_hidden_layers"]
    spec["checkpointed_layers"] = cp.checkpointed_layers(gc, spec["layers"])
    return spec


def test_each_configuration_starts_from_the_model_as_loaded(tmp_path: Path) -> None:
    import torch

    from engine.train.backends.checkpointing import checkpointed_now, decoder_layers

    arch = "llama-3.2-1b"
    model_dir = tmp_path / "model"
    build_model(arch, model_dir, shrunk_config(arch), device="cpu")
    tokens = tmp_path / "tokens.jsonl"
    write_tokens(tokens, rows=8, seq_len=64, vocab=1024)
    sequence = [
        ("all", cp.BASE),
        ("none", cp.HIGH),
        ("half", cp.ATTN8),
        ("all", cp.BASE),
    ]
    configs = [_spec(arch, gc, lora) for gc, lora in sequence]
    spec = {
        "backend": "hf",
        "dry_run": True,
        "model_dir": str(model_dir),
        "tokens_file": str(tokens),
        "scratch": str(tmp_path),
        "max_seq": 64,
        "configs": configs,
    }
    (tmp_path / "ipc").mkdir()
    worker = Worker(spec, Channel.for_child(tmp_path / "ipc", "w"))
    worker.torch, worker.device, worker.allocator = torch, "cpu", "default"
    worker.load()
    owner = decoder_layers(worker.base)[0]
    hooks = dict(owner._forward_pre_hooks)
    records = []
    for c in configs:
        worker.prepare(c)
        model = worker.model
        ids = torch.randint(10, 1000, (1, 16))
        model.train()
        model(input_ids=ids, labels=ids)
        assert checkpointed_now(model) == c["checkpointed_layers"], c["gc"]
        lora = {
            n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n
        }
        assert lora == set(c["target_modules"])
        assert {p.shape[0] for n, p in model.named_parameters() if ".lora_A" in n} == {c["lora_r"]}
        records.append(worker.train(c))
        # Back to the model as loaded: no adapters, no hooks, no flags, the class's forward.
        assert not any("lora_" in n for n, _ in worker.base.named_parameters())
        assert dict(owner._forward_pre_hooks).keys() == hooks.keys()
        assert "forward" not in worker.base.__dict__
        assert not getattr(worker.base, "_require_grads_hooks", None)
    assert [r["order_in_process"] for r in records] == [1, 2, 3, 4]
    assert all(len(r["step_seconds"]) == 2 and len(r["losses"]) == 2 for r in records)
    assert not list(tmp_path.glob("trainer-*/checkpoint-*"))  # no end-of-training save


@pytest.mark.parametrize(
    ("first", "then", "refused"),
    [
        # The warm-up asks for the first configuration's own plan: a partial one included (the
        # Gemma-3-1B process of 2026-12-05 refused its own warm-up and measured nothing).
        ((28, 14), (28, 14), None),
        ((28, 28), (28, 28), None),
        ((28, 0), (28, 0), None),
        ((28, 28), (28, 14), "partial checkpointing"),
        ((28, 14), (28, 28), "partial checkpointing"),
        ((28, 28), (28, 0), "another checkpointing mode"),
        ((28, 0), (28, 28), "another checkpointing mode"),
    ],
)
def test_reused_unsloth_adapters_run_only_the_plan_they_were_made_with(
    first: tuple[int, int], then: tuple[int, int], refused: str | None
) -> None:
    from bench.calibrate_memory import reused_adapters_refusal
    from engine.memory import CheckpointPlan

    why = reused_adapters_refusal(CheckpointPlan(*first, "first"), CheckpointPlan(*then, "then"))
    assert (why is None) if refused is None else (refused in (why or ""))
