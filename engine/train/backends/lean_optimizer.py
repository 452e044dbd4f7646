"""bitsandbytes' 8-bit optimizers, stepped with less host time per parameter: the same updates.

A LoRA run has hundreds of adapter tensors (448 on Llama-3.1-8B with all seven projections), and
bitsandbytes updates each with one small kernel, launched from Python. Per parameter its step
(`Optimizer8bit.step` -> `Optimizer2State.update_step`) builds the parameter's config, re-assigns
`p.data` and `p.grad` to contiguous copies of themselves, checks every tensor's device, goes through
the torch.ops dispatcher to reach the kernel, and then calls `torch.cuda.synchronize()`
(`sync_gpu(p)`, for its paged state). The host waits for each kernel before it starts the next
parameter's Python, so the device idles in between: on an H100 the 8B's optimizer step spanned
42 ms for 3.7 ms of kernels (docs/backends.md, "Where that step's time goes").

The lean step keeps bitsandbytes' loop (state initialisation, paged prefetches, its bookkeeping)
and changes two things, neither of which changes a result:
- No wait per parameter. Every update kernel runs on the same stream, in launch order, and nothing
  on the host reads a parameter or a state between them. A paged optimizer's step keeps its last
  synchronisation, the one paged state needs before the host may touch it.
- The 8-bit update of a contiguous parameter goes straight to the kernel bitsandbytes registered
  for its device (the function torch.ops would dispatch to), with the arguments
  `Optimizer2State.update_step` passes. Anything else (32-bit state for small tensors, per-parameter
  config overrides, a non-contiguous tensor, an optimizer with its own update_step) takes
  bitsandbytes' own update_step.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any

# The registered kernel's parameters, as bitsandbytes 0.50 names them; a kernel whose signature
# differs is not called directly.
_KERNEL_PARAMETERS = (
    "optimizer_name", "g", "p", "state1", "state2", "beta1", "beta2", "beta3", "alpha", "eps", "step",
    "lr", "qmap1", "qmap2", "absmax1", "absmax2", "weight_decay", "gnorm_scale", "skip_zeros",
)  # fmt: skip


@functools.cache
def _kernels() -> dict[str, Any]:
    """bitsandbytes' 8-bit blockwise update kernel per device type, where its signature is known."""
    found: dict[str, Any] = {}
    for device, module, name in (
        ("cuda", "bitsandbytes.backends.cuda.ops", "_optimizer_update_8bit_blockwise_impl"),
        ("cpu", "bitsandbytes.backends.cpu.ops", "_optimizer_update_8bit_blockwise_cpu"),
    ):
        try:
            kernel = getattr(__import__(module, fromlist=[name]), name)
            if tuple(inspect.signature(kernel).parameters) == _KERNEL_PARAMETERS:
                found[device] = kernel
        except Exception:  # a build without this backend (a CPU-only library has no CUDA kernels)
            continue
    return found


def _no_sync(_: Any) -> None:
    """bitsandbytes' per-parameter `sync_gpu`, skipped (the step's last one is kept)."""


# bitsandbytes' sync_gpu is a module global: steps on several threads (or one inside another)
# take turns, and only the outermost puts the real function back.
_swap_lock = threading.RLock()
_swap_depth = 0
_swapped_out: Any = None


@functools.cache
def _lean(cls: type) -> type:
    """`cls` with the lean step. A subclass rather than an instance attribute: torch's LR scheduler
    wraps `optimizer.step.__func__`, and the class's own step, which super() reaches, carries
    torch's step hooks and profiler range (so the lean step says it is hooked: torch would wrap it
    a second time when a state dict loads, and run every step hook twice)."""
    import bitsandbytes.optim.optimizer as bnb_optimizer
    import torch

    def step(self: Any, closure: Any = None) -> Any:
        global _swap_depth, _swapped_out
        with _swap_lock:
            if _swap_depth == 0:
                _swapped_out, bnb_optimizer.sync_gpu = bnb_optimizer.sync_gpu, _no_sync
            sync = _swapped_out
            _swap_depth += 1
            try:
                loss = super(lean, self).step(closure)
            finally:
                _swap_depth -= 1
                if _swap_depth == 0:
                    bnb_optimizer.sync_gpu, _swapped_out = _swapped_out, None
        if self.is_paged:  # the step's own last synchronisation, for paged state (as bitsandbytes does)
            last = next((p for g in reversed(self.param_groups) for p in reversed(g["params"])), None)
            if last is not None:
                sync(last)
        return loss

    step.hooked = True  # type: ignore[attr-defined]

    def update_step(self: Any, group: dict[str, Any], p: Any, gindex: int, pindex: int) -> None:
        state, kernel = self.state[p], _kernels().get(p.device.type)
        if (
            kernel is None
            or state["state1"].dtype != torch.uint8
            or not (p.is_contiguous() and p.grad.is_contiguous())
            or self.mng.index2config
            or self.mng.pid2config
        ):
            return super(lean, self).update_step(group, p, gindex, pindex)
        betas = group["betas"]
        state["step"] += 1
        kernel(
            self.optimizer_name,
            p.grad,
            p,
            state["state1"],
            state["state2"],
            betas[0],
            betas[1],
            betas[2] if len(betas) >= 3 else 0.0,
            group.get("alpha", 0.0),
            group["eps"],
            state["step"],
            group["lr"],
            state["qmap1"],
            state["qmap2"],
            state["absmax1"],
            state["absmax2"],
            group["weight_decay"],
            1.0,
            self.args.skip_zeros,
        )
        return None

    members: dict[str, Any] = {"step": step, "__module__": cls.__module__, "qlc_lean": True}
    if getattr(cls, "update_step", None) is bnb_optimizer.Optimizer2State.update_step:
        # Only where the class updates as Optimizer2State does: AdEMAMix schedules its alpha and
        # beta3 in its own update_step, and one-state optimizers (Lion, momentum) have theirs.
        members["update_step"] = update_step
    lean = type(cls.__name__, (cls,), members)
    return lean


def lean_bnb_step(optimizer: Any) -> bool:
    """Give a bitsandbytes 8-bit optimizer the lean step. False (and nothing changed) for any other
    optimizer, off CUDA (no device to wait for), or where this bitsandbytes no longer has what
    the lean step relies on."""
    try:
        import bitsandbytes.optim.optimizer as bnb_optimizer
    except ImportError:
        return False
    if not isinstance(optimizer, bnb_optimizer.Optimizer8bit) or getattr(optimizer, "qlc_lean", False):
        return False
    if not callable(getattr(bnb_optimizer, "sync_gpu", None)):
        return False
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or any(p.device.type != "cuda" for p in params):
        return False
    if any(type(p.data) is not torch.Tensor for p in params):
        return False  # a tensor subclass (a sharded DTensor): bitsandbytes' own path decides

    optimizer.__class__ = _lean(type(optimizer))
    return True
