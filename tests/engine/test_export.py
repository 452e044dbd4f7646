"""`qlc export` on the tiny model, through the CLI and the engine process.

One run, trained once for the module and stopped by `qlc stop`'s command after its second
checkpoint (so it has two checkpoints and no final adapter): its newest checkpoint is exported as
an adapter, its older one merged, sharded, checked and converted by a stand-in llama.cpp. Bad input
is refused by the CLI before any engine starts: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import protocol
from engine.config import load_preset
from engine.errors import UserError
from engine.run import runs
from tests.conftest import QLC, REPO, qlc

pytestmark = pytest.mark.slow

OVERRIDES = [
    "train.max_steps=40",  # never reached: the run is stopped after its first checkpoint
    "train.save_steps=2",
    "train.logging_steps=1",
    "data.val_fraction=0",  # no eval passes: the card's eval line is tested on recorded events
]


def _wait(run_dir: Path, predicate, timeout: float = 120) -> protocol.Event:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in runs.read_events(run_dir)[0]:
            if predicate(ev):
                return ev
        time.sleep(0.05)
    raise AssertionError(f"timed out; engine.log:\n{(run_dir / runs.ENGINE_LOG).read_text()[-3000:]}")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def stopped(root: Path) -> Path:
    """A tiny run stopped after its first checkpoint: checkpoints 2 and N > 2, no final adapter."""
    sets = [x for o in OVERRIDES for x in ("--set", o)]
    before = set(runs.list_run_dirs(root))
    started = qlc("--runs-dir", str(root), "train", "tiny-demo", *sets, "--detach")
    assert started.returncode == 0, started.stderr
    (run_dir,) = set(runs.list_run_dirs(root)) - before
    _wait(run_dir, lambda e: isinstance(e, protocol.CheckpointSaved) and e.step == 2)
    runs.send_command(run_dir, protocol.Stop())
    finished = _wait(run_dir, lambda e: isinstance(e, protocol.Finished))
    assert finished.status == "stopped", (run_dir / runs.ENGINE_LOG).read_text()[-2000:]
    while runs.is_running(run_dir):
        time.sleep(0.05)
    return run_dir


@pytest.fixture(scope="module")
def fake_llama_cpp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A stand-in llama.cpp checkout: its converter and llama-quantize record how they were called
    and write a file that starts with GGUF's magic, as the real ones do."""
    tmp_path = tmp_path_factory.mktemp("fake-llama-cpp")
    root = tmp_path / "llama.cpp"
    (root / "build" / "bin").mkdir(parents=True)
    log = tmp_path / "calls.jsonl"
    record = (
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
    )
    (root / "convert_hf_to_gguf.py").write_text(
        record
        + "model = sys.argv[1]\n"
        + "assert os.path.isfile(os.path.join(model, 'config.json')), 'not a model folder'\n"
        + "open(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF' + bytes(60))\n"
    )
    quantize = root / "build" / "bin" / "llama-quantize"
    quantize.write_text(
        f"#!{sys.executable}\n" + record + "open(sys.argv[2], 'wb').write(open(sys.argv[1], 'rb').read())\n"
    )
    quantize.chmod(0o755)
    return root, log


