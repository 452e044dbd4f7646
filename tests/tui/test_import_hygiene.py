"""The console never imports the training stack (start-up stays well under a second on a small box),
and the engine never imports the UI toolkit: checked here at run time, in fresh interpreters, for
every module of the tree. The static rules (lazy imports included, and which engine modules the
console may reach) are import-linter's contracts in pyproject.toml, run by `make test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import engine
import tui

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "datasets", "peft", "trl", "bitsandbytes", "accelerate")
UI = ("textual", "rich")


def modules(package: ModuleType) -> list[str]:
    """Every module under `package`, from the files on disk (nothing to keep up to date by hand;
    folders without an __init__ count too)."""
    root = Path(package.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__":
            found.append(".".join(parts))
    return sorted(found)


def _imported(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    return set(out.stdout.split())


def _tops(loaded: set[str], names: tuple[str, ...]) -> set[str]:
    return {m for m in loaded if m.split(".")[0] in names}


def test_the_tree_is_walked() -> None:
    assert {"tui.app", "tui.commands.train", "tui.widgets.presets_pane"} <= set(modules(tui))
    assert {"engine.run.runs", "engine.models.source", "engine.train.recipe"} <= set(modules(engine))


def test_no_console_module_imports_the_training_stack() -> None:
    """Every module of tui/ (the app, every command, widget and screen), imported together."""
    loaded = _imported("\n".join(f"import {m}" for m in modules(tui)))
    assert "textual" in loaded
    assert not _tops(loaded, HEAVY)
    # Downloads run in engine processes (`qlc pull`, a run's start): the console has no hub client.
    assert not _tops(loaded, ("huggingface_hub", "httpx"))


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
    assert not _tops(loaded, HEAVY)


def test_the_engine_outside_its_training_side_imports_neither_ui_nor_training_stack() -> None:
    """Every module of engine/ but engine.train (the child's torch side, whose libraries bring
    what they bring), imported together: no UI toolkit, and no torch at import time."""
    pure = [m for m in modules(engine) if not m.startswith("engine.train")]
    loaded = _imported("\n".join(f"import {m}" for m in pure))
    assert "engine.run.runs" in loaded and "engine.export.job" in loaded
    assert not _tops(loaded, UI)
    assert not _tops(loaded, HEAVY)
