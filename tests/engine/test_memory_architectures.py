"""The architecture catalog: parameter counts against published figures, every key documented,
and resolution from a preset, a builtin model, a local config, a hub alias, an offline hub id."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.config import RunConfig
from engine.errors import UserError
from engine.memory import find_architecture, resolve_architecture
from engine.memory.architectures import catalog, catalog_dirs, from_hf_config

MODELS = Path(__file__).resolve().parents[2] / "presets" / "models"

# Published totals. Hub figures are the safetensors parameter counts the model pages show.
PUBLISHED = {
    # meta-llama/Llama-3.1-8B model page (safetensors): 8,030,261,248
    "llama-3.1-8b": 8_030_261_248,
    # meta-llama/Llama-3.2-1B model page: 1,235,814,400 ("1.24B")
    "llama-3.2-1b": 1_235_814_400,
    # meta-llama/Llama-3.2-3B model page: 3,212,749,824 ("3.21B")
    "llama-3.2-3b": 3_212_749_824,
    # meta-llama/Llama-3.3-70B-Instruct model page: 70,553,706,496 ("70.6B")
    "llama-3.3-70b": 70_553_706_496,
    # google/gemma-3-1b-it model page: 999,885,952 (text only)
    "gemma-3-1b": 999_885_952,
    # Gemma 3 Technical Report (arXiv:2503.19786), Table 1, embedding + non-embedding parameters of
    # the language model (the 417M SigLIP vision encoder excluded): 4B 675M + 3,209M,
    # 12B 1,012M + 10,759M, 27B 1,416M + 25,600M.
    "gemma-3-4b": 675_000_000 + 3_209_000_000,
    "gemma-3-12b": 1_012_000_000 + 10_759_000_000,
    "gemma-3-27b": 1_416_000_000 + 25_600_000_000,
    # Qwen/Qwen2.5-7B model card: "Number of Parameters: 7.61B"
    "qwen2.5-7b": 7_610_000_000,
    # Qwen/Qwen2.5-14B model page, safetensors: "14.8B params" (the card's prose says 14.7B)
    "qwen2.5-14b": 14_800_000_000,
    # mistralai/Mistral-7B-v0.3 model page: 7,248,023,552
    "mistral-7b": 7_248_023_552,
    # microsoft/phi-4 model card: 14.7B parameters (safetensors 14,659,507,200)
    "phi-4": 14_700_000_000,
}

# Non-embedding counts the same sources state, a second check on the layer layout.
PUBLISHED_NON_EMBEDDING = {
    "gemma-3-1b": 698_000_000,  # Gemma 3 report, Table 1
    "gemma-3-4b": 3_209_000_000,
    "gemma-3-12b": 10_759_000_000,
    "gemma-3-27b": 25_600_000_000,
    "qwen2.5-7b": 6_530_000_000,  # Qwen2.5-7B card: "Non-Embedding: 6.53B"
    # (Qwen2.5-14B's card states 13.1B non-embedding, which is not 14.8B minus its two 0.78B
    # embedding matrices: that figure is left out.)
}


def test_the_catalog_has_every_required_model() -> None:
    assert set(catalog()) == set(PUBLISHED)
    assert catalog_dirs()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_parameters_within_half_a_percent_of_published(name: str) -> None:
    total = catalog()[name].param_counts()["total"]
    assert abs(total / PUBLISHED[name] - 1) < 0.005, f"{name}: {total:,} vs published {PUBLISHED[name]:,}"


@pytest.mark.parametrize("name", sorted(PUBLISHED_NON_EMBEDDING))
def test_non_embedding_parameters(name: str) -> None:
    counts = catalog()[name].param_counts()
    non_embedding = counts["total"] - counts["embed_tokens"] - counts["lm_head"]
    assert abs(non_embedding / PUBLISHED_NON_EMBEDDING[name] - 1) < 0.005


def test_llama_8b_exact_breakdown() -> None:
    c = catalog()["llama-3.1-8b"].param_counts()
    assert c["linear"] == 6_979_321_856  # shared/memory-model.md
    assert c["embed_tokens"] == c["lm_head"] == 525_336_576


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_catalog_key_has_a_comment(path: Path) -> None:
    lines = path.read_text().splitlines()
    key = re.compile(r"^[A-Za-z_]+:")
    bare = [line for line in lines if key.match(line) and "#" not in line]
    assert not bare, f"{path.name}: keys without a comment: {bare}"
    assert catalog()[path.stem].source.endswith(path.name)  # file name = catalog name


def _cfg(**model: object) -> RunConfig:
    cfg = RunConfig()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_resolve_from_arch_and_from_hub_alias() -> None:
    assert resolve_architecture(_cfg(arch="gemma-3-4b")).name == "gemma-3-4b"
    by_id = resolve_architecture(_cfg(name_or_path="meta-llama/Llama-3.1-8B-Instruct"))
    assert by_id.name == "llama-3.1-8b"
    # A re-upload under another owner resolves by its model name.
    assert find_architecture("someone/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert find_architecture("Qwen/Qwen2.5-7B-Instruct").qkv_bias


def test_resolve_builtin_tiny_llama() -> None:
    arch = resolve_architecture(_cfg(name_or_path="builtin:tiny-llama"))
    assert (arch.layers, arch.hidden, arch.vocab, arch.max_positions) == (4, 256, 1024, 1024)


def test_resolve_local_folder_and_config_file(tmp_path: Path) -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir = resolve_architecture(_cfg(name_or_path=str(tmp_path)))
    from_file = find_architecture(str(tmp_path / "config.json"))
    assert from_dir.param_counts()["total"] == from_file.param_counts()["total"] == 8_030_261_248
    assert from_dir.head_dim == 128  # hidden / heads when the config leaves it out


def test_gemma3_multimodal_config_counts_the_text_stack() -> None:
    # google/gemma-3-4b-it's config.json (abridged): the text_config leaves heads, head_dim and
    # vocab to Gemma3TextConfig's defaults.
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "sliding_window": 1024,
        },
        "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27},
    }
    arch = from_hf_config(config, "gemma-3-4b-it")
    assert arch.param_counts() == catalog()["gemma-3-4b"].param_counts()
    assert arch.tied_embeddings and arch.qk_norm and arch.norms_per_layer == 4


def test_phi4_has_fused_modules() -> None:
    assert list(catalog()["phi-4"].linear_modules()) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_unknown_names_are_one_line_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="unknown architecture 'llama-9b'"):
        resolve_architecture(_cfg(arch="llama-9b"))
    with pytest.raises(UserError, match="unknown model 'no-such-model'"):
        find_architecture("no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        find_architecture("nobody/not-a-model-anywhere")
    assert "\n" not in str(info.value)


def test_mixture_of_experts_is_refused() -> None:
    config = {"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 1, "num_local_experts": 8}
    with pytest.raises(UserError, match="mixture-of-experts"):
        from_hf_config(config, "mixtral")
