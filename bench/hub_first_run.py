"""What a first run on a hub model prints: the README's transcript, reproduced offline.

The Hub stand-in of the tests (tests/hubserver.py) serves the tiny model as `owner/tiny` (with the
pickle files a real repo also holds, which the run must not fetch) and the demo conversations as a
parquet dataset `owner/chats`, at 4 MB/s so the download's progress shows. Then the real `qlc
train` runs against it with an empty hub cache, as on a fresh GPU box with `HF_ENDPOINT` unset:

    python -m bench.hub_first_run
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.models.tiny_build import ensure_builtin  # noqa: E402
from tests.engine.test_hub import CARD, DECOYS, TINY_FILES, _chats, _parquet  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402

SETS = {
    "model.name_or_path": "owner/tiny",
    "data.source": "owner/chats",
    "data.split": "train",
    "train.max_steps": "40",
    "train.save_steps": "20",
    "train.logging_steps": "5",
}


def main() -> int:
    folder = ensure_builtin("builtin:tiny-llama")
    model = {name: (folder / name).read_bytes() for name in TINY_FILES}
    tmp = Path(tempfile.mkdtemp(prefix="qlc-first-run-"))
    with HubServer() as hub:
        hub.push("owner/tiny", {**model, **DECOYS})
        hub.push(
            "owner/chats",
            {"README.md": CARD, "data/train-0.parquet": _parquet(_chats())},
            repo_type="dataset",
        )
        hub.rate = 4e6
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
        env.update(
            HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="0", QLC_CACHE_DIR=str(tmp / "qlc")
        )
        sets = [x for key, value in SETS.items() for x in ("--set", f"{key}={value}")]
        print("$ qlc train tiny-demo " + " ".join(sets), flush=True)
        cmd = [sys.executable, "-m", "tui.cli", "--runs-dir", str(tmp / "runs"), "train", "tiny-demo", *sets]
        return subprocess.run(cmd, cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