@pytest.fixture(scope="module")
def adapter_export(stopped: Path, root: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The newest checkpoint exported as an adapter, into the run's default folder."""
    result = qlc("--runs-dir", str(root), "export", stopped.name, "--adapter-only")
    assert result.returncode == 0, result.stderr
    return result, stopped / "exports" / f"{runs.checkpoints(stopped)[-1].name}-adapter"


@pytest.fixture(scope="module")
def merged_export(
    stopped: Path, root: Path, tmp_path_factory: pytest.TempPathFactory, fake_llama_cpp: tuple[Path, Path]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Checkpoint 2 merged, in shards, with a GGUF file from the stand-in llama.cpp."""
    out = tmp_path_factory.mktemp("merged") / "new" / "merged"  # its parent does not exist yet
    result = qlc(
        "--runs-dir", str(root), "export", stopped.name, "--checkpoint", "2", "--out", str(out),
        "--max-shard-size", "2MB", "--gguf", "q4_k_m", "--json",
        env={"QLC_LLAMA_CPP": str(fake_llama_cpp[0])},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    return result, out


def _events(stdout: str) -> list[protocol.Event]:
    return [protocol.decode_event(line) for line in stdout.splitlines() if line.strip()]


def test_the_run_is_stopped_with_two_checkpoints(stopped: Path) -> None:
    steps = [int(p.name.removeprefix(runs.CHECKPOINT_PREFIX)) for p in runs.checkpoints(stopped)]
    assert steps[0] == 2 and len(steps) == 2 and not (stopped / runs.ADAPTER).exists()


def test_adapter_only_export_copies_the_newest_checkpoint(stopped: Path, adapter_export) -> None:
    newest = runs.checkpoints(stopped)[-1]
    result, out = adapter_export
    assert f"exported adapter ({newest.name}" in result.stdout and str(out) in result.stdout.replace("\n", "")
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for name in files[1:]:
        assert (out / name).read_bytes() == (newest / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "AutoPeftModelForCausalLM" in card
    assert "`<|eot_id|>`" in card and "byte-identical" in card
    eot = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]["<|eot_id|>"]
    assert f"max_new_tokens=64, eos_token_id=[{eot}])" in card  # the base's own config may not stop there
    # The built-in base is a folder on this machine, and adapter_config.json names it by its path.
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert f"by its folder on the machine that trained it (`{base}`)" in card
    # Nothing half-written beside it.
    assert [p.name for p in (stopped / "exports").iterdir()] == [out.name]


def test_merged_export_of_an_older_checkpoint(stopped: Path, merged_export, fake_llama_cpp) -> None:
    _, calls = fake_llama_cpp
    result, out = merged_export
    events = _events(result.stdout)
    assert isinstance(events[0], protocol.Hello) and events[0].mode == "export"
    stages = [e for e in events if isinstance(e, protocol.StageEvent)]
    assert [e.current for e in stages] == list(range(1, 7)) and {e.total for e in stages} == {6}
    assert [e.stage for e in stages] == [
        "loading_model",
        "merging",
        "saving",
        "verifying",
        "converting",
        "finishing",
    ]
    done = events[-1]
    assert isinstance(done, protocol.Exported), events[-3:]
    assert done.kind == "merged" and done.source == "checkpoint-2" and done.step == 2 and done.dtype == "bf16"
    assert done.device == "cpu" and done.out_dir == str(out)

    # The logits check: the reloaded folder reproduces base + adapter, within a tolerance far below
    # what the adapter itself changes (so the check would catch a merge that lost it).
    assert done.prompts == 3 and done.tokens > 3
    assert done.max_logit_diff is not None and done.tolerance is not None and done.adapter_effect is not None
    assert done.max_logit_diff <= done.tolerance < done.adapter_effect
    # The tiny model's fp32 copy is cheap: bf16's own rounding of its logits was measured, and the
    # tolerance says what set it (4x that rounding, or 5% of the largest logit where larger).
    assert "against fp32" in done.tolerance_basis, done.tolerance_basis

    # Sharded safetensors, really: the index and more than one shard, in bf16, not quantized.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not list(out.glob("*.bin")) and not list(out.glob("adapter_*"))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config

    # The chat template the run trained with, and the end-of-turn token among the eos ids.
    checkpoint = stopped / runs.CHECKPOINTS / "checkpoint-2"
    assert (out / "chat_template.jinja").read_text() == (checkpoint / "chat_template.jinja").read_text()
    from tokenizers import Tokenizer

    eot = Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|eot_id|>")
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eot in eos and eot in done.eos_token_ids

    # The model card.
    card = (out / "README.md").read_text()
    for needle in (
        "builtin:tiny-llama",
        "merged into the base model's 16-bit weights",
        "the checkpoint at step 2",
        "final train loss: ",
        "at step 2",
        "final eval loss: none logged by step 2",
        # What the run recorded of its data: what auto resolved to, and the counts.
        "- format: messages",
        "- chat template: the tokenizer's own",
        "- loss on responses only: ",
        "- 600 train / 0 eval examples",
        "tiny-instruct.jsonl",
        "qlora-console 0.1.0",
        "transformers 5.",
        "peft 0.",
        "model-Q4_K_M.gguf",
        "```yaml\nname: tiny-demo",
    ):
        assert needle in card, needle

    # GGUF: the converter read the folder and wrote bf16, llama-quantize made Q4_K_M of it, and
    # only the quantized file is left, inside the exported folder.
    (convert, quantize) = [json.loads(line) for line in calls.read_text().splitlines()]
    assert convert[0] == "convert_hf_to_gguf.py" and convert[convert.index("--outtype") + 1] == "bf16"
    assert quantize[0] == "llama-quantize" and quantize[1] == convert[convert.index("--outfile") + 1]
    assert quantize[3] == "Q4_K_M"
    gguf_file = out / "model-Q4_K_M.gguf"
    assert done.gguf_path == str(gguf_file) and gguf_file.read_bytes()[:4] == b"GGUF"
    assert not list(out.glob("*.tmp.gguf")) and not list(out.parent.glob(".*"))

    # Independently of the engine's own check, from the files alone: every merged projection is
    # W + (alpha / r) * B @ A added to the 16-bit base (never to 4-bit weights) and rounded once to
    # bf16, as peft adds an fp32 delta in place. The product's summation order may differ from
    # peft's, so a few elements may land one bf16 step away.
    import torch
    from safetensors.torch import load_file

    from engine.models.loading import resolve_model_path

    cfg = load_preset("tiny-demo")
    base = load_file(str(Path(resolve_model_path(cfg)) / "model.safetensors"))
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_file(str(out / shard)))
    adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert set(merged) == set(base)
    lora = [k.removesuffix(".lora_A.weight") for k in adapter if k.endswith(".lora_A.weight")]
    assert len(lora) == 4 * 7  # every projection of every layer
    same = changed = total = 0
    for prefix in lora:
        name = prefix.removeprefix("base_model.model.") + ".weight"
        a, b = adapter[f"{prefix}.lora_A.weight"].float(), adapter[f"{prefix}.lora_B.weight"].float()
        expected = (base[name].float() + (cfg.lora.alpha / cfg.lora.r) * (b @ a)).to(torch.bfloat16)
        got = merged[name]
        assert got.dtype == torch.bfloat16
        one_step = expected.float().abs() * 2**-7 + 1e-12
        assert ((got.float() - expected.float()).abs() <= one_step).all(), name
        same += int((got == expected).sum())
        changed += int((got != base[name]).sum())
        total += got.numel()
    assert same >= 0.999 * total
    assert changed > 0.5 * total  # the adapter is in there: most weights moved


def test_the_cards_code_runs(merged_export, adapter_export, stopped: Path, tmp_path: Path) -> None:
    """The python block of each card, as a user copies it (PATH: the exported folder), in a fresh
    interpreter with transformers, offline: the merged folder, the adapter (on the built-in base that
    adapter_config.json names), and the plain prompt a card gives when there is no chat template."""
    from engine.export import card
    from engine.export.request import build_request

    def code(text: str, folder: Path) -> str:
        (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
        assert '"PATH"' in block
        return block.replace('"PATH"', repr(str(folder)))

    merged, adapter = merged_export[1], adapter_export[1]
    # The adapter again, its chat template gone, with the card that folder gets.
    plain = tmp_path / "plain"
    shutil.copytree(adapter, plain)
    (plain / "chat_template.jinja").unlink()
    request = build_request(stopped, adapter_only=True, out=tmp_path / "unused", check_tools=False)
    plain_card = card.render(
        request, load_preset("tiny-demo"), card.read_record(stopped, None), card.CardFacts()
    )
    scripts = []
    for name, text, folder in (
        ("merged", (merged / "README.md").read_text(), merged),
        ("adapter", (adapter / "README.md").read_text(), adapter),
        ("plain", plain_card, plain),
    ):
        scripts.append(tmp_path / f"{name}.py")
        scripts[-1].write_text(code(text, folder))
    # Each block in its own namespace; then what it generated: the prompt it gave, and new tokens.
    driver = (
        "import sys\n"
        "for path in sys.argv[1:]:\n"
        "    ns = {}\n"
        "    exec(compile(open(path).read(), path, 'exec'), ns)\n"
        "    prompt = ns['inputs']['input_ids']\n"
        "    assert (ns['output'][0, : prompt.shape[1]] == prompt[0]).all(), path\n"
        "    assert ns['output'].shape[1] > prompt.shape[1], path\n"
        "    print('PROMPT', path, repr(ns['tokenizer'].decode(prompt[0])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", driver, *map(str, scripts)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: the code needs nothing of qlora-console
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # (The cards' own prints, the answers, are between these lines.)
    prompts = dict(
        line.split(" ", 2)[1:] for line in result.stdout.splitlines() if line.startswith("PROMPT ")
    )
    # The chat template's generation prompt for the chat cards; the bare text for the plain one.
    for name in ("merged", "adapter"):
        assert prompts[str(tmp_path / f"{name}.py")].endswith(
            "<|start_header_id|>assistant<|end_header_id|>\\n\\n'"
        )
    assert "<|start_header_id|>" not in prompts[str(tmp_path / "plain.py")]


def test_an_interrupted_export_leaves_nothing(stopped: Path, root: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    proc = subprocess.Popen(
        [
            *QLC,
            "--runs-dir",
            str(root),
            "export",
            stopped.name,
            "--checkpoint",
            "2",
            "--out",
            str(out),
            "--json",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # As a terminal's foreground job: a test run started in the background of a
        # non-interactive shell passes SIGINT down ignored, and qlc then (rightly) never hears it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        # The engine waits in its temporary folder until interrupted, however fast the export.
        env={**os.environ, "QLC_FAULT": "slow_export=60"},
    )
    # Ctrl-C in the terminal once the engine is at work in its temporary folder.
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".never.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(tmp_path.glob(".never.tmp-*")), "the export never started"
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == 130
    assert b"nothing was written" in proc.stderr.read()  # type: ignore[union-attr]
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- bad input: one line, exit 2, nothing written, no engine started ----------------------------


@pytest.fixture(scope="module")
def untrained(root: Path) -> Path:
    """A run created but not trained yet: no checkpoint."""
    cfg = load_preset("tiny-demo")
    cfg.name = "untrained"
    return runs.create_run(root, cfg)


def _snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["nosuch"], "no run 'nosuch'"),
        (["{untrained}"], "has no checkpoint (it never started: start it again with `qlc train`)"),
        (["{stopped}", "--out", "{taken}"], "exists and is not empty"),
        (["{stopped}", "--checkpoint", "7"], "no checkpoint at step 7"),
        (["{stopped}", "--checkpoint", "last-one"], "--checkpoint 'last-one'"),
        (["{stopped}", "--checkpoint", "adapter"], "has no final adapter"),
        (["{stopped}", "--dtype", "fp32"], "invalid choice: 'fp32'"),
        (["{stopped}", "--adapter-only", "--dtype", "fp16"], "--dtype applies to merged weights"),
        (["{stopped}", "--max-shard-size", "lots"], "--max-shard-size 'lots'"),
        (["{stopped}", "--gguf", "Q9_X"], "not a GGUF type"),
        (["{stopped}", "--gguf", "Q4_K_M"], "convert_hf_to_gguf.py was not found on PATH"),
        (["{stopped}", "--gguf", "Q8_0", "--adapter-only"], "--gguf converts merged weights"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, stopped: Path, untrained: Path, root: Path, tmp_path: Path
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    names = {"stopped": stopped.name, "untrained": untrained.name, "taken": str(taken)}
    before = {d: _snapshot(d) for d in (stopped, untrained, tmp_path)}
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin", "QLC_LLAMA_CPP": ""}
    result = qlc("--runs-dir", str(root), "export", *(a.format(**names) for a in args), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stdout == ""
    assert {d: _snapshot(d) for d in before} == before


def test_exporting_again_names_the_default_folder_not_an_option_never_given(
    stopped: Path, tmp_path: Path
) -> None:
    """A second `qlc export RUN` said `--out …: exists`, though no --out was given."""
    from engine.export.request import build_request, default_out_dir

    source = runs.resolve_adapter(stopped, None)
    made = default_out_dir(stopped, source, "bf16", adapter_only=True)
    ours = not made.exists()  # an earlier test in this module may have exported it already
    if ours:
        made.mkdir(parents=True)
        (made / "adapter_model.safetensors").write_text("made before")
    try:
        with pytest.raises(UserError) as caught:
            build_request(stopped, adapter_only=True, check_tools=False)
        assert str(caught.value) == (
            f"{made} (the default export folder): exists and is not empty (this export was made before: "
            "remove it to make it again, or choose a folder with --out)"
        )
    finally:
        if ours:
            shutil.rmtree(made)


def test_a_failing_fp32_reference_leaves_the_share_of_the_largest_logit(
    stopped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fp32 copy only sharpens the check: if it cannot load or run (a flash-attention-only
    model, less RAM than estimated), the export goes on with the relative tolerance and says so."""
    from engine.export import job, merge
    from engine.export.request import build_request
    from engine.run.events import Emitter

    def broken(*args: object, **kwargs: object) -> list:
        raise RuntimeError("FlashAttention only supports fp16 and bf16 data type")

    monkeypatch.setattr(merge, "fp32_logits", broken)
    lines: list[bytes] = []

    class Lines:
        def write(self, line: bytes) -> None:
            lines.append(line)

    out = tmp_path / "merged"
    request = build_request(stopped, checkpoint="2", out=out)
    assert job.export(request, Emitter([Lines()])) == 0
    events = protocol.decode_lines(b"".join(lines))
    warned = [e.message for e in events if isinstance(e, protocol.Log) and e.level == "warning"]
    assert any("the fp32 reference failed (RuntimeError: FlashAttention only supports" in w for w in warned)
    done = events[-1]
    assert isinstance(done, protocol.Exported) and done.tolerance_basis == "5% of the largest logit"
    assert (out / "model.safetensors").is_file()
