"""More than one process per run, on CPUs: torchrun, gloo, two engine processes on the tiny model.

The real engine through `qlc`: a run over two "hosts" (two torchrun launchers on this machine,
one process each, as `qlc train --nnodes 2` and `qlc join` start them), a run on one host with two
processes that takes a live sample, is stopped through its control FIFO and resumed on two, and
the first run resumed from a checkpoint on one process. FSDP cannot train on CPUs (accelerate
shards only on GPUs), so for it the layout it rests on is checked directly (fsdp_shards_on_cpu.py).
The settings, launch commands and per-GPU memory model are checked without training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import protocol
from engine.config import load_preset
from engine.errors import ConfigError, UserError
from engine.memory import distributed as per_gpu
from engine.memory import resolve_gpu
from engine.run import distributed, launcher, runs
from tests.conftest import REPO, as_if_crashed, qlc
from tui.commands.estimate import load_target

STEPS = 12
CPU2 = ["hardware.device=cpu", "hardware.gpus=2"]
TRAIN = [
    f"train.max_steps={STEPS}",
    "train.logging_steps=1",
    "train.save_steps=4",
    "train.eval_steps=0",
    "data.val_fraction=0",
    "train.micro_batch=4",
]


def _sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


# ---------------------------------------------------------------------------------------------
# Settings, launch commands, memory model: no training
# ---------------------------------------------------------------------------------------------


def test_gpus_and_strategy_are_hardware_settings() -> None:
    cfg = load_preset("tiny-demo", ["gpus=2", "strategy=ddp"])
    assert (cfg.hardware.gpus, cfg.hardware.strategy) == (2, "ddp")
    assert load_preset("tiny-demo", ["hardware.gpus=auto"]).hardware.gpus == "auto"
    assert load_preset("tiny-demo").hardware.gpus == 1


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["hardware.gpus=0"], "--set hardware.gpus=0: must be at least 1"),
        (["hardware.gpus=two"], "--set hardware.gpus=two: expected int or 'auto'"),
        (["hardware.strategy=zero3"], "--set hardware.strategy=zero3: 'zero3' is not one of 'ddp', 'fsdp'"),
        ([*CPU2, "hardware.strategy=fsdp"], "fsdp needs CUDA GPUs"),
        (["hardware.gpus=2", "hardware.strategy=fsdp"], "set train.optimizer=adamw_torch"),
        (["hardware.gpus=2", "hardware.backend=unsloth"], "unsloth trains on one GPU"),
    ],
)
def test_impossible_settings_name_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_preset("tiny-demo", overrides)


def test_processes_per_node_counts_gpus_or_cpu_processes() -> None:
    def n(overrides: list[str], here: int) -> int:
        return distributed.processes_per_node(load_preset("tiny-demo", overrides), gpus_here=here)

    assert n(CPU2, 0) == 2  # CPU processes over gloo: no GPU needed
    assert n(["hardware.gpus=auto"], 4) == 4 and n(["hardware.gpus=auto"], 0) == 1
    assert n(["hardware.gpus=2"], 8) == 2
    with pytest.raises(UserError, match=r"2 asked for but 0 CUDA GPUs are visible.*hardware.device=cpu"):
        n(["hardware.gpus=2"], 0)
    with pytest.raises(UserError, match=r"4 asked for but 1 CUDA GPU is visible.*hardware.gpus=1"):
        n(["hardware.gpus=4"], 1)


def test_ranks_come_from_torchrun_environment() -> None:
    assert distributed.Ranks.from_env({}) == distributed.Ranks()
    r = distributed.Ranks.from_env(
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    )
    assert (r.rank, r.local_rank, r.world_size, r.is_main, r.distributed) == (3, 1, 4, False, True)
    alone = distributed.Ranks.from_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert alone.distributed and alone.is_main  # torchrun with one process: still a process group


def test_torchrun_is_launched_for_several_processes_only(tmp_path: Path) -> None:
    one = runs.create_run(tmp_path, load_preset("tiny-demo", ["hardware.device=cpu"]))
    assert launcher.train_command(one)[1:] == ["-m", "engine", "train", str(one)]
    two = runs.create_run(tmp_path, load_preset("tiny-demo", CPU2))
    cmd = launcher.train_command(two, resume=True)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert "--nproc-per-node=2" in cmd and cmd[-4:] == ["-m", "engine", "resume", str(two)]
    nodes = distributed.Nodes(nnodes=3, node_rank=2, rdzv_endpoint="node0.lan:29500")
    cmd = launcher.train_command(one, nodes=nodes)
    assert {"--nnodes=3", "--node-rank=2", "--master-addr=node0.lan", "--master-port=29500"} <= set(cmd)
    assert "--standalone" not in cmd and "--nproc-per-node=1" in cmd


@pytest.mark.parametrize(
    "nodes, needle",
    [
        (distributed.Nodes(nnodes=2), "--rdzv-endpoint: (none) is not host:port"),
        (distributed.Nodes(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), "--node-rank: 2 is not a node of 2"),
        (distributed.Nodes(node_rank=1), "--node-rank: a run on one host has only node 0"),
    ],
)
def test_bad_node_settings_are_one_line(nodes: distributed.Nodes, needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        nodes.check()


def test_asking_for_absent_gpus_writes_nothing(tmp_path: Path) -> None:
    """This machine has no CUDA GPU: two asked for is refused before a run directory exists."""
    result = qlc("--runs-dir", str(tmp_path), "train", "tiny-demo", *_sets("hardware.gpus=2"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0 and "hardware.gpus: 2 asked for" in result.stderr
    assert not runs.list_run_dirs(tmp_path)


def test_per_gpu_memory_by_strategy() -> None:
    cfg = load_preset("llama-3.1-8b-rtx4090")
    one = per_gpu.per_gpu(cfg, 1)
    ddp, fsdp = per_gpu.per_gpu(cfg, 2, "ddp"), per_gpu.per_gpu(cfg, 2, "fsdp")
    # DDP: the whole model on each GPU, plus its gradient buckets (a second copy of the gradients).
    buckets = ddp.term("gradients").parts["DDP gradient buckets (a second copy, all-reduced)"]
    assert buckets == pytest.approx(one.term("gradients").gb)
    assert ddp.device_total_gb == pytest.approx(one.device_total_gb + buckets)
    # FSDP: the packed 4-bit weights halve; their quantization state stays whole on each GPU.
    w = fsdp.term("weights").parts
    assert w["4-bit linears, packed (1/2 each)"] * 2 + w["4-bit quantization state (every GPU)"] == (
        pytest.approx(one.term("weights").parts["4-bit linears"])
    )
    assert fsdp.device_total_gb < one.device_total_gb < ddp.device_total_gb
    assert per_gpu.per_gpu(cfg, 4, "fsdp").device_total_gb < fsdp.device_total_gb
    assert any("adamw_torch" in n for n in fsdp.notes) and fsdp.host_load_gb > 0


def test_gpus_needed_for_a_70b_on_24gb_cards() -> None:
    cfg = load_target("llama-3.3-70b", ["train.seq_len=2048"])
    gpu = resolve_gpu("rtx4090")
    needed = per_gpu.gpus_needed(cfg, gpu)
    n = needed.needed["fsdp"]
    assert needed.needed["ddp"] is None and n is not None and n > 1  # 4-bit 70B is ~37 GB
    fits = {
        k: per_gpu.per_gpu(cfg, k, "fsdp", budget_gb=gpu.budget_gb).verdict(gpu).status for k in (n - 1, n)
    }
    assert fits[n] == "fits" and (n - 1 == 1 or fits[n - 1] != "fits")  # the fewest that fit
    assert needed.best == ("fsdp", n)

    result = qlc("fit", "llama-3.3-70b", "--gpu", "rtx4090", "--set", "train.seq_len=2048", "--json")
    data = json.loads(result.stdout)
    assert data["gpus_needed"] == {"ddp": None, "fsdp": n} and data["gpus_needed_gb_each"]["fsdp"] < 24
    shown = qlc(
        "estimate",
        "llama-3.3-70b",
        "--gpu",
        "rtx4090",
        "--gpus",
        str(n),
        "--strategy",
        "fsdp",
        "--set",
        "train.seq_len=2048",
    )
    assert shown.returncode == 0 and f"per GPU: {n} x NVIDIA GeForce RTX 4090" in shown.stdout


# The two runs that said "(auto: even with every layer checkpointed it needs more than 11.3 GiB)"
# and then "FITS ... 10.91 GiB": auto searched the one-GPU plan (the whole model), the verdict
# compared one GPU's FSDP share.
FSDP_AUTO_CASES = [
    ("gemma-3-12b-rtx4090", "12GB", 2),
    ("llama-3.1-8b-rtx4060", "16GB", 3),
]


@pytest.mark.parametrize(("preset", "card", "gpus"), FSDP_AUTO_CASES)
def test_auto_checkpointing_under_fsdp_plans_on_the_per_gpu_figure_the_verdict_compares(
    preset: str, card: str, gpus: int
) -> None:
    from engine.memory import constants as C
    from engine.memory.fit import with_changes

    sets = [f"hardware.gpus={gpus}", "hardware.strategy=fsdp", "train.optimizer=adamw_torch"]
    cfg, gpu = load_preset(preset, sets), resolve_gpu(card)
    assert cfg.train.gradient_checkpointing == "auto"
    e = per_gpu.per_gpu(cfg, gpus, gpu=gpu)
    k, layers, why = e.base.checkpointed_layers, e.arch.layers, e.base.checkpoint_reason
    status, limit = e.verdict(gpu).status, gpu.budget_gb * (1 - C.TIGHT_FRACTION)
    assert f"on each of {gpus} GPUs under fsdp" in why, why
    # The reason and the verdict say the same: "needs more than" only where it does not fit.
    assert ("even with every layer checkpointed" in why) == (status != "fits"), (why, status)
    assert status == "fits" and e.device_total_gb <= limit
    # The fewest layers that fit one GPU's share: one fewer would not.
    assert f"{k} of {layers} layers checkpointed" in why
    if k > 0:
        fewer = with_changes(cfg, **{"train.gradient_checkpointing": k - 1})
        assert per_gpu.per_gpu(fewer, gpus, gpu=gpu).device_total_gb > limit
    # One GPU's plan (the whole model) is what it used to search: it checkpoints at least as many.
    one = per_gpu.per_gpu(with_changes(cfg, **{"hardware.gpus": 1}), 1, gpu=gpu)
    assert one.base.checkpointed_layers >= k


def test_a_run_on_several_gpus_checkpoints_what_its_estimate_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own plan (engine.memory.checkpointing) spends each GPU's budget on its share,
    as `qlc estimate --gpus N` does: the layers a rank checkpoints are the ones the estimate shows."""
    from engine.memory import checkpointing

    preset, card, gpus = FSDP_AUTO_CASES[1]
    gpu = resolve_gpu(card)
    monkeypatch.setattr(checkpointing, "run_budget_gb", lambda spec: (gpu.budget_gb, "budget: test"))
    monkeypatch.setattr(checkpointing, "resolve_gpu", lambda spec: gpu)
    for strategy in ("fsdp", "ddp"):
        sets = [f"hardware.gpus={gpus}", f"hardware.strategy={strategy}", "train.optimizer=adamw_torch"]
        cfg = load_preset(preset, sets)
        shown = per_gpu.per_gpu(cfg, gpus, gpu=gpu)
        plan = checkpointing.plan_checkpointing(cfg, "hf", "cuda", shown.arch.layers, processes=gpus)
        assert plan.checkpointed == shown.base.checkpointed_layers, (strategy, plan.reason)
        assert f"under {strategy}" in plan.reason


