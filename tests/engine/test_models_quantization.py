"""The weights asked for: `quant.*` honoured by both backends or refused in one line before
anything loads, a pre-quantized checkpoint given on purpose trained as it is, and the memory model
counting the quantization a checkpoint really has (its config.json's quantization_config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine import protocol
from engine.config import RunConfig, load_preset
from engine.errors import ConfigError, UserError
from engine.memory import constants as C
from engine.memory import estimate
from engine.models import check_source, quantization
from engine.models.tiny import TINY_LLAMA
from engine.run import runs
from tests.conftest import qlc

# What bitsandbytes writes into config.json for a model saved already quantized (transformers 5.17).
SAVED_NF4 = {
    "quant_method": "bitsandbytes",
    "load_in_4bit": True,
    "load_in_8bit": False,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8",
    "llm_int8_skip_modules": None,
}


def tiny_cfg(path: str = "builtin:tiny-llama", **quant: Any) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name_or_path = path
    cfg.data.source = "presets/data/tiny-instruct.jsonl"
    cfg.train.seq_len = 128
    for key, value in quant.items():
        setattr(cfg.quant, key, value)
    return cfg


def saved_config(folder: Path, **quantization_config: Any) -> Path:
    """A model folder whose config.json is the tiny Llama's, saved quantized as given."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_LLAMA)
    if quantization_config:
        config["quantization_config"] = {**SAVED_NF4, **quantization_config}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint, checking a request: pure
# ---------------------------------------------------------------------------------------------


def test_a_saved_quantization_config_is_read_as_it_is(tmp_path: Path) -> None:
    q = quantization.of_checkpoint(str(saved_config(tmp_path / "m", bnb_4bit_use_double_quant=False)))
    assert q is not None and q.is_bnb_4bit
    assert (q.quant_type, q.double_quant, q.compute_dtype, q.storage) == ("nf4", False, "bf16", "uint8")
    assert q.describe() == "4-bit NF4, bf16 compute"
    assert quantization.of_checkpoint(str(saved_config(tmp_path / "plain"))) is None
    assert quantization.of_checkpoint(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(
    "quant, needle",
    [
        (
            {"quant_type": "fp4"},
            r"^quant\.quant_type: fp4 asked for, but .* is stored as nf4 .*set quant\.quant_type=nf4",
        ),
        ({"double_quant": False}, r"^quant\.double_quant: false asked for, but .* saved with double"),
        (
            {"load_in_4bit": False},
            r"already quantized \(4-bit NF4 \+ double quant, bf16 compute\), so quant\.load_in_4bit=false",
        ),
        ({"storage": "bf16"}, r"^quant\.storage: bf16 asked for, but .* stores its 4-bit weights as uint8"),
    ],
)
def test_a_value_a_saved_checkpoint_cannot_honour_is_one_line_before_any_run(
    tmp_path: Path, runs_dir: Path, quant: dict[str, Any], needle: str
) -> None:
    folder = saved_config(tmp_path / "tiny-bnb-4bit", load_in_4bit=True)  # as bitsandbytes saves it
    cfg = tiny_cfg(str(folder), **quant)
    with pytest.raises(UserError, match=needle) as caught:
        check_source(cfg)
    assert "\n" not in str(caught.value)
    sets = [x for k, v in quant.items() for x in ("--set", f"quant.{k}={str(v).lower()}")]
    result = qlc("train", "tiny-demo", "--set", f"model.name_or_path={folder}", *sets)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not runs_dir.exists() or not any(runs_dir.iterdir())  # no run left behind
    check_source(tiny_cfg(str(folder)))  # the defaults match what bitsandbytes saves


def test_other_quantization_methods_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "gptq"
    folder.mkdir()
    config = dict(TINY_LLAMA, quantization_config={"quant_method": "gptq", "bits": 4})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UserError, match="already quantized \\(gptq\\); the engine trains on bitsandbytes 4-bit"
    ):
        check_source(tiny_cfg(str(folder)))


def test_storage_is_a_quant_setting() -> None:
    assert load_preset("tiny-demo").quant.storage == "auto"
    assert load_preset("tiny-demo", ["quant.storage=bf16"]).quant.storage == "bf16"
    with pytest.raises(ConfigError, match=r"--set quant\.storage=int4: 'int4' is not one of"):
        load_preset("tiny-demo", ["quant.storage=int4"])
    with pytest.raises(ConfigError, match=r"--set quant\.storage=uint8: FSDP shards only floating tensors"):
        load_preset(
            "tiny-demo", ["hardware.gpus=2", "strategy=fsdp", "optimizer=adamw_torch", "quant.storage=uint8"]
        )


