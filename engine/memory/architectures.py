"""Architectures: the shapes the memory model needs, from the catalog (presets/models/*.yaml), a
built-in model, a local config.json, or a hub id (config only, never weights).

Only decoder-only transformers with a gated MLP are modelled (Llama, Mistral, Qwen2/3, Gemma 1-3,
Phi-3/4). A multimodal Gemma 3 checkpoint (4B, 12B, 27B) trains its text stack, and its SigLIP vision
tower and projector are loaded beside it (frozen, quantized like the rest: engine.models.quantization):
their weights are counted from the config's vision_config (`VisionTower`), nothing else of them is.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config import RunConfig
from engine.errors import UserError

# Layer layout per transformers model_type. Keys the hub config does not state take these.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},  # Qwen2Attention: bias=True on q, k, v (modeling_qwen2.py)
    "qwen3": {"qk_norm": True},
    "gemma": {},
    # Gemma 2/3 norm the attention and MLP outputs too: four RMSNorms per layer.
    "gemma2": {"norms_per_layer": 4},
    "gemma3_text": {"norms_per_layer": 4, "qk_norm": True},
    # Phi-3/Phi-4 fuse q, k, v into qkv_proj and gate, up into gate_up_proj.
    "phi3": {"fused_qkv": True, "fused_gate_up": True},
}

# transformers' own defaults for keys a config.json may leave out (configuration_*.py, 5.17).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {
        "vocab_size": 262_208,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131_072,
        "tie_word_embeddings": True,
    },
    "gemma2": {"tie_word_embeddings": True, "head_dim": 256},
    "gemma": {"tie_word_embeddings": True, "head_dim": 256},
    "qwen2": {"max_position_embeddings": 32768, "tie_word_embeddings": False},
    "phi3": {"max_position_embeddings": 4096, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 4096 * 32, "tie_word_embeddings": False},
    "llama": {"max_position_embeddings": 2048, "tie_word_embeddings": False},
}

CATALOG_KEYS = {
    "name",
    "family",
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "head_dim",
    "ffn",
    "vocab",
    "tied_embeddings",
    "max_positions",
    "norms_per_layer",
    "qk_norm",
    "qkv_bias",
    "fused_qkv",
    "fused_gate_up",
    "sliding_window",
    "sliding_pattern",
    "vision",
    "hub_ids",
}
VISION_KEYS = {"hidden", "ffn", "layers", "image_size", "patch_size", "channels"}


@dataclass(frozen=True)
class VisionTower:
    """A SigLIP vision encoder without its pooling head (Gemma 3's `vision_config`, vision_use_head
    false) and Gemma 3's projector into the text stack, as transformers builds them
    (modeling_siglip.py, modeling_gemma3.py Gemma3MultiModalProjector)."""

    hidden: int
    ffn: int
    layers: int
    image_size: int
    patch_size: int
    text_hidden: int  # the projector's output width
    channels: int = 3
    LINEARS_PER_LAYER = 6  # q, k, v, out_proj, fc1, fc2

    def param_counts(self) -> dict[str, int]:
        h, f = self.hidden, self.ffn
        # q, k, v, out_proj and fc1, fc2: the linear layers bitsandbytes could quantize.
        linear = self.layers * (4 * h * h + 2 * h * f)
        biases = self.layers * (4 * h + f + h)
        norms = self.layers * 2 * 2 * h + 2 * h  # two LayerNorms per layer and the last, weight + bias
        patches = (self.image_size // self.patch_size) ** 2
        embeddings = self.channels * self.patch_size**2 * h + h + patches * h  # patch conv, positions
        projector = h * self.text_hidden + h  # mm_input_projection_weight and mm_soft_emb_norm
        other = biases + norms + embeddings + projector
        return {"linear": linear, "other": other, "total": linear + other}


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    max_positions: int
    norms_per_layer: int = 2
    qk_norm: bool = False
    qkv_bias: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    sliding_window: int = 0  # local attention window of the sliding layers; 0: every layer is global
    sliding_pattern: int = 0  # one global layer in every N (Gemma 3: 6); 0: all layers slide
    vision: VisionTower | None = None  # a multimodal checkpoint's vision tower, loaded beside the text stack
    hub_ids: tuple[str, ...] = ()
    source: str = ""
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """Each linear layer of one decoder layer: name -> (in_features, out_features)."""
        h, q, kv, ffn = self.hidden, self.q_dim, self.kv_dim, self.ffn
        mods: dict[str, tuple[int, int]] = {}
        if self.fused_qkv:
            mods["qkv_proj"] = (h, q + 2 * kv)
        else:
            mods.update(q_proj=(h, q), k_proj=(h, kv), v_proj=(h, kv))
        mods["o_proj"] = (q, h)
        if self.fused_gate_up:
            mods["gate_up_proj"] = (h, 2 * ffn)
        else:
            mods.update(gate_proj=(h, ffn), up_proj=(h, ffn))
        mods["down_proj"] = (ffn, h)
        return mods

    def param_counts(self) -> dict[str, int]:
        linear = self.layers * sum(i * o for i, o in self.linear_modules().values())
        bias = self.layers * (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        norms = self.layers * (
            self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        )
        norms += self.hidden  # the final norm
        embed = self.vocab * self.hidden
        lm_head = 0 if self.tied_embeddings else embed
        return {
            "linear": linear,
            "bias": bias,
            "norms": norms,
            "embed_tokens": embed,
            "lm_head": lm_head,
            "total": linear + bias + norms + embed + lm_head,
        }


# ---------------------------------------------------------------------------------------------
# The catalog
# ---------------------------------------------------------------------------------------------


def catalog_dirs() -> list[Path]:
    """presets/models in the repository, or the copy installed with the package."""
    here = Path(__file__).resolve().parent.parent
    return [d for d in (here.parent / "presets" / "models", here / "_presets" / "models") if d.is_dir()]


def _from_catalog_entry(data: dict[str, Any], path: Path) -> Architecture:
    problems = [f"unknown key {k!r}" for k in data if k not in CATALOG_KEYS]
    missing = [
        k
        for k in ("name", "family", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab")
        if k not in data
    ]
    problems += [f"missing key {k!r}" for k in missing]
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    family = str(data["family"])
    layout = dict(FAMILIES.get(family, {}))
    for key in (
        "norms_per_layer",
        "qk_norm",
        "qkv_bias",
        "fused_qkv",
        "fused_gate_up",
        "sliding_window",
        "sliding_pattern",
    ):
        if key in data:
            layout[key] = data[key]
    vision = data.get("vision")
    if vision is not None:
        if not isinstance(vision, dict) or not {"hidden", "ffn", "layers", "image_size", "patch_size"} <= set(
            vision
        ):
            raise UserError(f"{path}: vision needs hidden, ffn, layers, image_size and patch_size")
        unknown = set(vision) - VISION_KEYS
        if unknown:
            raise UserError(f"{path}: unknown vision key {sorted(unknown)[0]!r}")
        layout["vision"] = VisionTower(
            text_hidden=int(data["hidden"]), **{k: int(v) for k, v in vision.items()}
        )
    return Architecture(
        name=str(data["name"]),
        family=family,
        layers=int(data["layers"]),
        hidden=int(data["hidden"]),
        heads=int(data["heads"]),
        kv_heads=int(data["kv_heads"]),
        head_dim=int(data.get("head_dim") or data["hidden"] // data["heads"]),
        ffn=int(data["ffn"]),
        vocab=int(data["vocab"]),
        tied_embeddings=bool(data.get("tied_embeddings", False)),
        max_positions=int(data.get("max_positions", 4096)),
        hub_ids=tuple(str(h) for h in data.get("hub_ids", []) or []),
        source=str(path),
        **layout,
    )


@functools.lru_cache(maxsize=1)
def catalog() -> dict[str, Architecture]:
    """Every catalog entry by name. Read once per process: an estimate must take milliseconds."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out: dict[str, Architecture] = {}
    for d in catalog_dirs():
        for path in sorted(d.glob("*.yaml")):
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
            if not isinstance(data, dict):
                raise UserError(f"{path}: expected a mapping of architecture keys")
            arch = _from_catalog_entry(data, path)
            out.setdefault(arch.name, arch)
    return out


