"""bench/memory_history.py: the replay of PyTorch's memory trace to the allocation peak."""

from __future__ import annotations

import json
from pathlib import Path

from bench import memory_history as mh

MIB = 1024**2


def _frame(name: str, line: int) -> dict[str, object]:
    return {"filename": f"/x/site-packages/unsloth/{name}.py", "line": line, "name": name}


def _alloc(addr: int, mib: int, where: str) -> dict[str, object]:
    return {"action": "alloc", "addr": addr, "size": mib * MIB, "frames": [_frame(where, addr)]}


def _free(addr: int, mib: int) -> dict[str, object]:
    return {"action": "free_completed", "addr": addr, "size": mib * MIB, "frames": []}


TRACE = [
    _alloc(1, 100, "logits"),  # 100 + before
    _alloc(2, 50, "grad"),  # 150: the peak
    _free(1, 100),
    _free(9, 30),  # allocated before the recording: leaves `before`
    _alloc(3, 60, "logits"),  # 110 - 30
    {"action": "segment_alloc", "addr": 0, "size": 4096 * MIB},  # reserved, not allocated
]


def test_the_peak_and_what_it_held() -> None:
    peak, at, live = mh.peak_live(TRACE, before=40 * MIB)
    assert (peak, at) == (190 * MIB, 1)
    assert sorted(live) == [1, 2]


def test_a_block_from_before_the_recording_lowers_the_running_total() -> None:
    trace = [*TRACE, _alloc(4, 75, "late")]  # 40 - 30 + 50 + 60 + 75 = 195: a new peak
    peak, at, live = mh.peak_live(trace, before=40 * MIB)
    assert (peak, at) == (195 * MIB, len(trace) - 1)
    assert sorted(live) == [2, 3, 4]


def test_summary_groups_by_frames_largest_first(tmp_path: Path) -> None:
    s = mh.summarize({"device_traces": [TRACE]}, before=40 * MIB)
    assert s["peak_allocated_gib"] == round(190 / 1024, 4)
    assert s["live_at_peak_gib"] == round(150 / 1024, 4)
    assert [g["frames"][0].split()[1] for g in s["groups"]] == ["logits", "grad"]
    assert s["groups"][0]["frames"][0].startswith("unsloth/logits.py:1 ")  # site-packages cut off
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"id": "a/b", **s}))
    text = mh.show(path)
    assert "a/b: peak allocated 0.185 GiB = 0.039 GiB before the run + 0.146 GiB" in text
    assert "0.0977 GiB in 1 blocks  unsloth/logits.py:1 logits" in text


def test_a_replay_that_is_not_the_runs_says_so(tmp_path: Path) -> None:
    """PyTorch's own peak is the check: a trace that lost its first events replays lower."""
    s = mh.summarize({"device_traces": [TRACE]}, before=40 * MIB, torch_peak=300 * MIB)
    assert s["trace_complete"] is True and s["torch_peak_allocated_gib"] == round(300 / 1024, 4)
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"id": "a/b", **s}))
    assert "PyTorch's own peak was 0.293 GiB: the replay missed part of the run" in mh.show(path)
    agreed = mh.summarize({"device_traces": [TRACE]}, before=40 * MIB, torch_peak=190 * MIB)
    path.write_text(json.dumps({"id": "a/b", **agreed}))
    assert "missed" not in mh.show(path)


def test_frames_read_as_modules() -> None:
    frames = [
        {"filename": "/tmp/site2/unsloth_zoo/fused_losses/fused_linear.py", "line": 927, "name": "__init__"},
        {"filename": "/usr/lib/python3/site-packages/torch/cuda/memory.py", "line": 1, "name": "noise"},
        {"filename": str(mh.Path(mh.__file__).resolve()), "line": 5, "name": "here"},
    ]
    assert mh._frames({"frames": frames}) == [
        "unsloth_zoo/fused_losses/fused_linear.py:927 __init__",
        "bench/memory_history.py:5 here",
    ]
