"""train.batch_split: auto. The search (engine.memory.estimate.choose_split) keeps the rows of a
step, re-splits only with no layer checkpointed and only where the larger micro-batch fits; the
plan a run makes before its weights load (engine.memory.checkpointing.plan_split); and the real
engine on the tiny model, showing that a re-split step trains the same: the losses of 20 steps of
4 x 1 and of 1 x 4 agree to 3 decimals."""

from __future__ import annotations

import importlib
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import protocol
from engine.config import ALL_LINEAR, RunConfig
from engine.memory import checkpointing, estimate, resolve_gpu
from engine.memory.architectures import catalog
from engine.memory.checkpointing import CheckpointPlan, plan_split
from engine.memory.estimate import FITS, choose_split
from engine.memory.fit import with_changes
from engine.run import runs
from tests.conftest import as_if_crashed, qlc

estimate_module = importlib.import_module(
    "engine.memory.estimate"
)  # the module: engine.memory re-exports its function


def seed_recipe(**changes: object) -> RunConfig:
    """shared/anchors.md's recipe: Llama-3.1-8B, r 32 on all seven projections, seq 4096, 2 x 2."""
    cfg = RunConfig()
    cfg.model.arch = "llama-3.1-8b"
    cfg.data.source = "x"
    cfg.data.packing = False
    cfg.hardware.backend = "unsloth"
    cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules = 32, 64, list(ALL_LINEAR)
    cfg.train.seq_len, cfg.train.micro_batch, cfg.train.grad_accum = 4096, 2, 2
    cfg.train.gradient_checkpointing = "auto"
    cfg.train.batch_split = "auto"
    return with_changes(cfg, **changes)


def test_with_80_gb_the_seed_recipe_runs_its_four_rows_as_one_micro_batch() -> None:
    gpu = resolve_gpu("h100")
    est = estimate(seed_recipe(), gpu=gpu)
    assert est.checkpointed_layers == 0
    assert (est.micro_batch, est.grad_accum) == (4, 1)
    assert est.split_reason == "auto, written 2 x 2: fits 79.6 GiB without checkpointing"
    assert est.verdict(gpu).status == FITS
    # The same config written 4 x 1 is the same estimate: the search changed only the split.
    same = estimate(seed_recipe(**{"train.micro_batch": 4, "train.grad_accum": 1}), gpu=gpu)
    assert same.device_total_gb == pytest.approx(est.device_total_gb)


def test_at_24_gb_one_row_at_a_time_beats_recomputing_half_the_layers() -> None:
    """2 x 2 recomputes 17 of 32 layers at 24 GB; 1 x 4 fits with none. Measured on an H100, as a
    share of bare Unsloth's step in each call: 0.87 against 0.79 (constants.RECOMPUTE_SHARE,
    PASS_COST), so auto takes 1 x 4."""
    written = estimate(seed_recipe(**{"train.batch_split": "fixed"}), gpu=resolve_gpu("rtx4090"))
    assert written.checkpointed_layers == 17
    est = estimate(seed_recipe(), gpu=resolve_gpu("rtx4090"))
    assert (est.checkpointed_layers, est.micro_batch, est.grad_accum) == (0, 1, 4)
    assert est.split_reason.startswith(
        "auto, written 2 x 2: 1 x 4 with 0 layers checkpointed predicted 1.09x the speed of 2 x 2 with 17"
    )
    assert "recompute rule measured on an H100" in est.split_reason
    assert est.verdict(resolve_gpu("rtx4090")).status == FITS


def test_with_layers_checkpointed_the_split_stays_where_no_other_is_predicted_faster() -> None:
    """At 16 GB 2 x 2 recomputes 26 layers and 1 x 4 still some: shorter passes buy too little."""
    est = estimate(seed_recipe(), gpu=resolve_gpu("16GB"))
    assert est.checkpointed_layers > 0
    assert (est.micro_batch, est.grad_accum) == (2, 2)
    assert (
        est.split_reason
        == f"auto: kept as written while {est.checkpointed_layers} of 32 layers are checkpointed"
    )


