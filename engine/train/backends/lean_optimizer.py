"""bitsandbytes' 8-bit optimizers, stepped with less host time per parameter: the same updates.

A LoRA run has hundreds of adapter tensors (448 on Llama-3.1-8B with all seven projections), and
bitsandbytes updates each with one small kernel, launched from Python. Per parameter its step
(`Optimizer8bit.step` -> `Optimizer2State.update_step`) builds the parameter's config, re-assigns
`p.data` and `p.grad` to contiguous copies of themselves, checks every tensor's device, goes through
the torch.ops dispatcher to reach the kernel, and then calls `torch.cuda.synchronize()`
(`sync_gpu(p)`, for its paged state). The host waits for each kernel before it starts the next
parameter's Python, so the device idles in between: on an H100 the 8B's optimizer step spanned
42 ms for 3.7 ms of kernels (docs/backends.md, "Where that step's time goes").

The lean step keeps bitsandbytes' loop (state initialisation, paged prefetches for the tensors
it updates itself, its bookkeeping) and changes what follows, none of which changes a result:
- No wait per parameter. Every update kernel runs on the same stream, in launch order, and nothing
  on the host reads a parameter or a state between them. A paged optimizer's step keeps its last
  synchronisation, the one paged state needs before the host may touch it.
- The 8-bit update of a contiguous parameter goes straight to the kernel bitsandbytes registered
  for its device (the function torch.ops would dispatch to), with the arguments
  `Optimizer2State.update_step` passes. Anything else (32-bit state for small tensors, per-parameter
  config overrides, a non-contiguous tensor, an optimizer with its own update_step) takes
  bitsandbytes' own update_step.
- One launch for many tensors (`_Slab`). The 8-bit blockwise update treats each block of 256
  elements on its own: its state's absmax is per block, and nothing else in it spans a tensor
  (bitsandbytes' 8-bit AdamW has no per-tensor norm: gnorm_scale is 1, max_unorm unused). So
  tensors whose sizes are multiples of 256 give, laid end to end, the same blocks as one by one.
  Their states live end to end in one buffer per slab (each parameter's state entries are views
  of it, so checkpoints still hold bitsandbytes' per-parameter state), and a step gathers the
  slab's gradients and parameters into one tensor each, runs the kernel once, and copies the
  parameters back: a few launches for the 8B's 448 tensors, and no Python per tensor between
  kernels. The gathered copies are transient, at most `SLAB_ELEMENTS` elements each.
- The slabs launch together, when bitsandbytes' loop reaches its first tensor, and the loop skips
  their tensors' paged prefetches. bitsandbytes prefetches each parameter's two paged states before its update
  (`prefetch_state`, one cudaMemPrefetchAsync each); a slab's launch prefetches its whole buffers
  instead, so per tensor that was 896 driver calls a step on the 8B for nothing, run between the
  slabs' launches while the device waited (about 2 ms before each of 6 slabs on an H100).
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

from engine.memory import constants as C

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


BLOCK = C.BNB_8BIT_BLOCK  # bitsandbytes' 8-bit blockwise optimizer state: one absmax per block
# Elements a slab holds at most: its gathered gradients and parameters are transient copies of
# this size (the memory model counts them: engine.memory.terms.optimizer_step_temporaries).
SLAB_ELEMENTS = C.BNB_SLAB_ELEMENTS
_STATE_KEYS = ("state1", "state2", "absmax1", "absmax2")


@dataclass
class _Slab:
    """Parameters of one group, of one dtype and device, whose 8-bit states lie end to end: all of
    them in paged memory, or all in PyTorch's, as bitsandbytes would place each one's."""

    group: int
    group_ids: tuple[int, ...]  # the group's parameters when laid out (any change lays out again)
    paged: bool
    params: list[Any]
    offsets: list[int]  # each parameter's first element in the slab
    buffers: dict[str, Any] = field(default_factory=dict)  # _STATE_KEYS -> the slab's flat state
    views: list[tuple[Any, ...]] = field(default_factory=list)  # each parameter's state entries
    launched: int = -1  # the optimizer's step call that updated the slab in one launch
    tried: int = -1  # the step call that last tried to (a failed try falls back to one at a time)

    @property
    def elements(self) -> int:
        return self.offsets[-1] + self.params[-1].numel()

    def current(self, opt: Any) -> bool:
        """Whether the layout still holds: the same group, each parameter of the dtype, device and
        layout it was laid out with, and its state still this slab's (a loaded state dict replaces
        it)."""
        groups = opt.param_groups
        if self.group >= len(groups) or tuple(map(id, groups[self.group]["params"])) != self.group_ids:
            return False  # a parameter taken out, added or moved
        dtype, device = self.params[0].dtype, self.params[0].device
        if any(p.dtype != dtype or p.device != device or not p.is_contiguous() for p in self.params):
            return False
        return self.installed(opt.state)

    def installed(self, state: Any) -> bool:
        """Whether each parameter's state is still this slab's."""
        for p, views in zip(self.params, self.views, strict=True):
            own = state[p]
            if not all(own.get(key) is view for key, view in zip(_STATE_KEYS, views, strict=True)):
                return False
        return True


def _flat_ok(opt: Any) -> bool:
    """Whether this optimizer's 8-bit updates may run in slabs: no per-parameter config overrides,
    8-bit state, no update-norm clipping (the one quantity that would span a tensor)."""
    args = opt.args
    return (
        not opt.mng.index2config
        and not opt.mng.pid2config
        and getattr(args, "optim_bits", 32) == 8
        and not getattr(args, "max_unorm", 0.0)
    )


def _slab_ready(opt: Any, p: Any) -> bool:
    """Whether `p` can lie in a slab: an 8-bit state (as bitsandbytes would give it, or as it
    already has), whole blocks of 256 elements, and a kernel for its device."""
    import torch

    n = p.numel()
    if n < opt.args.min_8bit_size or n % BLOCK or not p.is_contiguous() or p.device.type not in _kernels():
        return False
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    state = opt.state.get(p)
    if not state:
        return True
    s1, a1 = state.get("state1"), state.get("absmax1")
    return (
        s1 is not None and s1.dtype == torch.uint8 and s1.numel() == n
        and a1 is not None and a1.numel() == n // BLOCK and "state2" in state and "absmax2" in state
    )  # fmt: skip


def _paged(opt: Any, p: Any) -> bool:
    """Where bitsandbytes puts `p`'s state: paged (managed) memory for a paged optimizer's tensors
    of 1e5 elements or more on CUDA (`get_state_buffer`), else PyTorch's allocator."""
    return bool(opt.is_paged) and p.device.type == "cuda" and p.numel() >= C.BNB_PAGED_MIN_NUMEL


