"""bench/import_time.py reads real `python -X importtime` output (made here, of a small import)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import import_time


def test_summarizes_a_real_importtime_trace(tmp_path: Path) -> None:
    trace = tmp_path / "json.txt"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import json"], capture_output=True, text=True
    )
    trace.write_text(proc.stderr, encoding="utf-8")
    rows = import_time.parse(proc.stderr)
    names = {r[3] for r in rows}
    assert {"json", "json.decoder"} <= names
    depth = {r[3]: r[2] for r in rows}
    assert depth["json"] == 0 and depth["json.decoder"] == 1  # nested under json's import
    out = tmp_path / "out.json"
    assert import_time.main([str(trace), "--wall", "0.05", "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["json.txt"]
    assert entry["wall_s"] == 0.05 and entry["modules"] == len(rows)
    assert "json" in entry["top_level_s"]