def test_the_recompute_rule_reads_its_measured_points_and_takes_no_shorter_pass() -> None:
    from engine.memory.estimate import RecomputeRule, pass_cost

    assert pass_cost(4096) == pytest.approx(1.13) and pass_cost(16384) == pytest.approx(1.0)
    assert pass_cost(1 << 20) == pytest.approx(1.0) and pass_cost(1024) == pytest.approx(1.13)
    assert 1.021 < pass_cost(6000) < 1.13  # between its points, on a log scale
    rule, arch = RecomputeRule(), catalog()["llama-3.1-8b"]
    # Where it was measured only: Unsloth on a 4-bit base.
    assert RecomputeRule.where_measured(seed_recipe(), "unsloth") is not None
    assert RecomputeRule.where_measured(seed_recipe(), "hf") is None
    assert RecomputeRule.where_measured(seed_recipe(**{"quant.load_in_4bit": False}), "unsloth") is None
    cfg = seed_recipe(**{"train.seq_len": 1024, "train.micro_batch": 4, "train.grad_accum": 4})
    assert rule.takes(cfg, 4) and rule.takes(cfg, 8) and not rule.takes(cfg, 2)
    # Every layer recomputed costs RECOMPUTE_SHARE more than none, at any pass length.
    full, none = rule.step_s(cfg, arch, 32, 4, 4), rule.step_s(cfg, arch, 0, 4, 4)
    assert full / none == pytest.approx(1.39)


def test_when_no_larger_micro_batch_fits_it_says_so() -> None:
    est = estimate(seed_recipe(), gpu=resolve_gpu("48GB"))
    assert (est.checkpointed_layers, est.micro_batch, est.grad_accum) == (0, 2, 2)
    assert est.split_reason == "auto: kept 2 x 2: no larger micro-batch fits 48.0 GiB without checkpointing"


def test_padded_rows_are_not_re_split_but_packed_ones_are() -> None:
    """hf pads each micro-batch to its longest row: a larger one would compute padding."""
    gpu = resolve_gpu("h100")
    padded = estimate(seed_recipe(**{"hardware.backend": "hf"}), gpu=gpu)
    assert (padded.micro_batch, padded.grad_accum) == (2, 2)
    assert "padded per micro-batch" in padded.split_reason
    # Packed rows are full: 4 x 1 fits an H200 (hf keeps more than Unsloth: not an H100).
    packed = estimate(
        seed_recipe(**{"hardware.backend": "hf", "data.packing": True}), gpu=resolve_gpu("h200")
    )
    assert (packed.micro_batch, packed.grad_accum) == (4, 1)


def test_fixed_and_single_micro_batch_splits_are_left_alone() -> None:
    gpu = resolve_gpu("h100")
    fixed = estimate(seed_recipe(**{"train.batch_split": "fixed"}), gpu=gpu)
    assert (fixed.micro_batch, fixed.grad_accum, fixed.split_reason) == (2, 2, "")
    one = estimate(seed_recipe(**{"train.micro_batch": 4, "train.grad_accum": 1}), gpu=gpu)
    assert (one.micro_batch, one.grad_accum) == (4, 1)
    assert one.split_reason == "auto: 4 rows already run as one micro-batch"


