"""Every preset loads, validates, and documents each key with a comment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from engine.config import RunConfig, config_from_dict, list_presets, load_preset

PRESETS = sorted(
    p for p in (Path(__file__).resolve().parents[2] / "presets").glob("*.yaml") if p.stem != "gpus"
)


def test_the_preset_folder_is_found() -> None:
    assert {p.stem for p in list_presets()} >= {p.stem for p in PRESETS}
    assert any(p.stem == "tiny-demo" for p in PRESETS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_validates(path: Path) -> None:
    cfg = load_preset(str(path))
    assert isinstance(cfg, RunConfig)
    assert cfg.name == path.stem
    assert cfg.description
    # The resolved config survives the trip through a run's config.yaml unchanged.
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_key_has_a_comment(path: Path) -> None:
    """A key is documented by a comment on its line or on the line just above it."""
    lines = path.read_text().splitlines()
    key = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*:")
    undocumented = []
    for i, line in enumerate(lines):
        if not key.match(line):
            continue
        inline = "#" in line.split(":", 1)[1]
        above = i > 0 and lines[i - 1].strip().startswith("#")
        is_section = line.rstrip().endswith(":")  # a section header: its keys carry the comments
        if not (inline or above or is_section):
            undocumented.append(f"line {i + 1}: {line.strip()}")
    assert not undocumented, f"{path.name}: keys without a comment:\n" + "\n".join(undocumented)


def test_tiny_demo_uses_the_true_qlora_path() -> None:
    cfg = load_preset("tiny-demo")
    assert cfg.model.name_or_path == "builtin:tiny-llama"
    assert cfg.quant.load_in_4bit and cfg.quant.quant_type == "nf4"
    assert cfg.train.optimizer.endswith("8bit")
    assert Path(cfg.data.source).is_file()  # resolved relative to the preset file
