"""The step-cost model behind hardware.backend auto (engine.memory.speed, speed_fit): what each
kind of work counts, that the fit finds the costs that made a table and predicts configurations
it never saw, and that auto picks the stack it predicts faster, saying why."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import random

import pytest

from engine import stacks
from engine.config import ALL_LINEAR, RunConfig, load_preset
from engine.memory import speed, speed_fit
from engine.memory.architectures import catalog
from engine.memory.gpus import resolve_gpu
from engine.memory.speed import FEATURES, HOST, SpeedFit, StepWork, device_s, host_s, predict_s, step_work
from engine.memory.speed_fit import (
    DEVICE_FEATURES,
    HOST_FINE_STEP,
    Choice,
    Measured,
    choices,
    fit_costs,
    fit_step,
    leave_one_out,
)

est = importlib.import_module("engine.memory.estimate")  # the module: engine.memory re-exports its function
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
# Plausible H100-like costs: hf loses on the fused work Unsloth does (dequant, elementwise).
COSTS = {
    "hf": {
        "matmul": 1.45,
        "attention": 2.2,
        "dequant": 0.006,
        "elementwise": 0.16,
        "adapters": 0.03,
        "frozen": 0.02,
        "launches": 2.0,
    },
    "unsloth": {
        "matmul": 1.35,
        "attention": 1.8,
        "dequant": 0.004,
        "elementwise": 0.05,
        "adapters": 0.01,
        "frozen": 0.022,  # a projection without adapters misses Unsloth's fused LoRA kernels
        "launches": 3.5,
    },
}


# The same costs as the fits are now made: no per-pass cost on the device, a host floor instead
# (2 and 3.5 ms a layer pass), under which the shortest steps wait on the host.
HOSTED = {s: {**c, "launches": 0.0, HOST: h} for (s, c), h in zip(COSTS.items(), (2.0, 3.5), strict=True)}
ARCHS = ("llama-3.2-1b", "llama-3.2-3b", "qwen2.5-7b", "llama-3.1-8b")


def _table(
    noise: float,
    seed: int = 0,
    costs_of: dict[str, dict[str, float]] = COSTS,
    archs: tuple[str, ...] = ARCHS,
) -> list[Measured]:
    """Each stack of `costs_of` on a matrix of configurations, timed by its costs with
    multiplicative noise."""
    rng = random.Random(seed)
    known = catalog()
    rows = []
    for name, seq, (mb, ga), r, targets, gc in itertools.product(
        archs,
        [1024, 4096],
        [(1, 4), (4, 1)],
        [16, 64],
        [ALL_LINEAR, ATTN],
        [False, True],
    ):
        arch = known[name]
        k = arch.layers if gc else 0
        work = step_work(
            arch, seq_len=seq, micro_batch=mb, grad_accum=ga, r=r, targets=targets, checkpointed=k,
            peak_tflops=989,
        )  # fmt: skip
        key = f"{name}/{seq}/{mb}x{ga}/r{r}/{len(targets)}/{k}"
        for stack, costs in costs_of.items():
            t = predict_s(costs, work) * (1 + rng.uniform(-noise, noise))
            rows.append(Measured(key=key, stack=stack, work=work, step_s=t, arch=name))
    return rows


def test_a_step_counts_dequantizing_per_micro_batch_and_the_same_flops_however_split() -> None:
    arch = catalog()["llama-3.1-8b"]
    kw = {"seq_len": 4096, "r": 32, "targets": ALL_LINEAR, "peak_tflops": 989.0}
    as_written = step_work(arch, micro_batch=2, grad_accum=2, checkpointed=0, **kw)
    resplit = step_work(arch, micro_batch=4, grad_accum=1, checkpointed=0, **kw)
    recomputed = step_work(arch, micro_batch=2, grad_accum=2, checkpointed=32, **kw)
    assert as_written.tokens == resplit.tokens == 16384
    for same in ("matmul", "attention", "elementwise", "adapters"):  # per token: however split
        assert getattr(as_written, same) == pytest.approx(getattr(resplit, same)), same
    # Two micro-batches dequantize every weight twice as often, and launch twice the layers.
    assert as_written.dequant == pytest.approx(2 * resplit.dequant)
    assert as_written.launches == pytest.approx(2 * resplit.launches)
    # Recomputing every layer dequantizes its weights a third time, and runs its forward again:
    # one more layer pass on top of forward (one) and backward (two), and a forward's FLOPs.
    assert recomputed.dequant == pytest.approx(as_written.dequant * 3 / 2)
    assert recomputed.elementwise == pytest.approx(as_written.elementwise * 4 / 3)
    assert recomputed.launches == pytest.approx(as_written.launches * 4 / 3)
    assert recomputed.attention == pytest.approx(as_written.attention * 4 / 3)
    assert recomputed.adapters == pytest.approx(as_written.adapters * 4 / 3)
    assert recomputed.matmul > as_written.matmul
    # The figure: about 3.5e10 FLOPs a token on the 8B at 4096 without recompute, of which
    # attention's QK^T and AV are about 9% (engine/memory/flops.py).
    total = as_written.matmul + as_written.attention
    assert total * 989e12 / as_written.tokens == pytest.approx(3.5e10, rel=0.05)
    assert as_written.attention / total == pytest.approx(0.09, abs=0.03)
    # Attention-only adapters move fewer activations through LoRA than all seven projections;
    # the rest move through projections without adapters (the same widths in all).
    attn_only = step_work(arch, micro_batch=2, grad_accum=2, checkpointed=0, **{**kw, "targets": ATTN})
    assert 0 < attn_only.adapters < as_written.adapters and as_written.frozen == 0
    assert attn_only.adapters + attn_only.frozen == pytest.approx(as_written.adapters)
    assert (as_written.grad_accum, resplit.grad_accum) == (2, 1)


def test_the_fit_finds_the_costs_that_made_the_table() -> None:
    rows = [r for r in _table(noise=0.0) if r.stack == "hf"]
    fitted = fit_costs(rows)
    for f in FEATURES:
        assert fitted[f] == pytest.approx(COSTS["hf"][f], rel=1e-6)


def test_costs_are_never_negative_and_held_out_configurations_are_predicted() -> None:
    # A stack whose time has no launch cost at all, timed with 3% noise. With this seed, the
    # unconstrained least-squares fit gives launches a cost of -0.025 to chase the noise; the fit
    # keeps it at the boundary instead.
    rows = _table(noise=0.03, seed=3, costs_of={"unsloth": dict(COSTS["unsloth"], launches=0.0)})
    fitted = fit_costs(rows)
    assert fitted["launches"] == 0.0 and all(v > 0 for f, v in fitted.items() if f != "launches")
    few = [r for r in rows if r.arch in ARCHS[:2]]  # one fit a configuration: on two architectures
    held = leave_one_out(few)
    assert len(held) == len(few)
    assert max(abs(h.error) for h in held) < 0.05
    by_arch = leave_one_out(rows, "arch")
    assert {h.row.arch for h in by_arch} == {r.arch for r in rows}
    assert max(abs(h.error) for h in by_arch) < 0.06


def test_the_fit_finds_the_host_floor_under_the_short_steps() -> None:
    costs = HOSTED["unsloth"]
    rows = [r for r in _table(noise=0.0, costs_of=HOSTED) if r.stack == "unsloth"]
    waited = [r for r in rows if host_s(costs, r.work) > device_s(costs, r.work)]
    assert 0 < len(waited) < len(rows) / 2  # some steps wait on the host, most on the device
    for r in waited:
        assert predict_s(costs, r.work) == host_s(costs, r.work)
    fitted = fit_step(rows)
    assert fitted[HOST] == pytest.approx(costs[HOST], abs=HOST_FINE_STEP)
    for f in DEVICE_FEATURES:
        assert fitted[f] == pytest.approx(costs[f], rel=0.02), f
    # A plain sum cannot tell the host's per-pass cost from the device's: it misses the short steps.
    linear = fit_costs(rows)
    assert max(abs(predict_s(linear, r.work) / r.step_s - 1) for r in rows) > 0.1


def test_a_fit_of_fewer_steps_than_costs_keeps_its_form() -> None:
    rows = [r for r in _table(noise=0.0, costs_of=HOSTED) if r.stack == "hf"][:3]
    fitted = fit_step(rows)
    assert set(fitted) == {*FEATURES, HOST} and fitted["launches"] == 0.0
    assert all(v >= 0 for v in fitted.values())
    assert max(abs(predict_s(fitted, r.work) / r.step_s - 1) for r in rows) < 0.01


def test_auto_replayed_on_the_table_stays_within_the_noise_of_the_faster_stack() -> None:
    # One rank of the two: each pick refits both stacks without its configuration (10 s for both).
    rows = [r for r in _table(noise=0.01, seed=2, costs_of=HOSTED, archs=ARCHS[:2]) if "/r16/" in r.key]
    picks = choices(rows)
    assert len(picks) == 32  # every configuration, both stacks
    assert {c.chosen for c in picks} == {"hf", "unsloth"}  # each wins somewhere
    assert max(c.loss for c in picks) <= 0.02


def _fit(stack: str, card: str = "NVIDIA H100 80GB HBM3") -> SpeedFit:
    """A fit as bench/speed_table.py writes one, measured on `card` (NVML's name for it)."""
    return SpeedFit(
        stack=stack, gpu=card, gpu_class=resolve_gpu(card).device.name, costs=COSTS[stack],
        configurations=12, held_out_error=0.021, source="test", date="2026-12-05",
    )  # fmt: skip


def test_auto_takes_the_stack_predicted_faster_and_says_by_how_much() -> None:
    def speed_of(name: str) -> stacks.Predicted:
        return stacks.Predicted({"hf": 1.0, "unsloth": 1.25}[name], "speed model of 12 configurations", 0.05)

    name, why = stacks.choose(
        "auto", cuda=True, is_installed=dict.fromkeys(stacks.NAMES, True), speed=speed_of
    )
    assert name == "hf"
    assert why == (
        "auto: transformers predicted 1.25x the speed of Unsloth on this run "
        "(1.00 against 1.25 s a step; speed model of 12 configurations)"
    )


def test_auto_takes_the_faster_prediction_and_calls_a_difference_within_the_error_a_near_tie() -> None:
    """No margin keeps the first stack over a faster prediction: held out on the three measured
    tables (61 pairs), keeping Unsloth within the ratio's margin was 5.7% and 7.8% slower on the
    H100 tables' attention-only pairs, where the faster prediction was at worst 3.2% slower (one
    H200 pair). A difference within the error is still said to be a near tie."""
    installed = dict.fromkeys(stacks.NAMES, True)

    def speed_of(hf_s: float, ratio_error: float = 0.026) -> stacks.SpeedOf:
        return {
            "hf": stacks.Predicted(hf_s, "hf model", 0.056, ratio_error=ratio_error),
            "unsloth": stacks.Predicted(1.0, "u model", 0.040, ratio_error=ratio_error),
        }.get

    name, why = stacks.choose("auto", cuda=True, is_installed=installed, speed=speed_of(0.96))
    assert name == "hf"
    assert why == (
        "auto: transformers predicted 1.04x the speed of Unsloth on this run (0.96 against 1.00 s a step; "
        "hf model)"
    )
    name, why = stacks.choose("auto", cuda=True, is_installed=installed, speed=speed_of(0.98))
    assert name == "hf"
    assert why == (
        "auto: transformers predicted 1.02x the speed of Unsloth on this run (0.98 against 1.00 s a step; "
        "hf model): a near tie, within the typical error of the two speed models' ratio (2.6%; hf model)"
    )
    name, why = stacks.choose("auto", cuda=True, is_installed=installed, speed=speed_of(1.02))
    assert name == "unsloth" and why.endswith(
        "a near tie, within the typical error of the two speed models' ratio (2.6%; u model)"
    )
    # Without the ratio's error on both (fits written before it), the models' own errors say it.
    name, why = stacks.choose("auto", cuda=True, is_installed=installed, speed=speed_of(0.96, 0.0))
    assert name == "hf" and why.endswith(
        "within the typical error of the transformers speed model (5.6%; hf model)"
    )
    assert (
        stacks.margin(stacks.Predicted(1, "", 0.05, ratio_error=0.02), stacks.Predicted(1, "", 0.03)) == 0.05
    )
    # Of three, the fastest; an exact tie goes to the earlier in the order.
    three = {
        "a": stacks.Predicted(1.0, "", 0.05),
        "b": stacks.Predicted(0.9, "", 0.05),
        "c": stacks.Predicted(0.8, "", 0.3),
        "d": stacks.Predicted(1.0, "", 0.0),
    }
    assert stacks.fastest(["a", "b", "c"], three) == ("c", False)
    assert stacks.fastest(["a", "b"], three) == ("b", True)
    assert stacks.fastest(["d", "a"], three)[0] == "d" and stacks.fastest(["a", "d"], three)[0] == "a"
    assert stacks.fastest(["a"], three) == ("a", True)
    # The runner-up's model error can set the margin; fits without errors tie only exactly.
    name, why = stacks.choose(
        "auto", cuda=True, is_installed=installed,
        speed={"hf": stacks.Predicted(1.02, "h", 0.05), "unsloth": stacks.Predicted(1.0, "u", 0.01)}.get,
    )  # fmt: skip
    assert name == "unsloth" and why.endswith(
        "within the typical error of the transformers speed model (5.0%; h)"
    )
    name, why = stacks.choose(
        "auto", cuda=True, is_installed=installed,
        speed={"hf": stacks.Predicted(1.0, "h"), "unsloth": stacks.Predicted(1.0, "u")}.get,
    )  # fmt: skip
    assert name == "unsloth" and why.endswith(
        "1.00x the speed of transformers on this run (1.00 against 1.00 s a step; u): a tie, so the first that can run"
    )
    # Replayed on a table, the same rule.
    c = Choice("k", {"hf": 0.95, "unsloth": 1.0}, {"hf": 0.97, "unsloth": 1.0})
    assert c.chosen == "hf" and c.loss == 0.0
    c = Choice("k", {"hf": 1.05, "unsloth": 1.0}, {"hf": 0.99, "unsloth": 1.0})
    assert c.chosen == "hf" and c.loss == pytest.approx(0.05)
    assert c.ratio_miss == pytest.approx(abs(0.99 / 1.05 - 1))


def test_the_ratio_error_of_a_table_is_the_median_miss_of_its_predicted_pairs() -> None:
    # Six pairs whose measured ratios miss the predicted one by about 1%, 2% and 3% (twice each),
    # and a seventh pair whose hf step could not be predicted.
    def pair(key: str, miss: float) -> Choice:
        return Choice(key, {"hf": 0.96 * miss, "unsloth": 1.0}, {"hf": 0.96, "unsloth": 1.0})

    picks = [pair(str(i), m) for i, m in enumerate((1.01, 1.02, 1.03, 1.01, 1.02, 1.03))]
    picks.append(Choice("x", {"hf": 1.0, "unsloth": 1.0}, {"unsloth": 1.0}))  # no miss
    misses = [c.ratio_miss for c in picks]
    assert misses[:3] == pytest.approx([1 - 1 / 1.01, 1 - 1 / 1.02, 1 - 1 / 1.03]) and misses[6] is None
    assert speed_fit.typical_ratio_error(picks) == pytest.approx(1 - 1 / 1.02)
    assert picks[6].chosen is None and picks[6].loss is None
    # Fewer pairs than MIN_RATIO_PAIRS say too little: no ratio error, the models' own are quoted.
    assert speed_fit.typical_ratio_error(picks[: speed_fit.MIN_RATIO_PAIRS - 1]) == 0.0


def test_auto_without_a_prediction_for_every_stack_keeps_the_order_and_says_so() -> None:
    name, why = stacks.choose(
        "auto", cuda=True, is_installed=dict.fromkeys(stacks.NAMES, True),
        speed=lambda n: stacks.Predicted(1.0, "x") if n == "hf" else None,
    )  # fmt: skip
    assert name == "unsloth"
    assert why.endswith("no speed model covers every stack on this GPU, so the first that can run")
    # One stack that can run needs no model, and says nothing about one.
    assert stacks.choose("auto", cuda=False, speed=lambda n: None) == (
        "hf",
        "auto: no CUDA GPU, and Unsloth needs one",
    )


def test_a_fit_covers_the_runs_it_was_fitted_on_and_says_why_not_elsewhere() -> None:
    arch = catalog()["llama-3.1-8b"]

    def work(seq: int, mb: int, ga: int, k: int) -> StepWork:
        return step_work(
            arch, seq_len=seq, micro_batch=mb, grad_accum=ga, r=32, targets=ALL_LINEAR, checkpointed=k,
            peak_tflops=989,
        )  # fmt: skip

    rows = [work(4096, 2, 1, 32), work(8192, 1, 1, 32), work(16384, 1, 1, 32), work(2048, 1, 1, 0)]
    fit = dataclasses.replace(_fit("unsloth"), domain=speed.domain_of(rows))
    assert fit.domain == ((0.0, 2048, 1), (1.0, 8192, 1), (1.0, 16384, 1))
    # Micro-batches a step: up to twice a row's. Rows of one a step could not tell a step's fixed
    # costs from a micro-batch's (the H100 fit missed the 8B's 1 x 4 steps by 12-60%).
    assert fit.covers(work(4096, 2, 2, 32)) == ""
    assert fit.covers(work(4096, 2, 4, 32)) == "fitted on runs of 1 micro-batch a step, this run 4"
    # And down to half: rows of 4 a step cover 2 to 8.
    fours = dataclasses.replace(fit, domain=((1.0, 8192, 4),))
    assert fours.covers(work(4096, 2, 2, 32)) == "" and fours.covers(work(4096, 2, 8, 32)) == ""
    assert fours.covers(work(4096, 2, 1, 32)) == "fitted on runs of 4 micro-batches a step, this run 1"
    # The slack, at its edges: a quarter of the layers, and half or twice a row's tokens.
    assert fit.covers(work(4096, 1, 2, 24)) == ""  # 75% recomputed, 4,096 tokens: near (1.0, 8192)
    assert fit.covers(work(4095, 1, 2, 32)) == (
        "fitted on runs with 8,192-16,384 tokens a micro-batch at 100% of the layers recomputed, this run 4,095"
    )
    assert fit.covers(work(32768, 1, 1, 32)) == ""
    assert fit.covers(work(32769, 1, 1, 32)) != ""
    assert fit.covers(work(4096, 1, 1, 23)) == (
        "fitted on runs with 0% or 100% of the layers recomputed, this run 72%"  # none within a quarter
    )
    assert fit.covers(work(4096, 1, 1, 8)) == ""  # 25% recomputed, 4,096 tokens: near (0.0, 2048)
    # Each axis within the rows' ranges is not enough: a corner no row is near is outside.
    assert fit.covers(work(16384, 1, 1, 0)) == (
        "fitted on runs with 2,048 tokens a micro-batch at 0% of the layers recomputed, this run 16,384"
    )
    assert _fit("unsloth").covers(work(2048, 1, 4, 0)) == ""  # no domain recorded: no bounds
    # Written and read back as bench/speed_table.py writes it; a domain written before its third
    # axis was recorded had one micro-batch a step in every row.
    assert SpeedFit.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit
    old = {**fit.to_dict(), "domain": [[1.0, 8192], [0.0, 2048]]}
    assert SpeedFit.from_dict(old).domain == ((1.0, 8192, 1), (0.0, 2048, 1))


def test_auto_does_not_act_on_a_prediction_outside_its_models_runs() -> None:
    """The H200 Unsloth fit (every row fully recomputed) predicted 1.30 s for an 8B step without
    recomputation that took 0.69 s on an H100, where hf's prediction (0.84 s) held: acted on,
    auto would have taken the slower stack."""
    outside = "fitted on runs with 100% of the layers recomputed, this run 0%"
    installed = dict.fromkeys(stacks.NAMES, True)
    times = {
        "hf": stacks.Predicted(0.84, "hf model", 0.045),
        "unsloth": stacks.Predicted(1.30, "u model", 0.049, outside),
    }
    name, why = stacks.choose("auto", cuda=True, is_installed=installed, speed=times.get)
    assert name == "unsloth"
    assert why == (
        "auto: Unsloth is installed and a CUDA GPU is present; the Unsloth speed model was fitted on "
        "runs with 100% of the layers recomputed, this run 0%, so the first that can run"
    )
    # The other way round (hf's model outside, Unsloth's inside): the same rule.
    flipped = {
        "hf": stacks.Predicted(0.5, "hf model", 0.045, outside),
        "unsloth": stacks.Predicted(1.30, "u model", 0.049),
    }
    name, why = stacks.choose("auto", cuda=True, is_installed=installed, speed=flipped.get)
    assert name == "unsloth" and "the transformers speed model was fitted on runs with 100%" in why
    # A model outside and another missing: both said.
    name, why = stacks.choose("auto", cuda=True, is_installed=installed, speed={"hf": flipped["hf"]}.get)
    assert name == "unsloth" and why.endswith(
        "this run 0%; no speed model covers every stack on this GPU, so the first that can run"
    )


def test_the_layout_search_does_not_act_on_an_extrapolated_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the memory rules' layout lies far from every row of the stack's fit, the layouts are
    ranked by the measured recompute rule (Unsloth, 4-bit), as on a card without a fit; and a
    candidate far from the fit's rows is not taken on its prediction."""
    h100, cfg, arch = resolve_gpu("h100"), _seed(), catalog()["llama-3.1-8b"]
    chosen = (17, 2, 2)  # the memory rules' 2 x 2 at 24 GB: 53% recomputed, 8,192 tokens
    monkeypatch.setattr(speed, "fits", lambda: ())
    by_rule = est.fastest_layout(cfg, arch, "unsloth", 24.0, h100, chosen)
    assert by_rule is not None and "recompute rule measured on an H100" in by_rule[4]
    # A fit of fully recomputed rows only (as the H200's): the same layout, by the same rule.
    fit = dataclasses.replace(_fit("unsloth"), domain=((1.0, 8192, 1), (1.0, 16384, 1)))
    monkeypatch.setattr(speed, "fits", lambda: (fit,))
    assert est.fastest_layout(cfg, arch, "unsloth", 24.0, h100, chosen) == by_rule
    # With rows near every layout (2 micro-batches a step: 1 to 4 are near), the fit ranks them.
    points = ((0.0, 4096), (0.5, 8192), (1.0, 8192), (0.0, 16384))
    wide = dataclasses.replace(fit, domain=tuple((s, t, 2) for s, t in points))
    monkeypatch.setattr(speed, "fits", lambda: (wide,))
    by_fit = est.fastest_layout(cfg, arch, "unsloth", 24.0, h100, chosen)
    assert by_fit is not None and by_fit[:3] == (25, 4, 1) and "speed model of 12 configurations" in by_fit[4]
    # The same rows at one micro-batch a step leave 1 x 4 far from all of them: a fit that does
    # not cover every layout compared ranks none of them (it would have judged 1 x 4 against
    # layouts it does know), and the measured rule ranks them all, as without a fit.
    narrow = dataclasses.replace(fit, domain=tuple((s, t, 1) for s, t in points))
    monkeypatch.setattr(speed, "fits", lambda: (narrow,))
    assert est.fastest_layout(cfg, arch, "unsloth", 24.0, h100, chosen) == by_rule


def test_the_committed_fits_do_not_extrapolate_unsloth_to_runs_without_recomputation() -> None:
    """On the card of the committed fits, a run with the whole card to spend recomputes nothing:
    auto keeps Unsloth there, and the forecast says it extrapolates."""
    h200 = resolve_gpu("h200")
    if speed.fit_for("unsloth", h200.label) is None:
        pytest.skip("no committed Unsloth fit for the H200")
    cfg, arch = _seed(**{"hardware.gpu": "h200"}), catalog()["llama-3.1-8b"]
    uns = est.speed_predictor(cfg, arch, h200)("unsloth")
    assert uns is not None and uns.outside.startswith("fitted on runs with 100% of the layers recomputed")
    e = est.estimate(cfg, arch, "unsloth", gpu=h200)
    assert e.checkpointed_layers == 0
    f = est.forecast_step(cfg, e, h200)
    assert f is not None and "an extrapolation: fitted on runs with 100%" in f.basis and not f.host_bound


def test_the_predictor_plans_each_stack_at_the_budget_before_predicting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(speed, "fits", lambda: (_fit("hf"), _fit("unsloth")))
    cfg = load_preset("llama-3.1-8b-h100")
    arch = catalog()["llama-3.1-8b"]
    h100 = resolve_gpu("h100")
    predict = est.speed_predictor(cfg, arch, h100)
    hf, uns = predict("hf"), predict("unsloth")
    assert hf is not None and uns is not None
    assert uns.seconds < hf.seconds
    assert "12 configurations on NVIDIA H100 80GB HBM3, held out within 2%" in uns.basis
    # The prediction is for the plan each stack's own estimate chooses on this card.
    k, _ = est.choose_checkpointing(cfg, arch, "unsloth", h100.budget_gb, device=h100.device)
    mb, ga, _ = est.choose_split(cfg, arch, "unsloth", h100.budget_gb, k, device=h100.device)
    work = step_work(
        arch, seq_len=cfg.train.seq_len, micro_batch=mb, grad_accum=ga, r=cfg.lora.r,
        targets=est._targets(cfg, arch), checkpointed=k, peak_tflops=989,
    )  # fmt: skip
    assert uns.seconds == pytest.approx(predict_s(COSTS["unsloth"], work))
    # A model measured on another card predicts nothing here, not even one of the same class.
    monkeypatch.setattr(speed, "fits", lambda: (_fit("hf", "NVIDIA H200"), _fit("unsloth", "NVIDIA H200")))
    assert est.speed_predictor(cfg, arch, h100)("unsloth") is None


def test_the_estimate_says_which_stack_auto_predicts_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speed, "fits", lambda: (_fit("hf"), _fit("unsloth")))
    monkeypatch.setattr(est, "_nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(stacks, "installed", lambda s: True)
    cfg = load_preset("llama-3.1-8b-h100")
    e = est.estimate(cfg, gpu=resolve_gpu("h100"))
    assert e.backend == "unsloth"
    assert e.backend_reason.startswith("auto: Unsloth predicted ")
    assert "the speed of transformers on this run" in e.backend_reason


def test_the_committed_fits_load_and_name_what_they_rest_on() -> None:
    for f in speed.load_fits():
        assert f.stack in stacks.NAMES and set(f.costs) <= {*FEATURES, HOST}
        assert f.configurations >= 8 and f.source and f.date and f.gpu_class


def test_work_vector_follows_the_feature_order() -> None:
    w = StepWork(
        matmul=1, attention=2, dequant=3, elementwise=4, adapters=5, frozen=6, launches=7, tokens=8,
        recomputed_share=1.0, micro_batch_tokens=8192, grad_accum=1,
    )  # fmt: skip
    assert w.vector() == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)