def by_hub_id(name: str) -> Architecture | None:
    """A catalog entry listing this hub id (case-insensitive), with or without the owner part."""
    wanted = name.lower().strip("/")
    short = wanted.rsplit("/", 1)[-1]
    for arch in catalog().values():
        ids = [h.lower() for h in arch.hub_ids]
        if wanted in ids or short in (i.rsplit("/", 1)[-1] for i in ids):
            return arch
    return None


# ---------------------------------------------------------------------------------------------
# From a transformers config.json
# ---------------------------------------------------------------------------------------------


def vision_tower(config: dict[str, Any], text_hidden: int) -> tuple[VisionTower | None, str | None]:
    """(the vision tower a multimodal config.json loads, or a note when it cannot be counted)."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return None, None
    kind = str(vision.get("model_type") or "siglip_vision_model")
    if kind != "siglip_vision_model" or vision.get("vision_use_head"):
        return None, f"vision tower {kind!r} is not modelled: its weights are not counted"
    try:
        return (
            VisionTower(
                hidden=int(vision.get("hidden_size", 768)),  # SiglipVisionConfig's defaults
                ffn=int(vision.get("intermediate_size", 3072)),
                layers=int(vision.get("num_hidden_layers", 12)),
                image_size=int(vision.get("image_size", 224)),
                patch_size=int(vision.get("patch_size", 16)),
                channels=int(vision.get("num_channels", 3)),
                text_hidden=text_hidden,
            ),
            None,
        )
    except (TypeError, ValueError):
        return None, "vision_config unreadable: the vision tower's weights are not counted"


def from_hf_config(config: dict[str, Any], name: str, source: str = "") -> Architecture:
    """An Architecture from a config.json's contents (a multimodal config's text_config for Gemma 3,
    with its vision tower)."""
    cfg = dict(config)
    multimodal = dict(config) if isinstance(cfg.get("vision_config"), dict) else None
    if isinstance(cfg.get("text_config"), dict):
        text = dict(cfg["text_config"])
        text.setdefault("model_type", f"{cfg.get('model_type', '')}_text")
        if "tie_word_embeddings" in cfg:
            text.setdefault("tie_word_embeddings", cfg["tie_word_embeddings"])
        cfg = text
    family = str(cfg.get("model_type") or "llama")
    notes: list[str] = []
    if family not in FAMILIES:
        notes.append(f"model_type {family!r} is not modelled: estimated as a Llama-style decoder")
    if any(k in cfg for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise UserError(
            f"{name}: mixture-of-experts models are not modelled by the memory estimate yet",
            "the estimate covers dense decoder models (Llama, Mistral, Qwen, Gemma, Phi)",
        )
    cfg = {**HF_DEFAULTS.get(family, HF_DEFAULTS["llama"]), **{k: v for k, v in cfg.items() if v is not None}}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        arch = Architecture(
            name=name,
            family=family,
            layers=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_positions=int(cfg.get("max_position_embeddings") or 4096),
            source=source,
            notes=tuple(notes),
            **FAMILIES.get(family, {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(
            f"{source or name}: not a decoder config the memory model reads ({exc!r} missing or bad)"
        ) from None
    if cfg.get("attention_bias") and not arch.qkv_bias:
        arch = _replace(arch, qkv_bias=True)
    window, pattern = _sliding(cfg, family)
    if window:
        arch = _replace(arch, sliding_window=window, sliding_pattern=pattern)
    if multimodal is not None:
        vision, note = vision_tower(multimodal, arch.hidden)
        arch = _replace(arch, vision=vision, notes=arch.notes + ((note,) if note else ()))
    return arch


def _sliding(cfg: dict[str, Any], family: str) -> tuple[int, int]:
    """(window, one global layer every N) of a config with sliding-window layers, else (0, 0)."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False or family in ("qwen2", "qwen3", "llama"):
        return 0, 0
    types = cfg.get("layer_types")
    if isinstance(types, list) and "full_attention" in types:
        return int(window), types.index("full_attention") + 1
    if cfg.get("sliding_window_pattern"):
        return int(window), int(cfg["sliding_window_pattern"])
    return int(window), {"gemma3_text": 6, "gemma2": 2}.get(family, 0)


