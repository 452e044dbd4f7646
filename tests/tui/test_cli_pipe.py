"""`qlc ... | head -1`: a reader that goes away stops qlc as it stops a Unix tool, quietly and with
exit 141 (128 + SIGPIPE). It used to exit 1, with nothing on stderr, which for `qlc estimate` reads
as "does not fit" whatever the verdict was."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import QLC, REPO

fcntl = pytest.importorskip("fcntl")

PIPE_CLOSED = 141


def _env() -> dict[str, str]:
    # Block-buffered stdout, as a user's shell has it: then the output still buffered meets the
    # closed pipe at the flush when qlc exits, the path that used to end in a traceback.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["NO_COLOR"] = "1"
    return env


def test_estimate_into_a_reader_that_stops_after_one_line_exits_141_quietly() -> None:
    """The reader closes its end after the first line while qlc still has lines to write. A pipe
    that holds 4 kB, and an estimate that prints more than that after its first line (the advice
    table of a GPU it does not fit), so qlc cannot have written everything before the close:
    otherwise it would exit 0, rightly, and the test would depend on who runs first."""
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("needs Linux's F_SETPIPE_SZ to make the pipe smaller than the output")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    if fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) > 4096:
        pytest.skip("the kernel's smallest pipe holds the whole output")
    proc = subprocess.Popen(
        [*QLC, "estimate", "llama-3.1-8b-rtx4090", "--gpu", "4GB"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb", buffering=0) as reader:  # unbuffered: reads the one line only
        first = reader.readline()
    _, stderr = proc.communicate(timeout=120)
    assert first.startswith(b"llama-3.1-8b-rtx4090: llama-3.1-8b"), first
    assert (proc.returncode, stderr) == (PIPE_CLOSED, "")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["presets", "llama-3.1-8b-rtx4090"], id="presets"),  # written, flushed at exit
        pytest.param(["estimate", "llama-3.1-8b-rtx4090", "--json"], id="estimate-json"),
        pytest.param(["data", "tiny-demo"], id="data"),  # progress on stderr, the summary on stdout
    ],
)
def test_a_reader_gone_before_qlc_writes_exits_141_quietly(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [*QLC, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=REPO,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == PIPE_CLOSED, proc.stderr
    # `qlc data` says what it prepares on stderr before it writes anything: only that, no traceback.
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
    if args[0] != "data":
        assert proc.stderr == ""