@settings(max_examples=40, deadline=None, database=None)
@given(
    arch=st.sampled_from(["llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b", "gemma-3-4b", "mistral-7b"]),
    gpu=st.sampled_from(["rtx4090", "a100-40gb", "h100", "h200"]),
    seq=st.sampled_from([1024, 2048, 4096]),
    micro_batch=st.integers(1, 4),
    grad_accum=st.integers(1, 12),
    backend=st.sampled_from(["hf", "unsloth"]),
    packing=st.booleans(),
)
def test_a_re_split_keeps_the_rows_of_a_step_and_fits(
    arch: str, gpu: str, seq: int, micro_batch: int, grad_accum: int, backend: str, packing: bool
) -> None:
    cfg = seed_recipe(
        **{
            "model.arch": arch,
            "train.seq_len": seq,
            "train.micro_batch": micro_batch,
            "train.grad_accum": grad_accum,
            "hardware.backend": backend,
            "data.packing": packing,
        }
    )
    card = resolve_gpu(gpu)
    # The memory rules alone: on a known card auto then lays the step out by predicted speed (a
    # speed fit where one covers the card, the recompute rule elsewhere: estimate.fastest_layout,
    # tested apart).
    with mock.patch.object(estimate_module, "fastest_layout", lambda *a, **k: None):
        written = estimate(with_changes(cfg, **{"train.batch_split": "fixed"}), gpu=card)
        est = estimate(cfg, gpu=card)
    # By predicted speed: the same rows a step, and a layout that fits whenever the written one
    # could be made to fit.
    fast = estimate(cfg, gpu=card)
    assert fast.micro_batch * fast.grad_accum == micro_batch * grad_accum
    if est.device_total_gb <= card.budget_gb * 0.94:
        assert fast.device_total_gb <= card.budget_gb * 0.94 + 1e-9
    assert est.micro_batch * est.grad_accum == micro_batch * grad_accum
    assert est.micro_batch >= micro_batch and est.checkpointed_layers == written.checkpointed_layers
    if est.micro_batch != micro_batch:
        assert est.checkpointed_layers == 0
        assert est.device_total_gb <= card.budget_gb * 0.94 + 1e-9
        # The largest that fits: the next divisor up does not.
        rows = micro_batch * grad_accum
        bigger = [d for d in range(est.micro_batch + 1, rows + 1) if rows % d == 0]
        if bigger:
            nxt = with_changes(cfg, **{"train.micro_batch": bigger[0], "train.grad_accum": rows // bigger[0]})
            nxt = with_changes(nxt, **{"train.batch_split": "fixed", "train.gradient_checkpointing": False})
            assert estimate(nxt, gpu=card).device_total_gb > card.budget_gb * 0.94


def test_choose_split_refuses_several_processes_and_an_unknown_budget() -> None:
    cfg = seed_recipe()
    arch = catalog()["llama-3.1-8b"]
    assert choose_split(cfg, arch, "unsloth", 80.0, 0, processes=2)[:2] == (2, 2)
    mb, ga, why = choose_split(cfg, arch, "unsloth", None, 0)
    assert (mb, ga) == (2, 2) and "no memory budget" in why


def test_several_gpus_keep_the_split_as_written() -> None:
    """The per-GPU estimate of a torchrun world describes what its ranks run: as written."""
    from engine.memory import per_gpu

    cfg = seed_recipe(**{"hardware.backend": "hf", "data.packing": True})  # Unsloth trains on one GPU
    share = per_gpu.per_gpu(cfg, 2, "ddp", gpu=resolve_gpu("h200"))
    assert (share.base.micro_batch, share.base.grad_accum) == (2, 2)
    assert share.base.split_reason == "auto: kept as written with several processes (one GPU only for now)"
    one = per_gpu.per_gpu(cfg, 1, gpu=resolve_gpu("h200"))
    assert (one.base.micro_batch, one.base.grad_accum) == (4, 1)


def test_a_run_plans_its_split_against_the_gpu_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the engine computes before its weights load, with the GPU present standing in."""
    h100 = resolve_gpu("h100")
    monkeypatch.setattr(checkpointing, "resolve_gpu", lambda spec: h100)
    cfg = seed_recipe(**{"hardware.gpu": "auto"})
    none = CheckpointPlan(layers=32, checkpointed=0, reason="auto")
    split = plan_split(cfg, "unsloth", "cuda", none)
    assert (split.micro_batch, split.grad_accum) == (4, 1) and split.changed(cfg)
    applied = split.apply(cfg)
    assert (applied.train.micro_batch, applied.train.grad_accum) == (4, 1)
    assert (cfg.train.micro_batch, cfg.train.grad_accum) == (2, 2)  # the written config is untouched
    some = CheckpointPlan(layers=32, checkpointed=12, reason="auto")
    assert not plan_split(cfg, "unsloth", "cuda", some).changed(cfg)
    cpu = plan_split(cfg, "unsloth", "cpu", none)
    assert not cpu.changed(cfg) and "auto on the CPU" in cpu.reason
    assert plan_split(seed_recipe(**{"train.batch_split": "fixed"}), "unsloth", "cuda", none).reason == ""


# ---------------------------------------------------------------------------------------------
# The same training: the real engine, 20 steps, split two ways
# ---------------------------------------------------------------------------------------------

STEPS = 20


def _train(root: Path, micro_batch: int, grad_accum: int) -> Path:
    sets = [
        f"train.max_steps={STEPS}",
        "train.logging_steps=1",
        "train.eval_steps=0",
        f"train.save_steps={STEPS // 2}",
        "data.val_fraction=0",
        # fp32: the comparison is of the training, not of bf16's rounding (about 1e-3 on a loss of
        # 5, for two splits or for one split against fp32).
        "quant.compute_dtype=fp32",
        f"train.micro_batch={micro_batch}",
        f"train.grad_accum={grad_accum}",
        "train.batch_split=auto",
    ]
    folder = root / f"{micro_batch}x{grad_accum}"
    result = qlc("--runs-dir", str(folder), "train", "tiny-demo", *[x for s in sets for x in ("--set", s)])
    assert result.returncode == 0, result.stderr + result.stdout
    (run_dir,) = runs.list_run_dirs(folder)
    return run_dir


def _losses(run_dir: Path) -> list[float]:
    """Each step's loss, the last one logged where a resume logged a step again."""
    events, _ = runs.read_events(run_dir)
    by_step = {e.step: e.loss for e in events if isinstance(e, protocol.Step)}
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.slow
def test_a_re_split_step_trains_the_same_as_the_written_one(tmp_path: Path) -> None:
    """The loss is normalised over the whole accumulated batch and the rows come in the same
    order: one micro-batch of 4 and four of 1 are the same update, step after step. A run resumed
    under another split (a GPU with less free memory at the resume) goes on as the first did: the
    trainer skips the steps done in micro-batches of the new size, the same rows."""
    runs_of = {}
    for mb, ga in ((4, 1), (1, 4)):
        run_dir = runs_of[mb, ga] = _train(tmp_path, mb, ga)
        events, _ = runs.read_events(run_dir)
        ready = next(e for e in events if isinstance(e, protocol.ModelReady))
        # On the CPU the split stays as written, and the run says why.
        assert (ready.micro_batch, ready.grad_accum) == (mb, ga)
        assert ready.split_reason == "auto on the CPU: as written (the budget models GPU memory)"
    one, four = _losses(runs_of[4, 1]), _losses(runs_of[1, 4])
    assert len(one) == len(four) == STEPS
    worst = max(abs(a - b) for a, b in zip(one, four, strict=True))
    assert worst < 5e-4, f"losses differ by up to {worst:.2e}: {one} vs {four}"
    assert one[-1] < one[0] - 1.0  # and it trained

    # The 1 x 4 run, cut at its middle checkpoint and resumed as 4 x 1.
    cut = runs_of[1, 4]
    as_if_crashed(cut, after_checkpoint=STEPS // 2)
    config = cut / runs.CONFIG
    text = config.read_text()
    config.write_text(
        text.replace("micro_batch: 1\n", "micro_batch: 4\n").replace("grad_accum: 4\n", "grad_accum: 1\n")
    )
    result = qlc("--runs-dir", str(cut.parent), "resume", cut.name)
    assert result.returncode == 0, result.stderr + result.stdout
    events, _ = runs.read_events(cut)
    start = max(i for i, e in enumerate(events) if isinstance(e, protocol.Hello))
    assert events[start].mode == "resume"
    after = events[start:]
    ready = next(e for e in after if isinstance(e, protocol.ModelReady))
    assert (ready.micro_batch, ready.grad_accum) == (4, 1)
    resumed = {e.step: e.loss for e in after if isinstance(e, protocol.Step)}
    assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
    worst = max(abs(one[step - 1] - loss) for step, loss in resumed.items())
    assert worst < 5e-4, f"the resumed steps differ by up to {worst:.2e}: {one} vs {resumed}"
