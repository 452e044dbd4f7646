"""The bad-input matrix: malformed presets (YAML syntax, unknown keys, wrong types, impossible
values), `--set` overrides, model paths, datasets and command-line arguments. Each must give one
line on stderr naming the file, key or value, exit 2, no traceback, and nothing in the runs folder.

Every case runs in-process through `tui.cli.main` (fast: the whole matrix in a second or two, with
engine launching disabled so that a case that wrongly passes fails instead of training); a sample
of them, one per class, also runs through the real `python -m tui.cli` in a subprocess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.run import launcher
from tests.conftest import REPO, qlc
from tui.cli import main

BAD = REPO / "tests" / "data" / "bad"
DATA = REPO / "presets" / "data" / "tiny-instruct.jsonl"
# The smallest preset that validates; each preset case breaks one thing in it.
GOOD = f"model:\n  name_or_path: builtin:tiny-llama\ndata:\n  source: {DATA}\n  format: messages\n"


@dataclass(frozen=True)
class Case:
    kind: str  # preset, override, model, dataset, command
    id: str
    args: tuple[str, ...]
    needle: str  # what the one line must contain: the file, key or value, and the problem
    preset: str | bytes | None = None  # written to {tmp}/bad.yaml
    env: dict[str, str] = field(default_factory=dict)


def preset(id: str, text: str | bytes, needle: str) -> Case:
    return Case("preset", id, ("train", "{tmp}/bad.yaml"), needle, preset=text)


def override(id: str, value: str, needle: str, **env: str) -> Case:
    return Case("override", id, ("train", "tiny-demo", "--set", value), needle, env=env)


def model(id: str, value: str, needle: str, **env: str) -> Case:
    return Case("model", id, ("train", "tiny-demo", "--set", f"model.name_or_path={value}"), needle, env=env)


def dataset(id: str, sets: tuple[str, ...], needle: str) -> Case:
    return Case("dataset", id, ("train", "tiny-demo", *(x for s in sets for x in ("--set", s))), needle)


def command(id: str, args: tuple[str, ...], needle: str) -> Case:
    return Case("command", id, args, needle)


CASES = [
    # --- preset files ------------------------------------------------------------------------
    preset("yaml-unclosed", GOOD + "train: [1, 2\n", "bad.yaml: line 7, column 1: invalid YAML"),
    preset("yaml-tab", GOOD + "train:\n\tlr: 1\n", "bad.yaml: line 7, column 1: invalid YAML"),
    preset("yaml-python-tag", GOOD + "name: !!python/object/apply:os.system [ls]\n", "invalid YAML"),
    preset("yaml-too-deep", "[" * 5000, "bad.yaml: nested too deeply to be a preset"),
    preset("empty", "", "bad.yaml: the file is empty"),
    preset("not-a-mapping", "- model\n- data\n", "bad.yaml: expected a mapping of sections"),
    preset("not-utf8", b"name: \xff\xfe\n", "bad.yaml: cannot read (UnicodeDecodeError"),
    preset("unknown-section", GOOD + "modle:\n  r: 1\n", "modle: unknown key (did you mean 'model'?)"),
    preset("unknown-key", GOOD + "train:\n  lerning_rate: 1\n", "train.lerning_rate: unknown key"),
    preset(
        "library-name",
        GOOD + "train:\n  learning_rate: 1.0e-4\n",
        "train.learning_rate: unknown key (did you mean 'lr'? learning_rate is what transformers, TRL or peft",
    ),
    preset(
        "wrong-type-int", GOOD + "train:\n  micro_batch: two\n", "train.micro_batch: expected int, got 'two'"
    ),
    preset("wrong-type-bool", GOOD + "quant:\n  load_in_4bit: maybe\n", "quant.load_in_4bit: expected bool"),
    preset(
        "wrong-type-list",
        GOOD + "lora:\n  target_modules: q_proj\n",
        "lora.target_modules: expected a list of str, got 'q_proj' (write a list in brackets: [q_proj])",
    ),
    preset("section-as-value", GOOD + "train: 5\n", "train: expected a section of keys, got 5"),
    preset("not-a-choice", GOOD + "quant:\n  quant_type: nf8\n", "quant.quant_type: 'nf8' is not one of"),
    preset("zero-seq-len", GOOD + "train:\n  seq_len: 0\n", "train.seq_len: must be at least 1, got 0"),
    preset("dropout-above-1", GOOD + "lora:\n  dropout: 1.5\n", "lora.dropout: must be in [0, 1), got 1.5"),
    preset("nan-epochs", GOOD + "train:\n  epochs: .nan\n", "train.epochs: must be a finite number, got nan"),
    preset("lr-beyond-float", GOOD + "train:\n  lr: " + "9" * 400 + "\n", "train.lr: 9999"),
    preset("no-data-source", "model:\n  name_or_path: builtin:tiny-llama\n", "data.source: required"),
    preset(
        "unknown-gpu",
        GOOD + "hardware:\n  gpu: rtx9999\n",
        "bad.yaml: hardware.gpu: unknown GPU 'rtx9999': the catalog has no such card",
    ),
    # A preset copied away from its data: the place it was looked for (beside the preset) is named.
    preset(
        "data-not-beside-the-preset",
        "model:\n  name_or_path: builtin:tiny-llama\ndata:\n  source: data/tiny-instruct.jsonl\n",
        "{tmp}/data/tiny-instruct.jsonl: not found",
    ),
    Case(
        "preset",
        "file-not-found",
        ("train", "./no/such/preset.yaml"),
        "preset file ./no/such/preset.yaml: not found",
    ),
    Case(
        "preset", "unknown-home", ("train", "~nosuchuser/p.yaml"), "preset file ~nosuchuser/p.yaml: not found"
    ),
    Case("preset", "unknown-name", ("train", "no-such-preset"), "unknown preset 'no-such-preset'"),
    Case("preset", "name-too-long", ("train", "x" * 5000), "unknown preset 'xxxx"),
    # --- --set overrides ---------------------------------------------------------------------
    override("unknown-key", "train.nope=1", "train.nope: unknown key"),
    override(
        "unknown-section", "foo=1", "--set foo: unknown key (keys are section.key, in model, data, quant"
    ),
    override("unknown-far-key", "lerning_rate=1", "--set lerning_rate: unknown key (closest: "),
    override("close-misspelling", "lrr=1", "--set lrr: unknown key (did you mean 'lora.r'?)"),
    override("no-equals", "lr", "--set 'lr': expected key=value"),
    override(
        "library-name",
        "gradient_accumulation_steps=4",
        "--set gradient_accumulation_steps: unknown key (did you mean 'train.grad_accum'?",
    ),
    override("empty-key", "=5", "--set : unknown key"),
    override("wrong-type", "train.micro_batch=two", "--set train.micro_batch=two: expected int, got 'two'"),
    override(
        "quoted-number",
        "lora.r='32'",
        "--set lora.r='32': expected int, got the quoted string '32' (remove the quotes)",
    ),
    override("broken-yaml-value", "train.lr=[", "--set train.lr=[: expected float, got '['"),
    override("section-scalar", "train=5", "--set train=5: expected a section of keys, got 5"),
    override("negative-lr", "train.lr=-1", "--set train.lr=-1: must be between 0 and 1"),
    override("infinite-lr", "train.lr=.inf", "--set train.lr=.inf: must be a finite number, got inf"),
    override("zero-rank", "lora.r=0", "--set lora.r=0: must be at least 1, got 0"),
    override("zero-max-steps", "train.max_steps=0", "--set train.max_steps=0: must be at least 1 or null"),
    override("val-fraction-1", "data.val_fraction=1", "--set data.val_fraction=1: must be in [0, 1)"),
    override(
        "list-as-commas",
        "lora.target_modules=q_proj,v_proj",
        "got 'q_proj,v_proj' (write a list in brackets: lora.target_modules=[q_proj,v_proj])",
    ),
    override(
        "no-target-modules",
        "lora.target_modules=[]",
        "--set lora.target_modules=[]: name at least one module",
    ),
    override(
        "columns-not-mapping", "data.columns=5", "--set data.columns=5: expected a mapping of names to names"
    ),
    Case(
        "override",
        "unsloth-on-cpu",
        ("train", "tiny-demo", "--set", "hardware.backend=unsloth", "--set", "hardware.device=cpu"),
        "--set hardware.backend=unsloth: unsloth needs a CUDA GPU",
    ),
    # --- model paths -------------------------------------------------------------------------
    model("missing-folder", "/no/such/model", "model.name_or_path: /no/such/model not found"),
    model("folder-without-config", "{tmp}/empty-model", "empty-model has no config.json"),
    model("a-file", "{tmp}/bad.txt", "bad.txt is a file"),
    model("unknown-builtin", "builtin:nope", "unknown built-in model 'builtin:nope'"),
    model("not-a-hub-id", "bad id!", "'bad id!' is neither a local folder nor a hub id"),
    model("not-cached-offline", "nobody/no-such-model", "not in the local hub cache", HF_HUB_OFFLINE="1"),
    override(
        "attention-choice",
        "model.attn_implementation=flash",
        "--set model.attn_implementation=flash: 'flash' is not one of",
    ),
    override("remote-code-unconfirmed", "model.trust_remote_code=true", "model.trust_remote_code is true"),
    # --- hardware (asked of the catalog and NVML before the engine starts; no GPU visible here) ---
    override(
        "unknown-gpu",
        "hardware.gpu=rtx9090",
        "--set hardware.gpu=rtx9090: unknown GPU 'rtx9090': the catalog has no such card (give the card's memory",
    ),
    override("gpu-typo", "hardware.gpu=rtx409", "unknown GPU 'rtx409' (did you mean 'rtx4090'?"),
    # A card number the catalog lacks was read as that many gigabytes: FITS on a 3080 GiB GPU.
    override("card-number-as-size", "hardware.gpu=3080", "unknown GPU '3080': the catalog has no such card"),
    override(
        "cuda-without-gpu",
        "hardware.device=cuda",
        "hardware.device: cuda was asked for but no CUDA GPU is visible (set hardware.device=auto or cpu)",
        CUDA_VISIBLE_DEVICES="",
    ),
    override(
        "unsloth-without-gpu",
        "hardware.backend=unsloth",
        "hardware.backend: unsloth needs a CUDA GPU (set hardware.backend=hf or auto)",
        CUDA_VISIBLE_DEVICES="",
    ),
    # --- datasets ----------------------------------------------------------------------------
    dataset("missing-file", ("data.source=/no/such.jsonl",), "/no/such.jsonl: not found"),
    dataset("missing-val-file", ("data.val_source=/no/val.jsonl",), "/no/val.jsonl: not found"),
    dataset("unknown-home", ("data.source=~nosuchuser/x.jsonl",), "~nosuchuser/x.jsonl: not found"),
    dataset("unsupported-type", ("data.source={tmp}/bad.txt",), "bad.txt: unsupported file type '.txt'"),
    dataset("empty-folder", ("data.source={tmp}/empty-model",), "empty-model: the folder holds no .jsonl"),
    dataset(
        "bad-role",
        (f"data.source={BAD}/bad_role.jsonl",),
        "bad_role.jsonl: line 1: message 2 has role 'tool'",
    ),
    dataset(
        "unknown-format",
        (f"data.source={BAD}/unknown_format.jsonl", "data.format=auto"),
        "unknown_format.jsonl: line 1: cannot tell the dataset format",
    ),
    dataset(
        "short-csv-row", (f"data.source={BAD}/short_row.csv", "data.format=auto"), "short_row.csv: row 2"
    ),
    dataset(
        "wrong-format", ("data.format=alpaca",), "tiny-instruct.jsonl: line 1: missing field 'instruction'"
    ),
    # Confirming remote code gets past that check: the next problem (the data) is the one reported.
    Case(
        "dataset",
        "remote-code-confirmed",
        (
            "train",
            "tiny-demo",
            "--set",
            "model.trust_remote_code=true",
            "--trust-remote-code",
            "--set",
            "data.source=/no/such.jsonl",
        ),
        "/no/such.jsonl: not found",
    ),
    # --- command-line arguments --------------------------------------------------------------
    command("train-without-preset", ("train",), "the following arguments are required: preset"),
    command("unknown-option", ("train", "tiny-demo", "--bogus"), "unrecognized arguments: --bogus"),
    command("unknown-command", ("trian",), "invalid choice: 'trian'"),
    command(
        "attach-negative-tail", ("attach", "last", "--tail", "-1"), "argument --tail: -1: must be 0 or more"
    ),
    command("sample-empty-prompt", ("sample", "last", " "), "the prompt is empty"),
    command("stop-unknown-run", ("stop", "no-such-run"), "no run 'no-such-run'"),
    command("resume-unknown-run", ("resume", "no-such-run"), "no run 'no-such-run'"),
    command("attach-unknown-run", ("attach", "no-such-run"), "no run 'no-such-run'"),
    command("sample-unknown-run", ("sample", "no-such-run", "hi"), "no run 'no-such-run'"),
    command("sample-zero-tokens", ("sample", "x", "hi", "--max-new-tokens", "0"), "--max-new-tokens 0"),
    command(
        "sample-negative-temperature",
        ("sample", "x", "hi", "--temperature", "-1"),
        "--temperature -1: must be",
    ),
    command("sample-top-p-over-one", ("sample", "x", "hi", "--top-p", "2"), "--top-p 2: must be above 0"),
    command(
        "sample-too-many-tokens",
        ("sample", "x", "hi", "--max-new-tokens", "100000"),
        "--max-new-tokens 100000: must be a whole number from 1 to 4096",
    ),
    command("sample-bad-number", ("sample", "x", "hi", "--top-p", "lots"), "invalid float value: 'lots'"),
    command(
        "runs-dir-not-creatable",
        ("--runs-dir", "/dev/null/runs", "train", "tiny-demo"),
        "runs directory /dev/null/runs: cannot create it",
    ),
]
# One per class, also run as a real subprocess.
SUBPROCESS = {
    "yaml-tab",
    "close-misspelling",
    "missing-folder",
    "bad-role",
    "unknown-option",
    "cuda-without-gpu",
}  # ids


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "bad.txt").write_text("not a dataset\n")
    return tmp_path


def _prepare(case: Case, tmp: Path) -> list[str]:
    if isinstance(case.preset, bytes):
        (tmp / "bad.yaml").write_bytes(case.preset)
    elif case.preset is not None:
        (tmp / "bad.yaml").write_text(case.preset, encoding="utf-8")
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    if "--runs-dir" not in args:
        args = ["--runs-dir", str(tmp / "runs"), *args]
    return args


def _check(case: Case, tmp: Path, code: int, stdout: str, stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr)
    assert len(lines) == 1 and case.needle.replace("{tmp}", str(tmp)) in lines[0], stderr
    assert "Traceback" not in stderr and not stdout.strip(), stdout
    if case.kind == "override":
        # The value came from the command line: the line names the --set, not the preset's file,
        # and an unknown key gets its nearest keys, not every key there is.
        assert "tiny-demo.yaml" not in lines[0] and len(lines[0]) < 250, lines[0]
    runs_dir = tmp / "runs"
    assert not runs_dir.exists() or not any(runs_dir.iterdir()), list(runs_dir.iterdir())


def test_the_matrix_covers_every_class() -> None:
    kinds = {c.kind for c in CASES}
    assert kinds == {"preset", "override", "model", "dataset", "command"}
    assert len(CASES) >= 30 and len({(c.kind, c.id) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.kind}-{c.id}")
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: Case, workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("bad input started an engine")

    monkeypatch.setattr(launcher, "launch", refuse)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "400")  # rich must not wrap the one line
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    try:
        code = main(_prepare(case, workspace))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    _check(case, workspace, code, captured.out, captured.err)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS], ids=lambda c: f"{c.kind}-{c.id}")
def test_bad_input_through_the_real_command(case: Case, workspace: Path) -> None:
    result = qlc(*_prepare(case, workspace), env={**case.env, "COLUMNS": "400"})
    _check(case, workspace, result.returncode, result.stdout, result.stderr)
    assert os.path.isdir(workspace)
