"""bitsandbytes' 8-bit optimizers with the lean step: the same updates, bit for bit, without a
wait per parameter.

On the CPU the lean step calls bitsandbytes' CPU kernel the way it calls the CUDA one on a GPU;
the per-parameter waits only exist on CUDA, so bitsandbytes' `sync_gpu` is stood in for to count
them. Both optimizers run the real 8-bit blockwise AdamW on the same parameters and gradients."""

from __future__ import annotations

import io
import warnings
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from engine.train.backends import lean_optimizer
from engine.train.backends.lean_optimizer import _kernels, _lean, _no_sync, lean_bnb_step, lean_zero_grad


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # bitsandbytes keeps tensors under 4,096 elements in 32-bit state (bitsandbytes' own update
    # for those); the rest are 8-bit, the lean path's.
    shapes = [(64, 128), (128, 64), (32, 256), (256, 32), (16, 16)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _train(params: list[torch.nn.Parameter], lean: bool, cls: type = bnb.optim.PagedAdamW8bit) -> Any:
    opt = cls(params, lr=1e-2, weight_decay=0.01)
    if lean:
        opt.__class__ = _lean(type(opt))
    # Built after the swap, as the Trainer builds it after create_optimizer: torch's scheduler wraps
    # the step it finds, and warns if it never sees that step called.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.1 * s)
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt


# Lion (one state) and AdEMAMix (its own update_step, which schedules alpha and beta3) keep
# bitsandbytes' own update; the AdamWs take the lean one.
OWN_UPDATE = (bnb.optim.Lion8bit, bnb.optim.AdEMAMix8bit)


@pytest.mark.parametrize(
    "cls", [bnb.optim.PagedAdamW8bit, bnb.optim.AdamW8bit, bnb.optim.Lion8bit, bnb.optim.AdEMAMix8bit]
)
def test_the_same_updates_without_the_waits_per_parameter(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    waits: list[int] = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: waits.append(1))
    kernel = _kernels()["cpu"]
    calls: list[int] = []
    monkeypatch.setitem(_kernels(), "cpu", lambda *a: (calls.append(1), kernel(*a))[1])
    plain, lean = _params(0), _params(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the scheduler's "step order" warning included
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        _train(plain, lean=False, cls=cls)
        paged = cls is bnb.optim.PagedAdamW8bit
        # bitsandbytes: one per parameter, and a paged optimizer's one at the end of the step
        assert len(waits) == 5 * (len(plain) + paged)
        waits.clear()
        opt = _train(lean, lean=True, cls=cls)
    assert len(waits) == 5 * paged  # only the paged optimizer's last one
    for a, b in zip(plain, lean, strict=True):
        assert torch.equal(a, b)
        assert opt.state[b]["step"] == 5
    # The four 8-bit tensors (8,192 elements each) went to the kernel in one launch a step, as one
    # slab; the small one took bitsandbytes' 32-bit path.
    assert len(calls) == (0 if cls in OWN_UPDATE else 5)
    assert type(opt).__name__ == cls.__name__ and isinstance(opt, cls)
    assert bnb_optimizer.sync_gpu is not _no_sync  # bitsandbytes' own again after each step


@pytest.mark.parametrize("lean_first", [True, False])
def test_a_state_dict_loads_across_the_two(monkeypatch: pytest.MonkeyPatch, lean_first: bool) -> None:
    """A checkpoint written by either resumes in the other (the state is bitsandbytes' own)."""
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        first = _params(3)
        written = _train(first, lean=lean_first)
        second = [torch.nn.Parameter(p.detach().clone()) for p in first]
        resumed = bnb.optim.PagedAdamW8bit(second, lr=1e-2, weight_decay=0.01)
        if not lean_first:
            resumed.__class__ = _lean(type(resumed))
        resumed.load_state_dict(written.state_dict())
        for a, b in zip(first, second, strict=True):
            a.grad = b.grad = torch.ones_like(a)
        written.step()
        resumed.step()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_step_hooks_run_once_under_accelerate() -> None:
    """accelerate loads the optimizer's state dict as it wraps it, and torch then patches the
    class's step with its hooks unless the step says it has them: they would run twice a step."""
    from accelerate import Accelerator

    params = _params(4)
    opt = bnb.optim.AdamW8bit(params)
    opt.__class__ = _lean(type(opt))
    wrapped = Accelerator(cpu=True).prepare(opt)
    calls: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *a: calls.append(1))
    try:
        for p in params:
            p.grad = torch.ones_like(p)
        wrapped.step()
    finally:
        handle.remove()
    assert calls == [1]


def test_a_step_inside_a_step_restores_the_wait_once(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[str] = []

    def sync(t: Any) -> None:
        waits.append("wait")

    monkeypatch.setattr(bnb_optimizer, "sync_gpu", sync)
    outer_params, inner_params = _params(5), _params(6)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        outer = bnb.optim.PagedAdamW8bit(outer_params)
        inner = bnb.optim.PagedAdamW8bit(inner_params)
        for opt in (outer, inner):
            opt.__class__ = _lean(type(opt))
        for p in outer_params + inner_params:
            p.grad = torch.ones_like(p)
        outer.step(lambda: inner.step())  # the closure runs inside the outer step
    assert bnb_optimizer.sync_gpu is sync
    assert waits == ["wait", "wait"]  # each paged step's last one, through the real function


def test_a_step_of_the_same_optimizer_inside_its_own_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closure that steps the optimizer it was given to: the inner step updates every tensor,
    then the outer one updates every tensor again, slabs included, as bitsandbytes does."""
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: None)
    monkeypatch.setattr(lean_optimizer, "SLAB_ELEMENTS", 16_384)

    def run(lean: bool) -> tuple[list[torch.nn.Parameter], Any]:
        params = _mixed(9, torch.float32)
        opt = bnb.optim.AdamW8bit(params, lr=1e-2)
        if lean:
            opt.__class__ = _lean(type(opt))
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (step + 1))
            opt.step(lambda: opt.step()) if step else opt.step()
        return params, opt

    (plain, a_opt), (lean, b_opt) = run(False), run(True)
    for a, b in zip(plain, lean, strict=True):
        assert torch.equal(a, b)
        assert a_opt.state[a]["step"] == b_opt.state[b]["step"] == 5


def test_the_wait_is_restored_when_a_step_fails() -> None:
    sync = bnb_optimizer.sync_gpu
    opt = bnb.optim.AdamW8bit(_params(1))
    opt.__class__ = _lean(type(opt))

    def closure() -> None:
        raise ValueError("the loss failed")

    with pytest.raises(ValueError, match="the loss failed"):
        opt.step(closure)
    assert bnb_optimizer.sync_gpu is sync


def test_only_8bit_optimizers_on_cuda_change() -> None:
    params = _params(2)
    assert not lean_bnb_step(torch.optim.AdamW(params))
    cpu = bnb.optim.AdamW8bit(params)
    assert not lean_bnb_step(cpu)  # no device to wait for on the CPU
    assert type(cpu) is bnb.optim.AdamW8bit


def _mixed(seed: int, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Adapter-like tensors (whole blocks of 256), one 8-bit tensor that is not (6,500 elements:
    bitsandbytes' own per-tensor update), and one small enough for 32-bit state."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 512), (512, 16), (65, 100), (16, 1024), (1024, 16), (8, 8), (32, 256)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slabs_give_the_updates_of_one_tensor_at_a_time(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Several slabs (a small SLAB_ELEMENTS), tensors outside them, a step where one tensor has no
    gradient (its slab falls back to one tensor at a time from then on): every parameter and state
    as bitsandbytes' own step leaves them."""
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: None)
    monkeypatch.setattr(lean_optimizer, "SLAB_ELEMENTS", 16_384)
    kernel = _kernels()["cpu"]
    calls: list[int] = []
    monkeypatch.setitem(_kernels(), "cpu", lambda *a: (calls.append(a[1].numel()), kernel(*a))[1])
    prefetched: list[int] = []
    prefetch = bnb_optimizer.Optimizer8bit.prefetch_state
    monkeypatch.setattr(
        bnb_optimizer.Optimizer8bit,
        "prefetch_state",
        lambda opt, p: (prefetched.append(id(p)), prefetch(opt, p))[1],
    )

    def train(params: list[torch.nn.Parameter], lean: bool) -> Any:
        opt = bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.01)
        if lean:
            opt.__class__ = _lean(type(opt))
        g = torch.Generator().manual_seed(11)
        for step in range(6):
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=g).to(dtype)
                p.grad = None if (step == 3 and i == 1) else grad
            prefetched.clear()
            opt.step()
            prefetches.append(list(prefetched))
            opt.zero_grad()
        return opt

    prefetches: list[list[int]] = []
    plain, lean = _mixed(0, dtype), _mixed(0, dtype)
    a_opt, b_opt = train(plain, lean=False), train(lean, lean=True)
    for a, b in zip(plain, lean, strict=True):
        assert torch.equal(a, b)
        for key, value in a_opt.state[a].items():
            other = b_opt.state[b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    slabs = b_opt._qlc_slabs
    # (16, 512) + (512, 16) fill one slab; (65, 100) breaks the run; then (16, 1024) and (1024, 16),
    # one each (16,384 elements), and (32, 256) after the 32-bit (8, 8).
    assert [[tuple(p.shape) for p in slab.params] for slab in slabs] == [
        [(16, 512), (512, 16)], [(16, 1024)], [(1024, 16)], [(32, 256)],
    ]  # fmt: skip
    state1 = b_opt.state[lean[1]]["state1"]
    assert state1.untyped_storage().data_ptr() == slabs[0].buffers["state1"].untyped_storage().data_ptr()
    # Every slab launches when bitsandbytes' loop reaches its first tensor (the first step lays
    # them out there too), and the loop updates what is left: (65, 100) alone. (512, 16) had no
    # gradient in step 4: its slab's other tensor went alone, and as their step counts differ from
    # then on, both go one at a time.
    slabbed = [16_384, 16_384, 16_384, 8_192, 6_500]
    step4 = [16_384, 16_384, 8_192, 8_192, 6_500]
    apart = [16_384, 16_384, 8_192, 8_192, 8_192, 6_500]
    assert calls == slabbed * 3 + step4 + apart * 2
    # bitsandbytes' prefetch of a tensor's paged state, in the lean run's last four steps: only for
    # the tensors no slab updated (a slab's launch prefetches its whole buffers).
    alone = [id(lean[2]), id(lean[5])]  # (65, 100) and the 32-bit (8, 8)
    first_slab = [id(lean[0]), id(lean[1]), *alone]
    assert prefetches[-4:] == [alone, [id(lean[0]), *alone], first_slab, first_slab]


def test_a_state_dict_from_slabs_resumes_into_a_laid_out_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A state dict loaded into an optimizer that has already stepped in slabs replaces their
    state: the next step lays them out again (in the same buffers) and matches bitsandbytes."""
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: None)
    first, second, third = _mixed(5, torch.float32), _mixed(6, torch.float32), _mixed(5, torch.float32)
    written = bnb.optim.AdamW8bit(first, lr=1e-2)
    written.__class__ = _lean(type(written))
    busy = bnb.optim.AdamW8bit(second, lr=1e-2)
    busy.__class__ = _lean(type(busy))
    plain = bnb.optim.AdamW8bit(third, lr=1e-2)
    for opt, params in ((written, first), (busy, second), (plain, third)):
        for _ in range(2):
            for p in params:
                p.grad = torch.full_like(p, 0.5) if opt is not busy else torch.ones_like(p)
            opt.step()
    buffers = busy._qlc_slabs[0].buffers["state1"]
    with torch.no_grad():
        for dst, src in zip(second, first, strict=True):
            dst.copy_(src)
    # Through a file, as the Trainer saves and loads it: the states are views of the slabs.
    saved = io.BytesIO()
    torch.save(written.state_dict(), saved)
    saved.seek(0)
    busy.load_state_dict(torch.load(saved, weights_only=True))
    for opt, params in ((busy, second), (plain, third)):
        for p in params:
            p.grad = torch.full_like(p, -0.25)
        opt.step()
    for a, b in zip(third, second, strict=True):
        assert torch.equal(a, b)
    assert busy._qlc_slabs[0].buffers["state1"] is buffers


def test_a_state_dict_from_before_any_step_starts_the_slabs_from_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loaded into an optimizer that has stepped, a state dict without states (saved before any
    step: a reset) lays the slabs out again in their buffers, zeroed, as bitsandbytes starts."""
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: None)

    def run(lean: bool) -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(torch.full((16, 512), float(i + 1))) for i in range(3)]
        opt = bnb.optim.AdamW8bit(params, lr=1e-2)
        if lean:
            opt.__class__ = _lean(type(opt))
        empty = opt.state_dict()
        for step in range(4):
            if step == 3:
                opt.load_state_dict(empty)
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (step + 1))
            opt.step()
        return params

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


