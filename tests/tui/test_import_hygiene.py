"""The console never imports the training stack (start-up stays well under a second on a small box),
and the engine's pure modules never import the UI toolkit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "datasets", "peft", "trl", "bitsandbytes", "accelerate")
UI = ("textual", "rich")
# The engine modules the console imports, and the rest of the engine that must stay UI-free.
# (The lead extends this list as the engine grows.)
ENGINE_PURE = (
    "engine",
    "engine.protocol",
    "engine.config",
    "engine.errors",
    "engine.runs",
    "engine.launcher",
    "engine.distributed",
    "engine.memory.distributed",
    "engine.memory",
    "engine.data",
    "engine.export.request",
    "engine.export.card",
    "engine.export.gguf",
    "engine.export.job",
    "engine.hub",
    "engine.hub.files",
    "engine.hub.pins",
    "engine.hub.pull",
    "engine.hub.sources",
)


def _imported(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["tui.app", "tui.cli"])
def test_console_does_not_import_the_training_stack(module: str) -> None:
    loaded = _imported(f"import {module}")
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}
    # Downloads run in engine processes (`qlc pull`, a run's start): the console has no hub client.
    assert not {m for m in loaded if m.split(".")[0] in ("huggingface_hub", "httpx")}


def test_building_the_app_does_not_import_the_training_stack(tmp_path: Path) -> None:
    # Composing every pane runs the memory calculator, the preset loader and the data check.
    code = (
        "import asyncio\nfrom tui.app import make_app\n"
        f"app = make_app({str(tmp_path)!r}, auto_attach=False)\n"
        "async def main():\n"
        "    async with app.run_test(size=(80, 24)) as pilot:\n"
        "        for key in '12345':\n"
        "            await pilot.press(key)\n"
        "        await pilot.pause(0.5)\n"
        "asyncio.run(main())"
    )
    loaded = _imported(code)
    assert "textual" in loaded
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


@pytest.mark.parametrize("module", ENGINE_PURE)
def test_engine_pure_modules_do_not_import_ui(module: str) -> None:
    loaded = _imported(f"import {module}")
    assert not {m for m in loaded if m.split(".")[0] in UI}
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}
