"""`quant.compute_dtype: auto`: bf16 where the device computes it natively, else fp32 on a CPU (fp16
on a GPU without bf16), said in the run header; explicit values as they are. The decision is tested
with injected CPU flags and probe timings; the fp32 path trains the tiny model for real."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest

from engine import protocol
from engine.models import dtypes
from engine.run import runs
from tests.conftest import qlc

AVX2_EPYC = {"fpu", "sse2", "avx", "avx2", "fma", "bmi2"}  # issue 19's machine: no AVX-512


def never() -> tuple[float, float]:
    raise AssertionError("the flags decide on x86: no probe")


@pytest.mark.parametrize(
    "flags, choice, why",
    [
        (AVX2_EPYC | {"avx512_bf16", "avx512f"}, "bf16", "natively (avx512_bf16)"),
        (AVX2_EPYC | {"amx_bf16", "amx_tile"}, "bf16", "natively (amx_bf16)"),
        (AVX2_EPYC, "fp32", "no native bf16 (no avx512_bf16 or amx_bf16)"),
        (AVX2_EPYC | {"avx512f", "avx512bw"}, "fp32", "no native bf16"),  # AVX-512 without its bf16
    ],
)
def test_x86_flags_decide(flags: set[str], choice: str, why: str) -> None:
    got = dtypes.cpu_choice(flags, "x86_64", never)
    assert got.name == choice and why in got.reason and got.reason.startswith("auto: ")


def test_elsewhere_a_probe_decides() -> None:
    arm = {"fp", "asimd", "bf16", "sve"}
    assert dtypes.cpu_choice(arm, "aarch64", lambda: (0.8e-3, 1.6e-3)).name == "bf16"
    slow = dtypes.cpu_choice(arm, "aarch64", lambda: (123e-3, 2.3e-3))  # issue 19's 54x
    assert slow.name == "fp32" and "53.5x the fp32 time" in slow.reason
    assert dtypes.cpu_choice(None, "x86_64", lambda: (1.0, 1.0)).name == "bf16"  # no /proc/cpuinfo: probe
    assert dtypes.cpu_choice(None, "arm64", None).name == "fp32"  # nothing known: the safe one


def test_gpus_and_explicit_values() -> None:
    assert dtypes.gpu_choice(True, "NVIDIA H200").reason == "auto: NVIDIA H200 computes bf16"
    assert dtypes.gpu_choice(False, "Tesla T4").name == "fp16"
    for name in ("bf16", "fp16", "fp32"):
        assert dtypes.resolve(name, "cpu") == dtypes.DtypeChoice(name, f"quant.compute_dtype is {name}")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU part\t: 0xd40\n")
    assert dtypes.cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    assert dtypes.cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert dtypes.cpu_flags(tmp_path / "absent") is None


def test_the_probe_runs_once_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLC_CACHE_DIR", str(tmp_path))
    probe = dtypes.cached_probe({"fp", "asimd"})
    first = probe()  # the real matmuls
    assert all(t > 0 for t in first)
    (cached,) = (tmp_path / "cpu-dtype").glob("*.json")
    stamp = cached.stat().st_mtime_ns
    assert probe() == first and cached.stat().st_mtime_ns == stamp  # read back, not run again


def test_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What auto picks here, by the same rule (its x86 flags, or the probe elsewhere)."""
    monkeypatch.setenv("QLC_CACHE_DIR", str(tmp_path))
    flags = dtypes.cpu_flags()
    got = dtypes.resolve("auto", "cpu")
    if flags is not None and platform.machine().lower() in dtypes.X86:
        native = bool(set(dtypes.NATIVE_BF16_FLAGS) & flags)
        assert got.name == ("bf16" if native else "fp32")


@pytest.mark.slow
def test_fp32_compute_really_trains_and_the_header_says_so(runs_dir: Path) -> None:
    sets = [
        "quant.compute_dtype=fp32",
        "train.max_steps=16",
        "train.logging_steps=1",
        "train.eval_steps=0",
        "data.val_fraction=0",
    ]
    result = qlc("train", "tiny-demo", *[x for o in sets for x in ("--set", o)], timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compute dtype fp32: quant.compute_dtype is fp32" in result.stdout.splitlines()[1]
    (run_dir,) = runs.list_run_dirs(runs_dir)
    events, _ = runs.read_events(run_dir)
    hello = next(e for e in events if isinstance(e, protocol.Hello))
    assert (hello.compute_dtype, hello.compute_dtype_reason) == ("fp32", "quant.compute_dtype is fp32")
    ready = next(e for e in events if isinstance(e, protocol.ModelReady))
    assert ready.quantization == "4-bit NF4 + double quant, fp32 compute"
    losses = [e.loss for e in events if isinstance(e, protocol.Step)]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses

    from safetensors import safe_open

    with safe_open(str(run_dir / runs.ADAPTER / "adapter_model.safetensors"), "pt") as f:
        dtypes_saved = {str(f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert dtypes_saved == {"torch.float32"}  # the adapters trained in fp32
    shutil.rmtree(run_dir)
