"""The calibration matrix spans what issue 15 asks, on both backends, and its order is one an
Unsloth process can walk."""

from __future__ import annotations

from bench import calibration_plan as cp

PLAN = cp.build_plan()


def _configs(backend: str) -> list[cp.ConfigPlan]:
    return [c for w in PLAN.workers if w.backend == backend for c in w.configs]


def test_each_backend_spans_the_issue_15_matrix() -> None:
    for backend in ("hf", "unsloth"):
        configs = _configs(backend)
        archs = {cp.architecture(c.arch) for c in configs}
        assert len(archs) >= 5
        params = [a.param_counts()["total"] for a in archs]
        assert min(params) < 1.5e9 and max(params) > 13e9  # 1B to 14B
        assert {a.tied_embeddings for a in archs} == {True, False}
        assert min(a.vocab for a in archs) <= 32768 and max(a.vocab for a in archs) >= 262144
        assert {c.shape.gc for c in configs} == {"all", "half", "none"}
        assert min(c.shape.seq for c in configs) <= 1024 and max(c.shape.seq for c in configs) >= 16384
        assert min(c.shape.mb for c in configs) == 1 and max(c.shape.mb for c in configs) >= 8
        assert {c.lora.targets for c in configs} == {"all", "attn"}
        assert min(c.lora.r for c in configs) <= 16 and max(c.lora.r for c in configs) >= 128
    ranks = {c.lora.r for c in _configs("hf") + _configs("unsloth")}
    assert min(ranks) == 8
    gqa = {cp.architecture(c.arch).heads // cp.architecture(c.arch).kv_heads for c in _configs("hf")}
    assert min(gqa) <= 4 and max(gqa) >= 7


def test_ids_are_unique_and_fit_the_device_cap() -> None:
    ids = [c.id for w in PLAN.workers for c in w.configs]
    assert len(ids) == len(set(ids))
    assert all(c.est_device_gib <= 60.0 for w in PLAN.workers for c in w.configs)
    assert all(c.shape.seq <= cp.architecture(c.arch).max_positions for w in PLAN.workers for c in w.configs)


def test_unsloth_processes_keep_one_lora_and_run_partial_checkpointing_last() -> None:
    for w in PLAN.workers:
        if w.backend != "unsloth":
            continue
        assert len({c.lora for c in w.configs}) == 1
        modes = [c.shape.gc for c in w.configs]
        if "half" in modes:
            assert all(m == "half" for m in modes[modes.index("half") :])


def test_unsloth_can_take_a_fresh_process_for_each_checkpointing_mode() -> None:
    split = cp.build_plan(unsloth_process_per_gc=True)
    ours = [w for w in split.workers if w.backend == "unsloth"]
    assert all(len({(c.lora, c.shape.gc) for c in w.configs}) == 1 for w in ours)
    # The same configurations as the plan with one process per LoRA group, in more processes.
    ids = sorted(c.id for w in ours for c in w.configs)
    assert ids == sorted(c.id for w in PLAN.workers if w.backend == "unsloth" for c in w.configs)
    assert len(ours) > len([w for w in PLAN.workers if w.backend == "unsloth"])
    assert [w for w in split.workers if w.backend == "hf"] == [w for w in PLAN.workers if w.backend == "hf"]


def test_unsloth_generic_path_gets_one_process_per_checkpointing_mode_always() -> None:
    # Unsloth's generic path (Gemma 3, Phi-4) refuses a second get_peft_model: a process there can
    # never change its mode, so the plan splits it even when not asked to (2026-12-05: one process
    # holding three modes lost all six Gemma-3-1B configurations).
    for name in ("gemma-3-1b", "llama-3.2-1b"):
        generic = cp.architecture(name).family not in cp.UNSLOTH_FAST_FAMILIES
        for w in cp.build_plan([name], backends=("unsloth",)).workers:
            assert len({c.shape.gc for c in w.configs}) == 1 or not generic
            assert w.name.endswith(f"-gc-{w.configs[0].shape.gc}") == generic


def test_end_to_end_runs_repeat_or_hold_out_configurations() -> None:
    ids = {c.id for w in PLAN.workers for c in w.configs}
    for e in PLAN.e2e:
        if e.same_as:
            assert e.same_as in ids
        else:
            twin = f"{e.arch}/{e.backend}/{e.lora.name}/{e.shape.name}"
            assert twin not in ids  # held out: no in-process record of it


def test_dry_run_specs_are_small() -> None:
    spec = PLAN.workers[0].configs[0].spec(dry_run=True)
    assert spec["seq_len"] <= 256 and spec["steps"] == 3


def test_unsloth_processes_run_their_shortest_micro_batches_first() -> None:
    # Unsloth's staging buffers grow to the largest micro-batch its process has run and stay: a
    # configuration after a longer one would be measured with the longer one's buffers.
    for w in PLAN.workers:
        if w.backend != "unsloth":
            continue
        full = [c.shape.tokens for c in w.configs if c.shape.gc != "half"]
        assert full == sorted(full), w.name


def test_an_unsloth_process_runs_what_is_worth_more_than_its_partial_configuration() -> None:
    # Walk each Unsloth worker as the matrix does with time to spare: the first candidate runs.
    # (Sorting by tokens once made a partial configuration outrank the shortest full one, and the
    # partial run closed off every fully checkpointed configuration of its process.)
    for w in PLAN.workers:
        if w.backend != "unsloth":
            continue
        remaining, half_done, ran = list(w.configs), False, []
        while candidates := cp.unsloth_candidates(remaining, half_done):
            c = candidates[0]
            ran.append(c)
            remaining.remove(c)
            half_done = half_done or c.shape.gc == "half"
        modes = [c.shape.gc for c in ran]
        if "half" in modes:
            assert "all" not in modes[modes.index("half") :], w.name
        # A partial configuration may close off full ones worth less than itself, never more.
        best_half = max((c.value for c in w.configs if c.shape.gc == "half"), default=0.0)
        assert {c.id for c in w.configs if c.value > best_half} <= {c.id for c in ran}, w.name
        assert all(c.shape.gc == "all" for c in w.configs if c not in ran), w.name


def test_several_micro_batches_a_step_are_planned_on_request() -> None:
    """The speed table's second axis (bench/calibration_matrix.py --grad-accum-shapes): steps of 2
    and 4 micro-batches, on the base LoRA group only, named apart; the default plan has none."""
    assert {c.shape.ga for w in PLAN.workers for c in w.configs} == {1}
    plan = cp.build_plan(["llama-3.2-1b"], ("hf",), grad_accum=True)
    several = [c for w in plan.workers for c in w.configs if c.shape.ga > 1]
    assert {c.id for c in several} == {
        "llama-3.2-1b/hf/r16-all/s2048x1a4-nogc",
        "llama-3.2-1b/hf/r16-all/s4096x1a4-nogc",
        "llama-3.2-1b/hf/r16-all/s4096x2a2-half",
        "llama-3.2-1b/hf/r16-all/s4096x1a4",
    }
    spec = next(c for c in several if c.id.endswith("s2048x1a4-nogc")).spec()
    assert (spec["seq_len"], spec["micro_batch"], spec["grad_accum"], spec["checkpointed_layers"]) == (
        2048,
        1,
        4,
        0,
    )
    # Memory follows the micro-batch, the step's time all four.
    shape = cp.GA_NOGC
    assert (shape.tokens, shape.step_tokens) == (2048, 8192)
