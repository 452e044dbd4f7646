"""`qlc estimate` and `qlc fit` as a user runs them: exit codes 0 / 1 / 2 and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QLC = Path(sys.executable).parent / "qlc"  # the installed console script next to this interpreter
ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


def qlc(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(QLC)] if QLC.exists() else [sys.executable, "-m", "tui.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=60)


def test_the_4060_recipe_does_not_fit_and_says_what_would() -> None:
    r = qlc("estimate", "llama-3.1-8b-rtx4060")
    assert r.returncode == 1, r.stderr
    for text in ("weights", "gradients", "optimizer", "activations", "workspace", "DOES NOT FIT"):
        assert text in r.stdout
    assert "drop modules_to_save" in r.stdout and "--set lora.modules_to_save=[]" in r.stdout
    assert "fits" in r.stdout.split("What would make it fit")[1]


def test_json_output() -> None:
    r = qlc("estimate", "llama-3.1-8b-rtx4060", "--json", "--backend", "hf")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert data["verdict"]["status"] == "does_not_fit" and data["backend"] == "hf"
    assert data["verdict_basis"] == "device_total"
    assert [t["name"] for t in data["terms"]] == [
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "workspace",
    ]
    assert any(a["status"] == "fits" for a in data["advice"])


def test_a_model_with_the_default_config_fits_a_24gb_card() -> None:
    r = qlc("estimate", "meta-llama/Llama-3.1-8B-Instruct", "--gpu", "24GB", "--set", "lora.r=32")
    assert r.returncode == 0, r.stderr
    assert "llama-3.1-8b" in r.stdout and "FITS" in r.stdout


def test_the_verdict_carries_the_error_band_and_the_device_constants_used() -> None:
    """ "22.3 GiB ± 0.5": the band is the backend's held-out error (constants.ERROR_BAND) times the
    device total; the device constants line names the GPU class and where its numbers come from."""
    from engine.memory import constants as C

    r = qlc("estimate", "llama-3.1-8b", "--gpu", "rtx4090", "--backend", "hf", "--set", "lora.r=32")
    assert r.returncode == 0, r.stderr
    verdict = next(line for line in r.stdout.splitlines() if line.startswith(("FITS", "TIGHT")))
    used, band = verdict.split(": ", 1)[1].split(" GiB ± ")
    assert float(band.split()[0]) == pytest.approx(float(used) * C.ERROR_BAND["hf"], abs=0.006)
    assert "device constants: Ada / Ampere" in r.stdout and "unsloth-zoo#1053" in r.stdout
    h200 = qlc("estimate", "llama-3.1-8b", "--gpu", "h200", "--backend", "hf", "--set", "lora.r=32")
    assert "device constants: Hopper" in h200.stdout and "measured on an H200" in h200.stdout
    data = json.loads(
        qlc("estimate", "llama-3.1-8b", "--gpu", "24GB", "--json", "--backend", "unsloth").stdout
    )
    assert data["error_band_gb"] == pytest.approx(data["device_total_gb"] * C.ERROR_BAND["unsloth"])
    assert data["device_profile"].startswith("unknown card")


def test_fit_exit_codes() -> None:
    ok = qlc("fit", "llama-3.1-8b-rtx4090", "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["fits"] and data["max_micro_batch"] >= 1 and data["estimate"]["verdict"]["status"] == "fits"
    none = qlc("fit", "llama-3.1-8b-rtx4060")
    assert none.returncode == 1 and "nothing fits" in none.stdout
    # Some change `qlc estimate` lists does fit the 4060: fit points there, and only there.
    assert "`qlc estimate` says which changes would make it fit." in none.stdout
    assert "nothing in reach" not in none.stdout


def test_fit_and_estimate_say_alike_when_no_change_fits_the_card() -> None:
    """`qlc fit gemma-3-12b-rtx4090 --gpu 8GB` said "`qlc estimate` says which changes would make
    it fit", and estimate listed only changes that do not: both now say so in one line, the same
    line, with the smallest card and the FSDP count (worded as an option)."""
    target = ("gemma-3-12b-rtx4090", "--gpu", "8GB")
    fitted, estimated = qlc("fit", *target), qlc("estimate", *target)
    assert (fitted.returncode, estimated.returncode) == (1, 1), fitted.stderr + estimated.stderr
    (line,) = [ln for ln in fitted.stdout.splitlines() if ln.startswith("nothing in reach fits")]
    assert line in estimated.stdout.splitlines()
    assert "the smallest this recipe gets to is " in line and "needs a GPU of at least " in line
    assert "says which changes would make it fit" not in fitted.stdout
    assert "What would make it fit" not in estimated.stdout and "none makes it fit" in estimated.stdout
    # The FSDP count: an option, with what sharding leaves on each GPU, and the number fit's
    # table shows.
    data = json.loads(qlc("fit", *target, "--json").stdout)
    n = data["gpus_needed"]["fsdp"]
    assert n is not None and f"fsdp over {n} of these GPUs" in line
    (option,) = [ln for ln in fitted.stdout.splitlines() if ln.startswith("option: fsdp over")]
    assert f"--set hardware.gpus={n} --set hardware.strategy=fsdp" in option and "not sharded" in option
    assert data["out_of_reach"]["text"] == line
    shown = json.loads(qlc("estimate", *target, "--json").stdout)
    assert shown["out_of_reach"] == data["out_of_reach"]
    assert all(a["status"] == "does_not_fit" for a in shown["advice"])
    # The card it names is one `qlc estimate` itself says the changes fit.
    closest = min(shown["advice"], key=lambda a: a["device_total_gb"])
    sets = [x for o in closest["overrides"] for x in ("--set", o)]
    card = f"{shown['out_of_reach']['card_gb']}GB"
    bigger = json.loads(qlc("estimate", target[0], "--gpu", card, *sets, "--json").stdout)
    assert bigger["verdict"]["status"] == "fits"


@pytest.mark.parametrize(
    ("preset", "card", "gpus"), [("gemma-3-12b-rtx4090", "12GB", "2"), ("llama-3.1-8b-rtx4060", "16GB", "3")]
)
def test_auto_checkpointing_and_the_verdict_agree_under_fsdp(preset: str, card: str, gpus: str) -> None:
    """It printed "(auto: even with every layer checkpointed it needs more than 11.3 GiB)" and then
    "FITS ... 10.91 GiB": auto planned the one-GPU step, the verdict one GPU's FSDP share."""
    sets = ["hardware.gpus=" + gpus, "hardware.strategy=fsdp", "train.optimizer=adamw_torch"]
    r = qlc("estimate", preset, "--gpu", card, *[x for o in sets for x in ("--set", o)])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    headline = next(ln for ln in lines if "gradient checkpointing" in ln)
    verdict = next(ln for ln in lines if ln.startswith(("FITS", "TIGHT", "DOES NOT FIT")))
    assert f"GiB on each of {gpus} GPUs under fsdp" in headline, headline
    assert ("needs more than" in headline) == (not verdict.startswith("FITS")), (headline, verdict)
    assert verdict.startswith("FITS") and "layers checkpointed to fit" in headline