# ---------------------------------------------------------------------------------------------
# Training: two processes on CPUs
# ---------------------------------------------------------------------------------------------


def _wait(run_dir: Path, predicate, timeout: float = 180) -> protocol.Event:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in runs.read_events(run_dir)[0]:
            if predicate(ev):
                return ev
        time.sleep(0.1)
    raise AssertionError(f"timed out; engine.log:\n{(run_dir / runs.ENGINE_LOG).read_text()[-3000:]}")


def _steps(run_dir: Path) -> dict[int, float]:
    return {e.step: e.loss for e in runs.read_events(run_dir)[0] if isinstance(e, protocol.Step)}


def _processes_of(run_dir: Path) -> list[int]:
    """Live processes whose command line names the run directory (torchrun and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(run_dir).encode() in cmdline:
                found.append(int(entry.name))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run over two 'hosts' of one process each (node 0 started by `qlc train
    --nnodes 2`, node 1 by `qlc join`), the reference for the runs below: the same two ranks
    see the same data as two processes on one host."""
    root = tmp_path_factory.mktemp("hosts")
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {"OMP_NUM_THREADS": "1"}  # two launchers on two cores: one thread each
    nodes = ["--nnodes", "2", "--rdzv-endpoint", endpoint]
    started = qlc(
        "--runs-dir",
        str(root),
        "train",
        "tiny-demo",
        *_sets("hardware.device=cpu", *TRAIN),
        *nodes,
        "--detach",
        env=env,
    )
    assert started.returncode == 0, started.stderr
    (run_dir,) = runs.list_run_dirs(root)
    joined = qlc("--runs-dir", str(root), "join", run_dir.name, *nodes, "--node-rank", "1", env=env)
    assert joined.returncode == 0, joined.stderr + (run_dir / "engine-node1.log").read_text()[-3000:]
    _wait(run_dir, lambda e: isinstance(e, protocol.Finished))
    # Node 0's run ends first; node 1's torchrun agent leaves after its exit barrier, which on a
    # busy 2-core machine can take a while. Every process of the run must be gone within a minute.
    deadline = time.monotonic() + 60
    while (runs.is_running(run_dir) or _processes_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return run_dir


@pytest.mark.slow
def test_two_ranks_train_and_only_rank_0_writes(two_hosts: Path) -> None:
    events, _ = runs.read_events(two_hosts)
    hellos = [e for e in events if isinstance(e, protocol.Hello)]
    assert len(hellos) == 1 and hellos[0].world_size == 2 and hellos[0].device == "2 x cpu (gloo, ddp)"
    steps = [e for e in events if isinstance(e, protocol.Step)]
    assert [e.step for e in steps] == list(range(1, STEPS + 1))  # one event per step: rank 0 only
    for e in steps:
        assert [d.rank for d in e.devices] == [0, 1] and all(d.host_rss_gb > 0.1 for d in e.devices)
    assert [e.step for e in events if isinstance(e, protocol.CheckpointSaved)] == [4, 8, 12]
    ready = next(e for e in events if isinstance(e, protocol.DataReady))
    assert ready.steps_per_epoch == 75  # 600 rows / (micro-batch 4 x 2 ranks)
    losses = _steps(two_hosts)
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)) - 3.0
    assert events[-1].status == "completed" and (two_hosts / runs.ADAPTER / "adapter_config.json").is_file()
    for log in (runs.ENGINE_LOG, "engine-node1.log"):
        # No engine process failed. (torchrun's own agents may log a failed exit barrier when node
        # 0's agent, which holds the rendezvous store, leaves first: their lines start "E1123 ...".)
        assert not re.search(r"^(\[rank\d+\]: )?Traceback", (two_hosts / log).read_text(), re.M)
    assert not _processes_of(two_hosts)