def test_the_request_becomes_one_set_of_bitsandbytes_settings() -> None:
    q = tiny_cfg(quant_type="fp4", double_quant=False).quant
    asked = quantization.requested(q, "fp32")
    assert asked is not None and asked.storage == "uint8"
    kwargs = quantization.bnb_kwargs(asked, str)
    assert kwargs == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "fp32",
        "bnb_4bit_quant_storage": "uint8",
    }
    assert quantization.requested(q, "bf16", sharded=True).storage == "bf16"  # FSDP: the compute dtype
    assert quantization.requested(tiny_cfg(load_in_4bit=False).quant, "bf16") is None


def test_the_memory_model_reads_the_checkpoints_own_quantization(tmp_path: Path) -> None:
    """A folder saved without double quant holds fp32 absmax values: 0.5625 bytes a weight, not the
    0.5159 that quant.double_quant (true by default) would give."""
    plain = estimate(tiny_cfg(str(saved_config(tmp_path / "plain"))), backend="hf", checkpointed=4)
    saved = estimate(
        tiny_cfg(str(saved_config(tmp_path / "nodq", bnb_4bit_use_double_quant=False))),
        backend="hf",
        checkpointed=4,
    )
    linear = plain.arch.param_counts()["linear"]
    tables = plain.arch.layers * len(plain.arch.linear_modules())
    got = saved.term("weights").parts["4-bit linears"] * 2**30
    assert got == pytest.approx(linear * C.BNB_4BIT_BYTES_PER_PARAM + tables * C.BNB_4BIT_TABLE_BYTES)
    assert plain.term("weights").parts["4-bit linears"] * 2**30 == pytest.approx(
        linear * C.BNB_4BIT_DQ_BYTES_PER_PARAM + tables * C.BNB_4BIT_DQ_TABLE_BYTES
    )
    assert any("as the checkpoint stores them: 4-bit NF4" in n for n in saved.notes)


# ---------------------------------------------------------------------------------------------
# The hf backend, for real on the CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hf_honours_quant_type_double_quant_and_storage() -> None:
    import torch

    from engine.train.backends import hf

    model = hf.load_model(
        tiny_cfg(quant_type="fp4", double_quant=False, storage="bf16", compute_dtype="fp32"), "cpu"
    )
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and len(layers) == 4 * 7
    for layer in layers:
        state = layer.weight.quant_state
        assert (state.quant_type, state.nested, layer.weight.dtype) == ("fp4", False, torch.bfloat16)
        assert layer.compute_dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved by bitsandbytes already quantized (NF4 + double quant), like the
    `...-bnb-4bit` uploads on the hub."""
    from engine.models.loading import load_tokenizer
    from engine.train.backends import hf

    cfg = tiny_cfg(compute_dtype="bf16")
    folder = tmp_path_factory.mktemp("models") / "tiny-llama-bnb-4bit"
    model = hf.load_model(cfg, "cpu")
    model.save_pretrained(folder)
    load_tokenizer(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_prequantized_checkpoint_loads_as_it_is(prequantized: Path) -> None:
    """The same packed 4-bit weights come back, not quantized again, computing in the run's dtype
    rather than the one its config saved."""
    import torch

    from engine.train.backends import hf

    cfg = tiny_cfg(str(prequantized), compute_dtype="fp32")
    ckpt = quantization.of_checkpoint(str(prequantized))
    assert ckpt is not None and (ckpt.quant_type, ckpt.double_quant, ckpt.compute_dtype) == (
        "nf4",
        True,
        "bf16",
    )
    fresh = hf.load_model(tiny_cfg(compute_dtype="bf16"), "cpu")
    again = hf.load_model(cfg, "cpu", str(prequantized))
    before = dict(fresh.named_parameters())
    packed = [n for n, p in again.named_parameters() if p.__class__.__name__ == "Params4bit"]
    assert len(packed) == 4 * 7
    for name in packed:
        assert torch.equal(before[name].data, dict(again.named_parameters())[name].data), name
    assert {m.compute_dtype for m in again.modules() if type(m).__name__ == "Linear4bit"} == {torch.float32}


@pytest.mark.slow
def test_a_prequantized_checkpoint_trains_end_to_end(prequantized: Path, runs_dir: Path) -> None:
    result = qlc(
        "train",
        "tiny-demo",
        *[
            x
            for o in (
                f"model.name_or_path={prequantized}",
                "train.max_steps=3",
                "train.logging_steps=1",
                "train.eval_steps=0",
                "data.val_fraction=0",
            )
            for x in ("--set", o)
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = runs.list_run_dirs(runs_dir)
    events, _ = runs.read_events(run_dir)
    ready = next(e for e in events if isinstance(e, protocol.ModelReady))
    assert (
        ready.quantization.endswith("(the checkpoint's own)") and "NF4 + double quant" in ready.quantization
    )
    assert (ready.repo, ready.commit) == ("", "")  # a local folder
    assert [e.step for e in events if isinstance(e, protocol.Step)] == [1, 2, 3]
    assert events[-1].status == "completed"
    shutil.rmtree(run_dir)