def test_fit_on_a_kind_of_gpu_names_no_strategy_for_a_run_one_gpu_holds() -> None:
    """It said `fsdp: 2 GPUs` for the tiny demo on a T4: the fewest GPUs FSDP shards over, not a need."""
    result = qlc("fit", "tiny-demo", "--gpu", "t4")
    assert result.returncode == 0, result.stderr
    tail = result.stdout.split("GPUs of this kind needed")[1].strip().splitlines()
    assert tail[1].strip().startswith("one GPU, no strategy needed: ") and len(tail) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["estimate", "no-such-model", "--gpu", "24GB"], "unknown preset or model 'no-such-model'"),
        (
            ["estimate", "llama-3.1-8b", "--gpu", "24GB", "--set", "train.micro_batch=-1"],
            "micro_batch: must be at least 1",
        ),
        (
            ["fit", "llama-3.1-8b", "--gpu", "24GB", "--set", "train.seq_len=200000"],
            "maximum of 131072 positions",
        ),
        (["estimate", "llama-3.1-8b", "--gpu", "rtx9999"], "unknown GPU 'rtx9999'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    r = qlc(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlc: error:") and message in lines[0], r.stderr


def test_no_gpu_here_means_pass_gpu() -> None:
    import pynvml

    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA GPU")
    except pynvml.NVMLError:
        pass
    r = qlc("estimate", "llama-3.1-8b")
    assert r.returncode == 2 and "--gpu" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_console_side_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from tui.cli import main\n"
        "rc = main(['estimate', 'llama-3.1-8b-rtx4090', '--json'])\n"
        "rc2 = main(['fit', 'gemma-3-4b', '--gpu', 'rtx4060', '--json'])\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert (rc, rc2) == (0, 0), (rc, rc2)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=60
    )
    assert r.returncode == 0, r.stderr


def test_an_estimate_made_without_a_gpu_says_how_to_estimate_the_unsloth_stack() -> None:
    """Planned on a laptop for a GPU box: auto models hf here, where Unsloth cannot run."""
    result = qlc("estimate", "llama-3.1-8b-rtx4090")
    first = result.stdout.splitlines()[0]
    if "auto: no CUDA GPU" in first:
        assert first.endswith("; --backend unsloth estimates that stack)")
    unsloth = qlc("estimate", "llama-3.1-8b-rtx4090", "--backend", "unsloth")
    assert "backend unsloth (requested)" in unsloth.stdout.splitlines()[0]


def test_estimate_prints_the_speed_forecast_where_a_speed_model_covers_the_card(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.memory import speed
    from tui.cli import main

    fit = speed.SpeedFit(
        stack="unsloth", gpu="NVIDIA H100 80GB HBM3", gpu_class="hopper",
        costs={"matmul": 1.35, "dequant": 0.004, "elementwise": 0.05, "launches": 3.5},
        configurations=12, held_out_error=0.021, source="test", date="2026-12-05",
    )  # fmt: skip
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(speed, "fits", lambda: (fit,))
    assert main(["estimate", "llama-3.1-8b-h100", "--gpu", "h100", "--backend", "unsloth"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("speed: ")]
    assert " s a step, about " in line and "of the card's dense 16-bit peak" in line
    assert line.endswith("(speed model of 12 configurations on NVIDIA H100 80GB HBM3, held out within 2%)")
    assert main(["estimate", "llama-3.1-8b-h100", "--gpu", "h100", "--backend", "unsloth", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["speed"]["step_s"] > 0 and data["speed"]["basis"].startswith("speed model of 12")
    monkeypatch.setattr(speed, "fits", lambda: ())
    assert main(["estimate", "llama-3.1-8b-h100", "--gpu", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["speed"] is None