def _replace(arch: Architecture, **changes: Any) -> Architecture:
    from dataclasses import replace

    return replace(arch, **changes)


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read a model config ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a model config (expected a JSON object)")
    return data


@functools.lru_cache(maxsize=32)
def _hub_config(repo_id: str, revision: str | None) -> dict[str, Any]:
    """config.json from the hub: one small file, never weights. Cached per process."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise UserError(f"model {repo_id!r}: huggingface_hub is not installed to read its config") from None
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision)
    except GatedRepoError:
        raise UserError(
            f"model {repo_id!r}: a gated repository; its config needs an accepted licence and a token",
            "run `hf auth login`, or set model.arch to a catalog entry (qlc estimate --help)",
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"unknown model {repo_id!r}: not on the hub (or private)", _catalog_hint(repo_id)
        ) from None
    except (LocalEntryNotFoundError, EntryNotFoundError, OSError):
        raise UserError(
            f"model {repo_id!r}: cannot fetch its config.json from the hub (offline, or no such file)",
            "connect to the network, pass a local model folder, or set model.arch to a catalog entry",
        ) from None
    return _read_config_json(Path(path))


def _catalog_hint(name: str) -> str:
    names = sorted(catalog())
    close = difflib.get_close_matches(name.rsplit("/", 1)[-1].lower(), names, n=1, cutoff=0.5)
    known = f"did you mean {close[0]!r}? " if close else ""
    return f"{known}catalog: {', '.join(names)}"


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


def find_architecture(name_or_path: str, revision: str | None = None) -> Architecture:
    """A catalog name, a builtin model, a local folder or config.json, a catalog hub id, a hub id."""
    from engine.models import tiny

    if tiny.is_builtin(name_or_path):
        name = name_or_path.removeprefix(tiny.BUILTIN_PREFIX)
        return from_hf_config(tiny.builtin_config(name_or_path), name, source=name_or_path)
    if name_or_path in catalog():
        return catalog()[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path}: no config.json in this folder", "point at a model folder or its config.json"
            )
        return from_hf_config(
            _read_config_json(path / "config.json"), path.name, source=str(path / "config.json")
        )
    if path.is_file():
        return from_hf_config(_read_config_json(path), path.parent.name or path.stem, source=str(path))
    arch = by_hub_id(name_or_path)
    if arch is not None:
        return arch
    if "/" not in name_or_path or name_or_path.startswith((".", "/", "~")):
        raise UserError(f"unknown model {name_or_path!r}", _catalog_hint(name_or_path))
    data = _hub_config(name_or_path, revision)
    return from_hf_config(data, name_or_path.rsplit("/", 1)[-1], source=f"hub:{name_or_path}")


def resolve_architecture(cfg: RunConfig) -> Architecture:
    """The architecture a run config trains: model.arch when set, else from model.name_or_path."""
    if cfg.model.arch:
        arch = catalog().get(cfg.model.arch)
        if arch is None:
            raise UserError(
                f"model.arch: unknown architecture {cfg.model.arch!r}", _catalog_hint(cfg.model.arch)
            )
        return arch
    return find_architecture(cfg.model.name_or_path, cfg.model.revision)