def test_a_group_added_after_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter group added after the first step (add_param_group) lays the slabs out again:
    every tensor updated once a step, as bitsandbytes updates it."""
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: None)

    def run(lean: bool) -> list[torch.nn.Parameter]:
        first, later = _mixed(7, torch.float32), _mixed(8, torch.float32)
        opt = bnb.optim.AdamW8bit(first, lr=1e-2, weight_decay=0.01)
        if lean:
            opt.__class__ = _lean(type(opt))
        g = torch.Generator().manual_seed(3)
        for step in range(4):
            if step == 2:
                opt.add_param_group({"params": later, "lr": 5e-3})
            for p in first + (later if step >= 2 else []):
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return first + later

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


def test_zero_grad_over_the_optimizers_parameters() -> None:
    """The model's zero_grad clears what the module's own walk clears, over the optimizer's
    parameters alone; installed only where those are all the trainable ones."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[0].requires_grad_(False)
    assert not lean_zero_grad(model, torch.optim.AdamW([model[1].weight]))  # the bias left out
    assert "zero_grad" not in vars(model)
    opt = torch.optim.AdamW(model[1].parameters())
    assert lean_zero_grad(model, opt)
    model(torch.randn(2, 8)).sum().backward()
    assert model[0].weight.grad is None and model[1].weight.grad is not None
    model.zero_grad(set_to_none=False)
    assert torch.equal(model[1].weight.grad, torch.zeros(8, 8))
    later = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [later]})
    later.grad = torch.ones(3)
    model.zero_grad()
    assert all(p.grad is None for p in [*model.parameters(), later])


def test_zero_grad_comes_off_and_a_copy_walks_its_own_modules() -> None:
    """A deep copy of the model clears its own gradients (the module's walk), and
    drop_lean_zero_grad gives the model back its own zero_grad, which pickles again."""
    import copy
    import pickle

    from engine.train.backends.lean_optimizer import drop_lean_zero_grad

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert lean_zero_grad(model, torch.optim.SGD(model.parameters(), lr=0.1))
    twin = copy.deepcopy(model)
    model(torch.randn(2, 4)).sum().backward()
    twin(torch.randn(2, 4)).sum().backward()
    twin.zero_grad()
    assert all(p.grad is None for p in twin.parameters())
    assert all(p.grad is not None for p in model.parameters())
    drop_lean_zero_grad(model)
    assert "zero_grad" not in vars(model)
    pickle.dumps(model)
