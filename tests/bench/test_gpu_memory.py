"""Device figures of a run's own processes (bench/gpu_memory.py), with real child processes and
a stand-in for NVML (no GPU here): attribution by parent links when NVML's pids are ours, by the
init window when they are not (a container's host pids)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench import gpu_memory as gm
from bench.channel import Channel

CHILD = "import os, sys, time, pathlib; pathlib.Path(sys.argv[1], str(os.getpid())).touch(); time.sleep(3)"


def _start(marker: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(marker)])


def _wait(pred, timeout: float = 10.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_our_pids_are_attributed_through_their_parents(tmp_path: Path) -> None:
    monitor = gm.GpuMemoryMonitor(gm.FakeCudaSource(tmp_path), interval=0.02).start()
    try:
        proc = _start(tmp_path)
        monitor.register("worker", proc.pid)
        assert _wait(lambda: monitor.visible("worker"))
        t0 = time.time()
        time.sleep(0.2)
        peak, samples = monitor.process_peak("worker", t0, time.time())
        assert samples > 0 and peak and peak > 1e6  # the child's resident memory
        assert monitor.process_peak("someone-else", t0, time.time()) == (None, 0)
        proc.wait()
    finally:
        monitor.stop()


def test_host_pids_are_claimed_by_the_process_that_just_created_its_context(tmp_path: Path) -> None:
    monitor = gm.GpuMemoryMonitor(
        gm.FakeCudaSource(tmp_path, hidden=True), interval=0.02, mapped=True
    ).start()
    try:
        opened = time.time()
        first = _start(tmp_path)
        monitor.register("first", first.pid)  # its NVML pid is not its pid: no parent link
        assert _wait(lambda: len(monitor.unowned_since(opened)) == 1)
        assert not monitor.visible("first")
        assert monitor.claim_new("first", opened) == first.pid + gm.FakeCudaSource.OFFSET
        opened = time.time()
        a, b = _start(tmp_path), _start(tmp_path)
        assert _wait(lambda: len(monitor.unowned_since(opened)) == 2)
        assert monitor.claim_new("ambiguous", opened) is None  # two new pids: neither is claimed
        for p in (first, a, b):
            p.wait()
    finally:
        monitor.stop()


def test_a_probe_tells_per_process_from_baseline(tmp_path: Path) -> None:
    with_usage = gm.GpuMemoryMonitor(gm.FakeCudaSource(tmp_path / "a"), interval=0.02).start()
    without = gm.GpuMemoryMonitor(
        gm.FakeCudaSource(tmp_path / "b", report_usage=False), interval=0.02
    ).start()
    try:
        for monitor, marker in ((with_usage, tmp_path / "a"), (without, tmp_path / "b")):
            opened = time.time()
            proc = _start(marker)
            monitor.register("probe", proc.pid)
            _wait(lambda m=monitor: m.visible("probe"))
            time.sleep(0.1)
            result = gm.analyse_probe(monitor, "probe", proc.pid, {"inited": time.time() - 0.1}, opened)
            proc.wait()
            if monitor is with_usage:
                assert result.method == gm.PER_PROCESS and result.context_gib
            else:
                assert result.method == gm.BASELINE
    finally:
        with_usage.stop()
        without.stop()


def test_a_channel_keeps_a_torn_line_for_the_next_read(tmp_path: Path) -> None:
    driver = Channel.for_driver(tmp_path, "w")
    child = Channel.for_child(tmp_path, "w")
    child.send(ev="one")
    with child.outbox.open("a") as f:
        f.write('{"ev": "tw')
    assert [m["ev"] for m in driver.poll()] == ["one"]
    with child.outbox.open("a") as f:
        f.write('o"}\n')
    assert [m["ev"] for m in driver.poll()] == ["two"]
    driver.send(cmd="go")
    assert child.wait({"go"}, timeout=1)["cmd"] == "go"
