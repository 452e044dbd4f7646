"""Where a training step's device time goes, by kind of kernel: the breakdown behind issue 16's
"what is left is inside the step's kernels" (bench/step_tax.py --kernels).

One round of optimizer steps runs under torch.profiler from the end of step 2 to the end of the
last step. Each kernel is put in a category by its name (the first CATEGORIES entry whose
fragment it contains), and the report gives each category's device seconds per step, the
device's busy time (the union of kernel intervals) against the wall time of the steps, and the
kernels that take the most. On the CPU (a dry run) the same report is made of the aten ops' own
times, so the path is tested without a GPU.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

# Kernel-name fragments per category, matched lower-case in this order: attention first (flash and
# cuDNN attention kernels carry "gemm"/"cutlass" in their names too), the loss before Triton
# (Unsloth's cross-entropy is a Triton kernel), matmuls before the elementwise catch-alls.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "varlen", "cudnn_generated", "scaled_dot")),
    ("dequantize", ("dequant",)),  # bitsandbytes' kDequantizeBlockwise, Unsloth's _nf4_dequant_kernel
    ("optimizer", ("koptimizer", "optimizer", "adam")),
    ("cross-entropy", ("cross_entropy", "crossentropy", "logsumexp", "nll_loss")),
    (
        "matmul",
        ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm"),
    ),
    # Inductor's kernels (triton_*) and Unsloth's own Triton kernels, named for what they fuse.
    (
        "fused (Triton)",
        ("triton", "_rms_layernorm", "rms_norm", "_rope", "_fg_kernel", "dwf_dw", "swiglu", "geglu"),
    ),
    ("communication", ("nccl",)),
    ("copy", ("memcpy", "memset", "copy_", "copy")),
    ("elementwise (aten)", ("elementwise", "reduce", "vectorized", "fill", "aten::")),
)
OTHER = "other"


def category(name: str) -> str:
    low = name.lower()
    for cat, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return cat
    return OTHER


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds covered by at least one interval (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


Kernel = tuple[str, float, float, int]  # name, start and end (microseconds), calls it stands for


def summarise(kernels: list[Kernel], steps: int, wall_s: float, top: int = 25) -> dict[str, Any]:
    """kernels: every kernel in the window of `steps` steps."""
    per_cat: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    per_name: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for name, a, b, n in kernels:
        cat = category(name)
        per_cat[cat] += b - a
        count[cat] += n
        per_name[name] += b - a
        calls[name] += n
    steps = max(steps, 1)
    busy_s = union_us([(a, b) for _, a, b, _ in kernels]) / 1e6 / steps
    kernel_s = sum(per_cat.values()) / 1e6 / steps
    return {
        "steps": steps,
        "wall_s_per_step": wall_s / steps,
        "busy_s_per_step": busy_s,
        "kernel_s_per_step": kernel_s,
        "idle_share": max(0.0, 1 - busy_s * steps / wall_s) if wall_s > 0 else None,
        "categories": {
            cat: {
                "s_per_step": s / 1e6 / steps,
                "share_of_kernels": s / 1e6 / steps / kernel_s if kernel_s else 0.0,
                "kernels_per_step": count[cat] / steps,
            }
            for cat, s in sorted(per_cat.items(), key=lambda kv: -kv[1])
        },
        "idle_gaps": idle_gaps(kernels, steps),
        "top": [
            {
                "name": name[:160],
                "category": category(name),
                "ms_per_step": s / 1e3 / steps,
                "calls_per_step": calls[name] / steps,
            }
            for name, s in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
        ],
    }


def idle_gaps(kernels: list[Kernel], steps: int, top: int = 12) -> list[dict[str, Any]]:
    """Where the device waits inside the window: each gap between the end of the work so far and
    the next kernel's start, summed by the pair of kernels around it (the host launching too
    slowly there: a sync, Python between kernels, a graph break)."""
    by_pair: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    end, last = float("-inf"), ""
    for name, a, b, _ in sorted(kernels, key=lambda k: k[1]):
        if last and a > end:
            pair = by_pair[f"{last[:70]} -> {name[:70]}"]
            pair[0] += a - end
            pair[1] += 1
        if b > end:
            end, last = b, name
    return [
        {"between": pair, "ms_per_step": us / 1e3 / steps, "gaps_per_step": n / steps}
        for pair, (us, n) in sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:top]
    ]


def device_kernels(events: Any, device: Any) -> list[Kernel]:
    """The kernels among a profile's events: those on `device`'s timeline that are not a range
    the code named. Such a range (Optimizer.step#AdamW.step) shows on the device's timeline too,
    over the kernels it launched (torch marks it is_user_annotation): counted, it doubled the
    optimizer's 3.7 ms a step on an H100 (2026-12-06). A torch too old to mark it would count it
    again: bench/step_tax.py runs with the GPU machine's torch (2.11)."""
    return [
        (e.name, float(e.time_range.start), float(e.time_range.end), 1)
        for e in events
        if e.device_type == device and not getattr(e, "is_user_annotation", False)
    ]


# The categories whose kernels `origins` traces back to the code that launched them.
TRACED = ("copy", "matmul", "elementwise (aten)", "other")
# Frames of these files say where in the model a kernel came from; torch's own frames do not.
_OWN_FRAMES = ("unsloth", "transformers/", "peft/", "engine/", "trl/", "bitsandbytes/")


def _caller(stack: list[str]) -> str:
    for frame in stack:
        if any(f in frame for f in _OWN_FRAMES):
            return frame.split("site-packages/")[-1].split("site2/")[-1][-90:]
    return ""


def origins(events: Any, steps: int, top: int = 12) -> dict[str, list[dict[str, Any]]]:
    """The device time of each TRACED category's kernels per step, by where they were launched:
    the aten op and its callers (autograd nodes in the backward), its input shapes and the first
    frame outside torch (a recorded stack). Answers "which 448 copies a step, and why"."""
    acc: dict[tuple[str, str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        kernels = getattr(e, "kernels", None)
        if not kernels:
            continue
        chain, parent = [e.name], e.cpu_parent
        while parent is not None and len(chain) < 5:
            chain.append(parent.name)
            parent = parent.cpu_parent
        shapes = str(getattr(e, "input_shapes", "") or "")[:120]
        where = _caller(list(getattr(e, "stack", None) or []))
        for k in kernels:
            cat = category(k.name)
            if cat in TRACED:
                slot = acc[(cat, " < ".join(chain), shapes, where)]
                slot[0] += float(k.duration)
                slot[1] += 1
    steps = max(steps, 1)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (cat, chain, shapes, where), (us, n) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
        if len(out[cat]) < top:
            out[cat].append(
                {
                    "ms_per_step": us / 1e3 / steps,
                    "calls_per_step": n / steps,
                    "ops": chain[:200],
                    "shapes": shapes,
                    "caller": where,
                }
            )
    return dict(out)


def profile_kernels(
    trainer: Any, run_round: Any, cuda: bool, top: int = 25, trace_origins: bool = False
) -> dict[str, Any]:
    """One round of `trainer` (run through `run_round(trainer)`) with the profiler on from the end
    of step 2 to the end of the last step; the summary of what ran on the device meanwhile.
    `trace_origins` records shapes and stacks too (slower steps: the timings are then only
    indicative) and adds where each TRACED category's kernels came from."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, record_shapes=trace_origins, with_stack=trace_origins)
    window: dict[str, float] = {}

    def mark() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class Window(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 2:
                prof.start()
                window["start"], window["step"] = mark(), state.global_step
            elif state.global_step == state.max_steps and "start" in window:
                window["wall"] = mark() - window["start"]
                window["steps"] = state.global_step - window["step"]
                prof.stop()

    hook = Window()
    trainer.add_callback(hook)
    try:
        run_round(trainer)
    finally:
        trainer.remove_callback(hook)
        if "start" in window and "wall" not in window:
            prof.stop()  # the round ended early (an error): the profiler does not outlive it
    if "wall" not in window:
        raise RuntimeError("the kernel round needs at least 3 steps")
    events = prof.events()
    if cuda:
        kernels = device_kernels(events, DeviceType.CUDA)
    else:
        # The CPU has no kernels: each op's own time over its calls, laid end to end (ops run one
        # at a time).
        kernels, t = [], 0.0
        for e in prof.key_averages():
            own = float(e.self_cpu_time_total)
            if own > 0:
                kernels.append((e.key, t, t + own, int(e.count)))
                t += own
    report = summarise(kernels, int(window["steps"]), window["wall"], top)
    report["device"] = "cuda" if cuda else "cpu"
    if cuda:
        # The optimizer's range on the device's timeline: from its first kernel to its last, so
        # its span against its kernels' time is the device's idle time inside the optimizer step.
        # Their union: a step wrapped twice by torch's hooks shows two nested ranges.
        spans = [
            (float(e.time_range.start), float(e.time_range.end))
            for e in events
            if e.device_type == DeviceType.CUDA and e.name.startswith("Optimizer.step#")
        ]
        report["optimizer_span_ms_per_step"] = union_us(spans) / 1e3 / max(int(window["steps"]), 1)
    if trace_origins:
        report["origins"] = origins(events, int(window["steps"]))
    return report


def print_summary(report: dict[str, Any]) -> None:
    idle = report["idle_share"]
    timed = report.get("timed_step_s")
    print(
        f"kernels: {report['wall_s_per_step'] * 1e3:.1f} ms/step wall under the profiler"
        + (f" ({timed * 1e3:.1f} in the timed rounds)" if timed else "")
        + f", device busy {report['busy_s_per_step'] * 1e3:.1f} ms"
        + ("" if idle is None else f" ({100 * idle:.1f}% idle)")
    )
    if "optimizer_span_ms_per_step" in report:
        print(f"  the optimizer step spans {report['optimizer_span_ms_per_step']:.1f} ms/step on the device")
    for cat, c in report["categories"].items():
        print(
            f"  {cat:<22} {c['s_per_step'] * 1e3:9.1f} ms/step  {100 * c['share_of_kernels']:5.1f}%"
            f"  {c['kernels_per_step']:7.0f} kernels/step"
        )
    for k in report["top"][:12]:
        print(
            f"    {k['ms_per_step']:8.2f} ms x{k['calls_per_step']:5.0f}  [{k['category']}] {k['name'][:90]}"
        )
    for gap in report.get("idle_gaps", [])[:6]:
        print(f"    idle {gap['ms_per_step']:6.2f} ms x{gap['gaps_per_step']:5.0f}  {gap['between'][:120]}")
    for cat, rows in report.get("origins", {}).items():
        print(f"  where the {cat} kernels came from:")
        for r in rows[:8]:
            print(f"    {r['ms_per_step']:8.2f} ms x{r['calls_per_step']:5.0f}  {r['ops'][:110]}")
            print(f"        {r['shapes'][:100]}  {r['caller']}")
