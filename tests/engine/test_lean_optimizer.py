"""bitsandbytes' 8-bit optimizers with the lean step: the same updates, bit for bit, without a
wait per parameter.

On the CPU the lean step calls bitsandbytes' CPU kernel the way it calls the CUDA one on a GPU;
the per-parameter waits only exist on CUDA, so bitsandbytes' `sync_gpu` is stood in for to count
them. Both optimizers run the real 8-bit blockwise AdamW on the same parameters and gradients."""

from __future__ import annotations

import warnings
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from engine.train.backends.lean_optimizer import _kernels, _lean, _no_sync, lean_bnb_step


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
    # The four 8-bit tensors went straight to the kernel; the small one took bitsandbytes' 32-bit path.
    assert len(calls) == (0 if cls in OWN_UPDATE else 5 * 4)
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