def test_a_run_on_a_gpu_chooses_by_the_same_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own choice (the hello event's reason): the run's budget, this machine's GPU."""
    from engine.memory import checkpointing, gpus
    from engine.train import backends

    h100 = resolve_gpu("h100")
    monkeypatch.setattr(speed, "fits", lambda: (_fit("hf"), _fit("unsloth")))
    monkeypatch.setattr(stacks, "installed", lambda s: True)
    monkeypatch.setattr(checkpointing, "run_budget_gb", lambda spec: (h100.budget_gb, "budget"))
    monkeypatch.setattr(gpus, "resolve_gpu", lambda spec: h100)
    cfg = load_preset("llama-3.1-8b-h100")
    name, why = backends.choose_backend(cfg, "cuda")
    assert name == "unsloth" and why.startswith("auto: Unsloth predicted ")
    # A stack the model cannot predict (no fit for hf here) leaves the order as it was, and says so.
    monkeypatch.setattr(speed, "fits", lambda: (_fit("unsloth"),))
    name, why = backends.choose_backend(cfg, "cuda")
    assert name == "unsloth" and why.endswith(
        "no speed model covers every stack on this GPU, so the first that can run"
    )
    # An explicit stack is never second-guessed.
    explicit = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, backend="hf"))
    assert backends.choose_backend(explicit, "cuda") == ("hf", "requested in the preset")


