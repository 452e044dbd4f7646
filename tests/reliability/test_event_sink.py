"""The events file on a full disk: what cannot be written (whole lines, or the rest of a short
write) is kept and written in order once there is room; the engine never crashes on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# In a child process: a file-size limit stands in for a full disk (writes past it fail with EFBIG,
# and a write that crosses it is cut short), then the limit is lifted, as when space is freed.
SCRIPT = """
import resource, signal, sys
from pathlib import Path
from engine.run.events import FileSink

path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
sink = FileSink(path)
sink.write(b'{"n":1,"pad":"' + b"x" * 40 + b'"}\\n')
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 30, hard))
for n in (2, 3):  # the first is cut short at the limit, the second cannot start
    sink.write(b'{"n":%d,"pad":"' % n + b"x" * 40 + b'"}\\n')
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
sink.write(b'{"n":4}\\n')
sink.close()
"""


def test_events_survive_a_full_disk_whole_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "keeping events until it can be written" in result.stderr  # said once, to engine.log
    lines = path.read_bytes().splitlines()
    assert [line[:6] for line in lines] == [b'{"n":1', b'{"n":2', b'{"n":3', b'{"n":4']
    assert all(line.endswith(b"}") for line in lines)