def _state_buffer(opt: Any, n: int, device: Any, paged: bool) -> Any:
    """A slab's 8-bit state, zeroed, in paged memory or in PyTorch's."""
    import torch

    if paged:
        import bitsandbytes.functional as F

        buffer = F.get_paged(n, dtype=torch.uint8, device=device)
        F.fill(buffer, 0)
        opt.page_mng.paged_tensors.append(buffer)
        return buffer
    return torch.zeros(n, dtype=torch.uint8, device=device)


def _lay_out(opt: Any) -> list[_Slab]:
    """Put every slab-ready parameter's state into slabs, carrying over a state it already has
    (bitsandbytes' or a loaded state dict's) and zeroing the others. Kept on the optimizer
    (`_qlc_slabs`)."""
    import torch

    # A second layout (a state dict loaded after the first step) has the same slabs: it keeps their
    # buffers, as paged memory is never given back.
    # Its launch markers too: a slab of the same tensors that launched in this step stays launched.
    kept = {tuple(map(id, slab.params)): slab for slab in getattr(opt, "_qlc_slabs", None) or []}
    slabs: list[_Slab] = []
    for gindex, group in enumerate(opt.param_groups):
        # One slab filling per kind (dtype, device, paged or not), in the group's order: a tensor
        # of another kind, or one left out, does not close it.
        filling: dict[tuple[Any, ...], _Slab] = {}
        group_ids = tuple(map(id, group["params"]))
        for p in group["params"]:
            if not _slab_ready(opt, p):
                continue
            kind = (p.dtype, p.device, _paged(opt, p))
            slab = filling.get(kind)
            if slab is None or slab.elements + p.numel() > SLAB_ELEMENTS:
                slab = filling[kind] = _Slab(gindex, group_ids, kind[2], [], [])
                slabs.append(slab)
            slab.offsets.append(slab.elements if slab.params else 0)
            slab.params.append(p)
    if slabs and "dynamic" not in opt.name2qmap:
        opt.fill_qmap()
    for slab in slabs:
        n, device = slab.elements, slab.params[0].device
        qmap1 = opt.name2qmap["dynamic"] = opt.name2qmap["dynamic"].to(device)
        qmap2 = opt.name2qmap["udynamic"] = opt.name2qmap["udynamic"].to(device)
        before = kept.get(tuple(map(id, slab.params)))
        if before is not None:
            slab.tried, slab.launched = before.tried, before.launched
        buffers = (before.buffers if before is not None else None) or {
            "state1": _state_buffer(opt, n, device, slab.paged),
            "state2": _state_buffer(opt, n, device, slab.paged),
            "absmax1": torch.zeros(n // BLOCK, dtype=torch.float32, device=device),
            "absmax2": torch.zeros(n // BLOCK, dtype=torch.float32, device=device),
        }
        for p, start in zip(slab.params, slab.offsets, strict=True):
            end = start + p.numel()
            views = (
                buffers["state1"][start:end].view_as(p),
                buffers["state2"][start:end].view_as(p),
                buffers["absmax1"][start // BLOCK : end // BLOCK],
                buffers["absmax2"][start // BLOCK : end // BLOCK],
            )
            if slab.paged:
                # bitsandbytes' own update (a tensor that leaves the slab for a step) accepts a
                # CPU-side tensor on a CUDA step only when it says it is paged.
                for view in views[:2]:
                    view.is_paged, view.page_deviceid = True, device.index
            state = opt.state[p]
            if state:  # carried over: the same bytes, now in the slab
                for key, view in zip(_STATE_KEYS, views, strict=True):
                    view.copy_(state[key].reshape(view.shape))
            else:  # a fresh state, as bitsandbytes starts one: zeros (kept buffers held others)
                for view in views:
                    view.zero_()
                state["step"] = 0
            state.update(zip(_STATE_KEYS, views, strict=True))
            state["qmap1"], state["qmap2"] = qmap1, qmap2
            slab.views.append(views)
        slab.buffers = buffers
    opt._qlc_slabs = slabs
    opt._qlc_slab_of = {id(p): slab for slab in slabs for p in slab.params}
    return slabs


def _update(
    opt: Any, group: dict[str, Any], kernel: Any, g: Any, p: Any, state: dict[str, Any], step: int
) -> None:
    """One call of bitsandbytes' 8-bit blockwise update kernel, with the arguments
    `Optimizer2State.update_step` passes it (`state`: the 8-bit states, absmaxes and qmaps)."""
    betas = group["betas"]
    kernel(
        opt.optimizer_name,
        g,
        p,
        state["state1"],
        state["state2"],
        betas[0],
        betas[1],
        betas[2] if len(betas) >= 3 else 0.0,
        group.get("alpha", 0.0),
        group["eps"],
        step,
        group["lr"],
        state["qmap1"],
        state["qmap2"],
        state["absmax1"],
        state["absmax2"],
        group["weight_decay"],
        1.0,
        opt.args.skip_zeros,
    )


def _launch(opt: Any, slab: _Slab) -> bool:
    """One kernel call for the whole slab, with the arguments update_step passes each tensor; False
    (nothing done) where a tensor has no gradient or the tensors' step counts differ."""
    import torch

    params, state = slab.params, opt.state
    step = state[params[0]]["step"]
    for p in params:
        g = p.grad
        if g is None or g.dtype != p.dtype or state[p]["step"] != step:
            return False
    buffers = slab.buffers
    for key in ("state1", "state2"):
        if getattr(buffers[key], "is_paged", False):
            import bitsandbytes.functional as F

            F.prefetch_tensor(buffers[key])
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    weights = torch.cat([p.detach().reshape(-1) for p in params])
    step += 1
    first = state[params[0]]
    flat = {**buffers, "qmap1": first["qmap1"], "qmap2": first["qmap2"]}
    _update(opt, opt.param_groups[slab.group], _kernels()[params[0].device.type], grads, weights, flat, step)
    torch._foreach_copy_(
        [p.detach() for p in params],
        [
            weights[start : start + p.numel()].view_as(p)
            for p, start in zip(params, slab.offsets, strict=True)
        ],
    )
    for p in params:
        state[p]["step"] = step
    return True


def _call(opt: Any) -> int:
    """The marker number of the step call under way (0 outside a step)."""
    return getattr(opt, "_qlc_calls", 0)


def _try(opt: Any, slab: _Slab) -> None:
    """Launch `slab` in this step call, once: a failed try (a tensor without a gradient, step
    counts that differ) leaves its tensors to bitsandbytes' loop, one at a time."""
    calls = _call(opt)
    slab.tried = calls
    slab.launched = calls if _launch(opt, slab) else -1


def _launch_slabs(opt: Any) -> None:
    """Every slab launched at once, when bitsandbytes' loop reaches its first tensor, so that the
    loop's Python for the slabs' tensors runs while the device updates them. All or none: where
    any layout no longer holds (a state dict loaded, a group changed), the loop lays out again at
    a slab's first tensor and launches from there, as it would without this."""
    calls = _call(opt)
    if getattr(opt, "_qlc_all_tried", -1) == calls:
        return
    opt._qlc_all_tried = calls
    slabs = getattr(opt, "_qlc_slabs", None)
    if slabs and _flat_ok(opt) and all(slab.current(opt) for slab in slabs):
        for slab in slabs:
            _try(opt, slab)


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
            # Which step call a slab launched in: a number of its own for each call, never reused,
            # so that a step inside another's closure leaves the outer one's markers apart.
            self._qlc_seq = getattr(self, "_qlc_seq", 0) + 1
            outer, self._qlc_calls = _call(self), self._qlc_seq
            try:
                loss = super(lean, self).step(closure)
            finally:
                self._qlc_calls = outer
                _swap_depth -= 1
                if _swap_depth == 0:
                    bnb_optimizer.sync_gpu, _swapped_out = _swapped_out, None
        if self.is_paged:  # the step's own last synchronisation, for paged state (as bitsandbytes does)
            last = next((p for g in reversed(self.param_groups) for p in reversed(g["params"])), None)
            if last is not None:
                sync(last)
        return loss

    step.hooked = True  # type: ignore[attr-defined]

    def init_state(self: Any, group: dict[str, Any], p: Any, gindex: int, pindex: int) -> None:
        # The first parameter bitsandbytes initialises lays out every slab (their states, zeroed
        # as bitsandbytes zeroes them); a parameter outside the slabs gets bitsandbytes' own.
        if getattr(self, "_qlc_slabs", None) is None and _flat_ok(self):
            _lay_out(self)
        if not self.state[p]:
            super(lean, self).init_state(group, p, gindex, pindex)

    def slab_updated(self: Any, p: Any) -> bool:
        """Whether `p` was updated by its slab's one launch in this step (launched at the slab's
        first parameter, which bitsandbytes' loop reaches first)."""
        if not _flat_ok(self):
            return False
        if getattr(self, "_qlc_slabs", None) is None:
            _lay_out(self)  # states loaded from a checkpoint before the first step
        slab = self._qlc_slab_of.get(id(p))
        if slab is None:
            return False
        calls = _call(self)
        if p is slab.params[0] and slab.tried != calls:  # not launched with the others
            if not slab.current(self):  # a state dict loaded, a group changed...: lay out again
                _lay_out(self)
                # In the new layout `p` may lie elsewhere, or nowhere; a slab whose tensors were
                # updated apart in this step does not launch (their step counts differ), nor does
                # one a launch of this step already updated (its markers carry over).
                slab = self._qlc_slab_of.get(id(p))
                if slab is None or p is not slab.params[0]:
                    return False
            if slab.tried != calls:
                _try(self, slab)
        return slab.launched == calls

    def prefetch_state(self: Any, p: Any) -> None:
        # bitsandbytes' loop calls this first for each tensor it updates: at the first one, inside
        # its step (after torch's step hooks, under no_grad), every slab launches.
        _launch_slabs(self)
        # A tensor its slab updated: the launch prefetched the slab's whole buffers first.
        slab = getattr(self, "_qlc_slab_of", {}).get(id(p))
        if slab is None or slab.launched != _call(self):
            super(lean, self).prefetch_state(p)

    def update_step(self: Any, group: dict[str, Any], p: Any, gindex: int, pindex: int) -> None:
        if slab_updated(self, p):
            return None
        state, kernel = self.state[p], _kernels().get(p.device.type)
        if (
            kernel is None
            or state["state1"].dtype != torch.uint8
            or not (p.is_contiguous() and p.grad.is_contiguous())
            or self.mng.index2config
            or self.mng.pid2config
        ):
            return super(lean, self).update_step(group, p, gindex, pindex)
        state["step"] += 1
        _update(self, group, kernel, p.grad, p, state, state["step"])
        return None

    members: dict[str, Any] = {"step": step, "__module__": cls.__module__, "qlc_lean": True}
    if getattr(cls, "update_step", None) is bnb_optimizer.Optimizer2State.update_step:
        # Only where the class updates as Optimizer2State does: AdEMAMix schedules its alpha and
        # beta3 in its own update_step, and one-state optimizers (Lion, momentum) have theirs.
        members["update_step"] = update_step
        members["init_state"] = init_state
        members["prefetch_state"] = prefetch_state
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


def lean_zero_grad(model: Any, optimizer: Any) -> bool:
    """`model.zero_grad()` over the optimizer's parameters instead of every parameter of the model.

    The Trainer clears the gradients after each optimizer step with `model.zero_grad()`, which walks
    every module: about 2,700 on Llama-3.1-8B with LoRA on all seven projections, 2-3 ms of host
    time a step after the optimizer's last synchronisation, with nothing queued on the device. Only
    the trainable parameters ever get a gradient, and the optimizer holds all of them, so clearing
    its parameters' gradients does the same. Installed on this model object only (a method bound to
    it: a deep copy gets the module's own walk), and only where the two sets are equal (False,
    nothing changed, otherwise); `set_to_none=False` keeps the walk. `drop_lean_zero_grad` takes
    it off again."""
    import types
    import weakref

    own = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not own or {id(p) for p in own} != {id(p) for p in trainable}:
        return False
    installed_on, of = weakref.ref(model), weakref.ref(optimizer)

    def zero_grad(self: Any, set_to_none: bool = True) -> None:
        opt = of()
        if not set_to_none or self is not installed_on() or opt is None:
            return type(self).zero_grad(self, set_to_none)
        for group in opt.param_groups:  # read each call: a group added later is cleared too
            for p in group["params"]:
                p.grad = None
        return None

    model.zero_grad = types.MethodType(zero_grad, model)
    return True


def drop_lean_zero_grad(model: Any) -> None:
    """The module's own zero_grad back (the lean one is a local function, which no pickle takes)."""
    if "zero_grad" in vars(model):
        del model.zero_grad