@pytest.mark.slow
def test_two_processes_sample_stop_and_resume(two_hosts: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    started = qlc("--runs-dir", str(root), "train", "tiny-demo", *_sets(*CPU2, *TRAIN), "--detach", "--json")
    assert started.returncode == 0, started.stderr
    (run_dir,) = runs.list_run_dirs(root)
    _wait(run_dir, lambda e: isinstance(e, protocol.Step) and e.step >= 2)

    # A live sample: rank 0 reads it from the FIFO, every rank takes it at the same step, rank 0
    # generates (DDP ranks hold the whole model) and alone streams it.
    live = qlc(
        "--runs-dir",
        str(root),
        "sample",
        run_dir.name,
        "--live",
        "What is 4 plus 4?",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert live.returncode == 0, live.stderr
    assert protocol.decode_event(live.stdout.splitlines()[-1]).source == "live"

    stop = qlc("--runs-dir", str(root), "stop", run_dir.name)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    events, _ = runs.read_events(run_dir)
    finished = events[-1]
    assert isinstance(finished, protocol.Finished) and finished.status == "stopped"
    stopped_at = finished.step
    assert stopped_at < STEPS and finished.last_checkpoint.endswith(f"checkpoint-{stopped_at}")
    assert len([e for e in events if isinstance(e, protocol.Sample)]) == 1
    # Every rank is gone: torchrun and both workers, not only rank 0 (which held the lock).
    deadline = time.monotonic() + 60
    while _processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_of(run_dir) and not runs.is_running(run_dir)

    resumed = qlc("--runs-dir", str(root), "resume", run_dir.name)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    events, _ = runs.read_events(run_dir)
    hellos = [e for e in events if isinstance(e, protocol.Hello)]
    assert [(h.mode, h.world_size) for h in hellos] == [("train", 2), ("resume", 2)]
    assert hellos[1].resumed_from == f"checkpoint-{stopped_at}" and events[-1].status == "completed"
    ours, theirs = _steps(run_dir), _steps(two_hosts)
    # The same two ranks on the same data: the resumed steps retrace the uninterrupted run. (On a
    # CPU, bitsandbytes' inference kernel moves later losses by ~1e-4 after a live sample, growing
    # to ~1e-3 by the last step; a resume that lost a rank's data position or state is off by
    # tenths.)
    for step in range(stopped_at + 1, STEPS + 1):
        assert abs(ours[step] - theirs[step]) <= 5e-3, f"step {step}: {ours[step]} vs {theirs[step]}"


@pytest.mark.slow
def test_resume_on_another_number_of_processes(two_hosts: Path, tmp_path: Path) -> None:
    """DDP checkpoints hold the full adapter and optimizer state: a run saved by two processes
    resumes on one. The global batch halves, so steps per epoch double and the data read after
    the checkpoint is another slice."""
    root = tmp_path / "runs"
    root.mkdir()
    copy = root / two_hosts.name
    shutil.copytree(two_hosts, copy, ignore=shutil.ignore_patterns(runs.CONTROL, runs.LOCK))
    os.mkfifo(copy / runs.CONTROL, 0o600)
    as_if_crashed(copy, after_checkpoint=STEPS - 4)  # resume from the one before the last
    result = qlc("--runs-dir", str(root), "resume", copy.name, "--gpus", "1")
    assert result.returncode == 0, result.stderr + result.stdout
    assert load_preset(str(copy / runs.CONFIG)).hardware.gpus == 1  # the run's config says so now
    events, _ = runs.read_events(copy)
    hello = [e for e in events if isinstance(e, protocol.Hello)][-1]
    assert (hello.world_size, hello.device, hello.resumed_from) == (1, "cpu", f"checkpoint-{STEPS - 4}")
    ready = [e for e in events if isinstance(e, protocol.DataReady)][-1]
    assert ready.steps_per_epoch == 150
    steps = [e.step for e in events[events.index(hello) :] if isinstance(e, protocol.Step)]
    assert steps == list(range(STEPS - 3, STEPS + 1)) and events[-1].status == "completed"
    last = _steps(copy)
    assert sum(last[s] for s in steps) / len(steps) < sum(last[s] for s in (1, 2, 3)) / 3 - 0.5


@pytest.mark.slow
def test_fsdp_shards_the_4bit_model_on_two_cpu_processes() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(REPO / "tests" / "engine" / "fsdp_shards_on_cpu.py"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert r["quant_storage"] == ["torch.bfloat16"]  # bnb_4bit_quant_storage = the compute dtype
    assert r["four_bit_elements_here"] * 2 == r["four_bit_elements_full"]  # each rank holds half
    assert r["loss"] == r["reference_loss"] == r["second_pass_loss"]
    assert r["lora_b_grad_max_diff"] == 0.0 < r["lora_b_grad_max"]
    assert r["loss_after_adamw_step"] == r["reference_loss_after_adamw_step"] < r["loss"]
    assert "does not have a sharding strategy" in r["bnb_optimizer_error"]
    assert r["sample_texts"] == [r["reference_text"]] * 2 and r["reference_text"]


@pytest.mark.parametrize("seq_len", [2048, 32768])
def test_qlc_fit_says_how_many_80gb_gpus_the_70b_needs(seq_len: int) -> None:
    """The 70B catalog entry on 80 GB GPUs: at 2048 tokens one GPU holds it (DDP needs no second);
    at 32768 none does, and FSDP-QLoRA needs the fewest N whose per-GPU share fits."""
    overrides = [f"train.seq_len={seq_len}"]
    cfg = load_target("llama-3.3-70b", overrides)
    gpu = resolve_gpu("80GB")

    def fits(n: int, strategy: str) -> bool:
        return per_gpu.per_gpu(cfg, n, strategy, budget_gb=gpu.budget_gb).verdict(gpu).status == "fits"

    result = qlc("fit", "llama-3.3-70b", "--gpu", "80GB", "--set", overrides[0], "--json")
    data = json.loads(result.stdout)
    assert result.returncode == (0 if data["fits"] else 1), result.stderr  # fits: some micro-batch, seq
    n = data["gpus_needed"]["fsdp"]
    assert n is not None and n >= 2 and fits(n, "fsdp") and (n == 2 or not fits(n - 1, "fsdp"))
    assert data["gpus_needed"]["ddp"] == (1 if fits(1, "ddp") else None)
    each = per_gpu.per_gpu(cfg, n, "fsdp", budget_gb=gpu.budget_gb).device_total_gb
    assert data["gpus_needed_gb_each"]["fsdp"] == pytest.approx(each) and each < gpu.budget_gb
    assert fits(1, "ddp") == (seq_len == 2048)  # the two cases this test means to cover
    shown = qlc("fit", "llama-3.3-70b", "--gpu", "80GB", "--set", overrides[0])
    if fits(1, "ddp"):  # the text names no strategy for a run one GPU holds (the JSON still does)
        assert "one GPU, no strategy needed" in shown.stdout and "fsdp:" not in shown.stdout
    else:
        assert f"fsdp: {n} GPUs, {each:.2f} GiB each" in shown.stdout


@pytest.mark.slow
def test_a_gemma3_multimodal_model_trains_on_two_processes(tmp_path: Path) -> None:
    """Gemma 3 4B/12B/27B load with their vision tower: with LoRA on the tower's projections,
    which never receive a gradient from text, DDP (find_unused_parameters off) failed at step 2.
    The adapters sit on the text decoder only, and two gloo processes train past step 3."""
    from tests.engine import tiny_gemma3

    model = tiny_gemma3.build(tmp_path / "models" / "tiny-gemma3")
    root = tmp_path / "runs"
    sets = _sets(*CPU2, *TRAIN, f"model.name_or_path={model}", "train.max_steps=4", "train.save_steps=100")
    result = qlc(
        "--runs-dir", str(root), "train", "tiny-demo", *sets, env={"OMP_NUM_THREADS": "1"}, timeout=600
    )
    (run_dir,) = runs.list_run_dirs(root)
    log = (run_dir / runs.ENGINE_LOG).read_text()
    assert result.returncode == 0, result.stdout + result.stderr + log[-3000:]
    events, _ = runs.read_events(run_dir)
    hello = next(e for e in events if isinstance(e, protocol.Hello))
    assert hello.world_size == 2 and hello.device == "2 x cpu (gloo, ddp)"
    assert [e.step for e in events if isinstance(e, protocol.Step)] == [1, 2, 3, 4]
    assert events[-1].status == "completed"
    adapter = json.loads((run_dir / runs.ADAPTER / "adapter_config.json").read_text())
    assert adapter["target_modules"].startswith(r"model\.language_model\.layers\.")
    assert not re.search(r"^(\[rank\d+\]: )?Traceback", log, re.M)


def test_known_gpus_says_unknown_where_torch_alone_could_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preflight refuses hardware.device=cuda only where it knows there is no GPU: NVML failing
    on a machine with the CUDA driver library (a Jetson has CUDA but no NVML) is not a 'no'."""
    import ctypes.util

    import pynvml

    def broken() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(pynvml, "nvmlInit", broken)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert distributed.known_gpus() == 0
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libcuda.so.1" if name == "cuda" else None)
    assert distributed.known_gpus() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert distributed.known_gpus() == 2
    # Unknown: the preflight lets the engine decide (it refused with exit 2 before).
    from engine import preflight

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cfg = load_preset("tiny-demo", ["hardware.device=cuda"])
    preflight.check_hardware(cfg)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(
        UserError, match=re.escape("hardware.device: cuda was asked for but no CUDA GPU is visible")
    ):
        preflight.check_hardware(cfg)


def test_a_multi_gpu_run_reports_the_layers_it_checkpoints() -> None:
    """The estimate a multi-GPU engine reports: its rank's share, planned with the layers that run
    chose on its GPU (before, every rank's report said every layer, whatever the run did)."""
    from engine.train.recipe import estimate_for_run

    cfg = load_preset("llama-3.1-8b-rtx4090", ["hardware.gpus=2", "hardware.strategy=ddp"])
    est, gpu = estimate_for_run(cfg, "cuda", "hf", checkpointed=5, world_size=2)
    assert est.gpus == 2 and est.base.checkpointed_layers == 5 and gpu is not None
    cpu, _ = estimate_for_run(cfg, "cpu", "hf", checkpointed=5, world_size=2)
    assert cpu.base.checkpointed_layers != 5  # on the CPU: what the recipe would plan on its GPU