def _seed(**changes: object) -> RunConfig:
    from tests.engine.test_batch_split import seed_recipe

    return seed_recipe(**changes)


@pytest.mark.parametrize("card", ["rtx4090", "h100"])
def test_with_a_speed_model_auto_takes_the_fastest_layout_that_fits(
    monkeypatch: pytest.MonkeyPatch, card: str
) -> None:
    """Both auto: every split of the step's rows, each with the fewest checkpointed layers that
    fit, and the one predicted fastest (it fits; nothing that fits is predicted faster)."""
    gpu = resolve_gpu(card)
    monkeypatch.setattr(speed, "fits", lambda: (_fit("unsloth", gpu.label),))
    cfg, arch = _seed(), catalog()["llama-3.1-8b"]
    rows, limit = 4, gpu.budget_gb * (1 - est.C.TIGHT_FRACTION)

    def predicted(m: int) -> tuple[float, int] | None:
        c = est.with_split(cfg, m, rows // m)
        k, _ = est.choose_checkpointing(c, arch, "unsloth", gpu.budget_gb, device=gpu.device)
        e = est.estimate(c, arch, "unsloth", checkpointed=k, gpu=gpu)
        if e.device_total_gb > limit:
            return None
        work = step_work(
            arch, seq_len=4096, micro_batch=m, grad_accum=rows // m, r=32, targets=ALL_LINEAR,
            checkpointed=k, peak_tflops=gpu.tensor_tflops or 0,
        )  # fmt: skip
        return predict_s(COSTS["unsloth"], work), k

    options = {m: p for m in (1, 2, 4) if (p := predicted(m)) is not None}
    best = min(options, key=lambda m: options[m][0])
    e = est.estimate(cfg, arch, "unsloth", gpu=gpu)
    assert (e.micro_batch, e.checkpointed_layers) == (best, options[best][1])
    assert e.device_total_gb <= limit
    if card == "rtx4090":
        # The memory rules keep 2 x 2 with 16 layers checkpointed; one row at a time fits with none.
        assert (e.micro_batch, e.grad_accum, e.checkpointed_layers) == (1, 4, 0)
    # Where that differs from the memory rules' layout, the split says why.
    k_rule, _ = est.choose_checkpointing(cfg, arch, "unsloth", gpu.budget_gb, device=gpu.device)
    m_rule, _, _ = est.choose_split(cfg, arch, "unsloth", gpu.budget_gb, k_rule, device=gpu.device)
    if (best, options[best][1]) != (m_rule, k_rule):
        assert "predicted" in e.split_reason and "speed model of 12 configurations" in e.split_reason
    # Without a model for this card, or with either key fixed, the memory rules' layout stands.
    monkeypatch.setattr(speed, "fits", lambda: ())
    plain = est.estimate(cfg, arch, "unsloth", gpu=gpu)
    monkeypatch.setattr(speed, "fits", lambda: (_fit("unsloth", gpu.label),))
    for fixed in (_seed(**{"train.batch_split": "fixed"}), _seed(**{"train.gradient_checkpointing": True})):
        assert est.fastest_layout(fixed, arch, "unsloth", gpu.budget_gb, gpu, (32, 2, 2)) is None
    assert "speed model" not in plain.split_reason


def test_the_run_plans_the_layout_the_estimate_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.memory import checkpointing, gpus

    gpu = resolve_gpu("rtx4090")
    monkeypatch.setattr(speed, "fits", lambda: (_fit("unsloth", gpu.label),))
    monkeypatch.setattr(checkpointing, "run_budget_gb", lambda spec: (gpu.budget_gb, "budget: test"))
    monkeypatch.setattr(checkpointing, "resolve_gpu", lambda spec: gpu)
    monkeypatch.setattr(gpus, "resolve_gpu", lambda spec: gpu)
    cfg, arch = _seed(), catalog()["llama-3.1-8b"]
    plan, split = checkpointing.plan_layout(cfg, "unsloth", "cuda", arch.layers)
    e = est.estimate(cfg, arch, "unsloth", gpu=gpu)
    assert (plan.checkpointed, split.micro_batch, split.grad_accum) == (
        e.checkpointed_layers, e.micro_batch, e.grad_accum,
    )  # fmt: skip
    assert split.micro_batch * split.grad_accum == 4
    # On the CPU, or with several processes, nothing is searched.
    cpu_plan, cpu_split = checkpointing.plan_layout(cfg, "unsloth", "cpu", arch.layers)
    assert cpu_plan.checkpointed == arch.layers and not cpu_split.changed(cfg)
    ranks_plan, ranks_split = checkpointing.plan_layout(cfg, "unsloth", "cuda", arch.layers, processes=2)
    assert not ranks_split.changed(cfg) and "several processes" in ranks_split.reason
    assert (
        ranks_plan.checkpointed
        == est.choose_checkpointing(cfg, arch, "unsloth", gpu.budget_gb, device=gpu.device)[0]
    )


def test_an_estimate_forecasts_its_speed_where_a_model_covers_its_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu = resolve_gpu("h100")
    cfg, arch = _seed(), catalog()["llama-3.1-8b"]
    monkeypatch.setattr(speed, "fits", lambda: ())
    e = est.estimate(cfg, arch, "unsloth", gpu=gpu)
    assert est.forecast_step(cfg, e, gpu) is None
    monkeypatch.setattr(speed, "fits", lambda: (_fit("unsloth"),))
    e = est.estimate(cfg, arch, "unsloth", gpu=gpu)
    f = est.forecast_step(cfg, e, gpu)
    assert f is not None
    work = step_work(
        arch, seq_len=4096, micro_batch=e.micro_batch, grad_accum=e.grad_accum, r=32, targets=ALL_LINEAR,
        checkpointed=e.checkpointed_layers, peak_tflops=989,
    )  # fmt: skip
    assert f.step_s == pytest.approx(predict_s(COSTS["unsloth"], work))
    assert f.tokens_per_s == pytest.approx(16384 / f.step_s)
    assert f.utilisation == pytest.approx(f.tokens_per_s * e.flops_per_token / 989e12)
    assert str(f).startswith(f"{f.step_s:.2f} s a step, about ") and "12 configurations" in str(f)
    # The hf stack has no model here: nothing is forecast for it.
    assert est.forecast_step(cfg, est.estimate(cfg, arch, "hf", gpu=gpu), gpu) is None


def test_a_forecast_says_when_the_host_sets_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, cfg, arch = resolve_gpu("h100"), _seed(), catalog()["llama-3.1-8b"]
    for host, bound in ((0.0, False), (40.0, True)):  # ms a layer pass: none, or far above the device
        fit = dataclasses.replace(_fit("unsloth"), costs={**HOSTED["unsloth"], HOST: host})
        monkeypatch.setattr(speed, "fits", lambda fit=fit: (fit,))
        e = est.estimate(cfg, arch, "unsloth", gpu=gpu)
        f = est.forecast_step(cfg, e, gpu)
        assert f is not None and f.host_bound is bound
        assert ("bound by the host" in str(f)) is bound
        assert ("batch_split: auto" in str(f)) is (bound and cfg.train.batch_split != "auto")
        if bound:
            passes = e.grad_accum * (3 * arch.layers + e.checkpointed_layers)
            assert f.step_s == pytest.approx(host * passes / 1e3)


def test_nothing_is_predicted_for_a_16_bit_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fits are of 4-bit runs: a 16-bit base dequantizes nothing, and its steps were never timed."""
    monkeypatch.setattr(speed, "fits", lambda: (_fit("hf"), _fit("unsloth")))
    cfg, arch, h100 = _seed(**{"quant.load_in_4bit": False}), catalog()["llama-3.1-8b"], resolve_gpu("h100")
    assert est.speed_predictor(cfg, arch, h100)("unsloth") is None
    assert est.fastest_layout(cfg, arch, "unsloth", 80.0, h100, (0, 2, 2)) is None
    assert est.forecast_step(cfg, est.estimate(cfg, arch, "unsloth", gpu=h100), h100) is None


def test_a_layout_that_fits_beats_the_memory_rules_one_that_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 x 1 rows on 12 GiB: even with every layer checkpointed 8 x 1 does not fit, smaller
    micro-batches do; the search took 'faster than the layout that runs out of memory' as None."""
    gpu = resolve_gpu("12GB")
    card = dataclasses.replace(resolve_gpu("h100"), budget_gb=gpu.budget_gb)
    monkeypatch.setattr(speed, "fits", lambda: (_fit("unsloth"),))
    cfg, arch = _seed(**{"train.micro_batch": 8, "train.grad_accum": 1}), catalog()["llama-3.1-8b"]
    k, _ = est.choose_checkpointing(cfg, arch, "unsloth", card.budget_gb, device=card.device)
    assert k == arch.layers
    found = est.fastest_layout(cfg, arch, "unsloth", card.budget_gb, card, (k, 8, 1))
    assert found is not None
    k, mb, ga, _, why = found
    assert mb * ga == 8 and mb < 8 and "fits where 8 x 1 does not" in why
    e = est.estimate(est.with_split(cfg, mb, ga), arch, "unsloth", checkpointed=k, gpu=card)
    assert e.device_total_gb <= card.budget_gb


def test_advice_starts_from_the_stack_the_estimate_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a speed model that picks hf, the advice was worked out for Unsloth's lower peak."""
    from engine.memory import advise

    cheap_hf = {"hf": dict(COSTS["unsloth"], matmul=1.0), "unsloth": COSTS["hf"]}
    gpu = resolve_gpu("rtx4090")
    fits = tuple(dataclasses.replace(_fit(s, gpu.label), costs=c) for s, c in cheap_hf.items())
    monkeypatch.setattr(speed, "fits", lambda: fits)
    monkeypatch.setattr(est, "_nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(stacks, "installed", lambda s: True)
    cfg = _seed(
        **{"train.gradient_checkpointing": False, "train.batch_split": "fixed", "hardware.backend": "auto"}
    )
    e = est.estimate(cfg, gpu=gpu)
    assert e.backend == "hf" and e.backend_reason.startswith("auto: transformers predicted")
    advice = advise(cfg, gpu)
    assert advice and all(a.before_gb == pytest.approx(e.device_total_gb) for a in advice)


def test_with_no_fit_a_run_resolves_no_architecture_to_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed predictor resolves the architecture (a hub request for a hub model): not before
    any fit exists for the card in use."""
    from engine.memory import architectures
    from engine.train import backends

    resolved: list[object] = []  # a raise would be swallowed: the predictor never stops a run
    monkeypatch.setattr(architectures, "resolve_architecture", resolved.append)
    monkeypatch.setattr(speed, "fits", lambda: ())
    monkeypatch.setattr(stacks, "installed", lambda s: True)
    assert backends.choose_backend(load_preset("llama-3.1-8b-h100"), "cuda")[0] == "unsloth"
    assert not resolved
