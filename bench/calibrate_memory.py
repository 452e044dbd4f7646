"""The processes of the memory calibration (bench/calibration_matrix.py drives them):

    python bench/calibrate_memory.py worker --spec SPEC.json --channel DIR --name NAME
    python bench/calibrate_memory.py build  --arch ARCH --out MODEL_DIR --channel DIR --name NAME [--dry-run]
    python bench/calibrate_memory.py probe  --channel DIR --name NAME

A worker loads one architecture once through the engine's own loading path (engine.train.backends.hf
or engine.train.backends.unsloth), then measures configurations one at a time as the driver asks:
each gets the engine's own adapters (apply_lora), data pipeline (engine.data.prepare, padding-
free rows for Unsloth) and trainer (engine.train.backends.trainer.build_trainer), on the engine's allocator
settings (engine.allocator). Between configurations it frees what the last one held: the trainer,
the optimizer, PyTorch's cache, and bitsandbytes' paged optimizer state (which bitsandbytes never
frees: it is moved to the host and dropped from its page manager, so it cannot count in a later
configuration's device figure).

For each configuration it records PyTorch's peaks (max_memory_allocated and max_memory_reserved,
reset right before training), the paged state, each optimizer step's time and the losses; the
driver adds the device figure of the process from NVML over the training window.

Every process creates its CUDA context only when the driver says so (the init gate), so that on a
machine whose NVML reports host pids the one new pid is known to be this process's.

    python bench/calibrate_memory.py --out DIR --arch llama-3.2-1b [--backend hf]

runs bench/calibration_matrix.py for those architectures and backends (the old entry point).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.channel import Channel  # noqa: E402

GIB = 2**30


def _exit_if_told(message: dict[str, Any] | None) -> dict[str, Any]:
    if message is None or message.get("cmd") == "exit":
        sys.exit(0)
    return message


def cuda_init(channel: Channel, device: str) -> None:
    """Create this process's CUDA context while holding the driver's init gate."""
    channel.send(ev="want_init", pid=os.getpid())
    _exit_if_told(channel.wait({"init", "exit"}))
    if device == "cuda":
        import torch

        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    else:
        from bench.gpu_memory import mark_fake_cuda

        mark_fake_cuda()
    channel.send(ev="inited", pid=os.getpid())
    _exit_if_told(channel.wait({"init_ack", "exit"}, timeout=60) or {"cmd": "init_ack"})


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return exc.__class__.__name__ == "OutOfMemoryError" or "out of memory" in text


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


class Worker:
    """One architecture and backend in one process; configurations on the driver's command."""

    def __init__(self, spec: dict[str, Any], channel: Channel) -> None:
        self.spec = spec
        self.channel = channel
        self.backend: str = spec["backend"]
        self.dry_run: bool = bool(spec.get("dry_run"))
        self.model_dir: str = spec["model_dir"]
        self.tokens: str = spec["tokens_file"]
        self.scratch = Path(spec["scratch"])
        self.count = 0  # configurations measured so far in this process
        self.unsloth_first_plan: Any = None  # the plan Unsloth's first get_peft_model was given
        self.model: Any = None
        self.base: Any = None  # hf: the 4-bit model without adapters
        self.prepared: dict[str, Any] | None = None
        self.kernels: list[str] = []
        self.hooks_before: set[int] = set()  # hf: the layer stack's forward pre-hooks after the load
        self.base_forward: Any = None  # hf: an instance-level forward the load set, if any
        # What the process held, adapters aside, when its first configuration (the warm-up) was
        # ready to train: later configurations holding more carry leftovers of earlier ones.
        self.reference_net: float | None = None

    # -- configs ---------------------------------------------------------------------------------

    def run_config(self, c: dict[str, Any]) -> Any:
        from engine.config import config_from_dict

        return config_from_dict(
            {
                "model": {"name_or_path": self.model_dir, "arch": c["arch"]},
                "lora": {
                    "r": c["lora_r"],
                    "alpha": c["lora_alpha"],
                    "dropout": 0.0,
                    "target_modules": list(c["target_modules"]),
                },
                "data": {
                    "source": self.tokens,
                    "format": "tokens",
                    "packing": False,
                    "val_fraction": 0,
                    "too_long": "truncate",
                },
                "train": {
                    "seq_len": c["seq_len"],
                    "micro_batch": c["micro_batch"],
                    "grad_accum": c.get("grad_accum", 1),
                    "max_steps": c["steps"],
                    "save_steps": 100000,
                    "logging_steps": 1,
                    "eval_steps": 0,
                    "gradient_checkpointing": c["checkpointed_layers"],
                    "seed": 3407,
                },
                "hardware": {"backend": self.backend, "device": self.device},
            },
            source=c["id"],
        )

    def plan_for(self, c: dict[str, Any]) -> Any:
        from engine.memory import CheckpointPlan

        return CheckpointPlan(c["layers"], c["checkpointed_layers"], f"calibration: {c['gc']}")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        from engine import allocator

        allocator.configure()  # the engine's allocator settings, before torch touches CUDA
        import torch

        from bench.gpu_common import versions

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() and not self.dry_run else "cpu"
        self.allocator = "expandable" if allocator.expandable_segments() else "default"
        self.channel.send(ev="hello", pid=os.getpid(), versions=versions(), device=self.device)
        # The context first (the driver maps this process's NVML pid while it holds the gate),
        # then Unsloth, whose import may touch CUDA; as in the engine, torch before Unsloth.
        cuda_init(self.channel, self.device)
        if self.backend == "unsloth":
            from engine.train.backends import unsloth as unsloth_backend

            unsloth_backend.preload()  # before transformers, peft and TRL load
        t0 = time.time()
        self.load()
        self.channel.send(
            ev="loaded",
            t0=t0,
            t1=time.time(),
            after_load_allocated_gib=self.allocated(),
            kernels=self.kernels,
        )
        if self.spec.get("warmup"):
            t0 = time.time()
            self.warmup()
            self.channel.send(ev="warmed", t0=t0, t1=time.time())

    def load(self) -> None:
        from engine.models.loading import load_tokenizer
        from engine.train.backends import hf

        first = self.spec["configs"][0]
        cfg = self.run_config({**first, "seq_len": self.spec["max_seq"]})
        self.tok = load_tokenizer(cfg, self.model_dir)
        if self.backend == "unsloth":
            from transformers import set_seed

            from engine.run.distributed import Ranks
            from engine.train import backends

            # Through the Backend API the engine uses (engine/train/backends/base.py), so the
            # calibration loads and wraps exactly as a run does.
            backend = backends.get("unsloth")
            plan = self.plan_for(first)
            model = backend.load_model(cfg, self.model_dir, self.device, plan, Ranks())
            self.load_allocated = self.allocated()
            set_seed(3407)
            self.model = backend.apply_lora(model, cfg, plan, Ranks())
            # The plan this process's adapters were made with: Unsloth's generic path (Gemma 3,
            # Phi-4) keeps it for good, so prepare() refuses another one there.
            self.unsloth_first_plan = plan
            self.kernels = ["unsloth: fused RMSNorm, RoPE, SwiGLU, LoRA, cross-entropy"]
        else:
            from engine.train.backends.checkpointing import decoder_layers

            self.base = hf.load_model(cfg, self.device, self.model_dir)
            self.kernels = hf.apply_kernels(self.base, cfg, self.device)
            self.load_allocated = self.allocated()
            self.hooks_before = set(decoder_layers(self.base)[0]._forward_pre_hooks)
            self.base_forward = self.base.__dict__.get("forward")

    def allocated(self) -> float | None:
        if self.device != "cuda":
            return None
        return self.torch.cuda.memory_allocated() / GIB

    def warmup(self) -> None:
        """Two short steps before anything is timed: Unsloth compiles its kernels and Triton its
        Liger kernels in the first steps; a measured configuration should not pay for that."""
        first = self.spec["configs"][0]
        c = {
            **first,
            "id": "warmup",
            "seq_len": min(512, first["seq_len"]),
            "micro_batch": 1,
            "grad_accum": 1,
            "steps": 2,
        }
        self.prepare(c)
        self.train(c, record=False)

    # -- one configuration -----------------------------------------------------------------------

    def _clean_base(self) -> None:
        """hf: take the last configuration's checkpointing off the bare model (keep_last_layers'
        hook, the input-gradient hook, the layers' flags, TRL's fused-head forward), so the next
        apply_lora starts from the model as it was loaded."""
        from engine.train.backends.checkpointing import decoder_layers

        base = self.base
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
        for layer in decoder_layers(base)[1]:
            layer.gradient_checkpointing = False
        base.disable_input_require_grads()
        owner = decoder_layers(base)[0]
        for key in list(owner._forward_pre_hooks):
            if key not in self.hooks_before:
                del owner._forward_pre_hooks[key]
        # TRL's add_fused_lm_head patches the instance's forward on every trainer build.
        if self.base_forward is None:
            base.__dict__.pop("forward", None)
        else:
            base.forward = self.base_forward

    def prepare(self, c: dict[str, Any]) -> dict[str, Any]:
        from transformers import set_seed

        from engine import data
        from engine.train import backends
        from engine.train.backends import hf
        from engine.train.backends.trainer import build_trainer

        cfg = self.run_config(c)
        plan = self.plan_for(c)
        set_seed(3407)
        if self.backend == "unsloth":
            from unsloth import FastLanguageModel

            from engine.run.distributed import Ranks
            from engine.train.backends import unsloth as unsloth_backend

            # Unsloth keeps its adapters: asked again with the same LoRA settings it only records
            # the checkpointing mode and marks the layers it should not checkpoint (it never
            # unmarks them: the driver runs partial checkpointing last, bench/calibration_plan.py),
            # and for_training sets every layer's flag for this mode.
            try:
                self.model = backends.get("unsloth").apply_lora(self.model, cfg, plan, Ranks())
                if self.unsloth_first_plan is None:
                    self.unsloth_first_plan = plan
            except RuntimeError as exc:
                # Unsloth's Gemma 3 path refuses a second get_peft_model outright; the adapters are
                # the same (one LoRA setting per process), so only the checkpointing mode changes,
                # which for_training sets below, where that is enough (reused_adapters_refusal).
                if "already added LoRA" not in str(exc):
                    raise
                why = reused_adapters_refusal(self.unsloth_first_plan, plan)
                if why:
                    raise RuntimeError(f"unsupported here: {why} ({exc})") from None
            FastLanguageModel.for_training(
                self.model, use_gradient_checkpointing=unsloth_backend.gc_mode(plan)
            )
        else:
            self._clean_base()
            self.model = hf.apply_lora(self.base, cfg, plan)
        backend = backends.get(self.backend)
        padding_free = backend.padding_free_rows(self.model)
        prepared = data.prepare(cfg, self.tok)
        prepared.collator.padding_free = padding_free
        notes = backend.fit_to_data(prepared, self.model, plan)  # as a run tunes itself to its data
        timer = _step_timer(self.torch, self.device)
        scratch = Path(tempfile.mkdtemp(prefix="trainer-", dir=self.scratch))
        trainer = build_trainer(
            self.model,
            self.tok,
            cfg,
            prepared,
            scratch,
            self.device,
            [timer],
            trainer_checkpointing=plan.enabled and self.backend == "hf",
        )
        gc.collect()
        resident = self.allocated()
        net = None if resident is None else resident - _lora_bytes(self.model) / GIB
        if self.reference_net is None:
            self.reference_net = net
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
        self.prepared = {
            "net": net,
            "cfg": cfg,
            "trainer": trainer,
            "timer": timer,
            "padding_free": padding_free,
            "data_notes": notes,
            "even_rows": prepared.collator.even_rows,
            "resident": resident,
            "paged_before": len(_paged_tensors()),
        }
        return {"resident_allocated_gib": resident}

    def train(self, c: dict[str, Any], record: bool = True) -> dict[str, Any] | None:
        assert self.prepared is not None
        p = self.prepared
        trainer, timer = p["trainer"], p["timer"]
        torch = self.torch
        history = os.environ.get("QLC_BENCH_MEMORY_HISTORY") if self.device == "cuda" and record else None
        if history:
            from bench import memory_history

            before = torch.cuda.memory_allocated()
            memory_history.start(torch)
        calls_before = _unsloth_loss_calls(self.backend)
        t0 = time.time()
        oom, error = False, None
        try:
            trainer.train()
        except Exception as exc:
            if is_oom(exc):
                oom = True
            else:
                error = f"{exc.__class__.__name__}: {str(exc)[:500]}"
                traceback.print_exc()
        if self.device == "cuda":
            torch.cuda.synchronize()
        t_train_end = time.time()
        peaks = {}
        if self.device == "cuda":
            peaks = {
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            }
        if history:
            print(
                f"memory history: {memory_history.write(torch, Path(history), c['id'], before)}", flush=True
            )
        calls = _unsloth_loss_calls(self.backend)
        loss_calls = (
            {
                "unsloth_loss_calls": {k: v - calls_before.get(k, 0) for k, v in calls.items()},
                "unsloth_loss_route": _unsloth_loss_route(torch),
            }
            if calls
            else {}
        )
        paged = _paged_tensors()[p["paged_before"] :]
        paged_gib = sum(t.nbytes for t in paged) / GIB
        time.sleep(0.3)  # the driver's NVML samples see the final state before anything is freed
        t1 = time.time()
        if not record:
            self.cleanup()
            return None
        self.count += 1
        steps = timer.seconds
        steady = steps[2:]
        tokens = c["seq_len"] * c["micro_batch"] * c.get("grad_accum", 1)  # an optimizer step's
        losses = [round(e["loss"], 5) for e in trainer.state.log_history if "loss" in e]
        resident = p["resident"]
        baseline = None
        if p["net"] is not None and self.reference_net is not None:
            # The adapters differ between configurations (the estimate counts each one's); what
            # else the process holds beyond its first configuration is an earlier one's leftover.
            baseline = max(0.0, p["net"] - self.reference_net)
        rec: dict[str, Any] = {
            "id": c["id"],
            "arch": c["arch"],
            "backend": self.backend,
            "seq_len": c["seq_len"],
            "micro_batch": c["micro_batch"],
            "grad_accum": c.get("grad_accum", 1),
            "gradient_checkpointing": c["checkpointed_layers"] > 0,
            "checkpointed_layers": c["checkpointed_layers"],
            "lora_r": c["lora_r"],
            "lora_alpha": c["lora_alpha"],
            "target_modules": list(c["target_modules"]),
            "modules_to_save": [],
            "optimizer": p["cfg"].train.optimizer,
            "oom": oom,
            "error": error,
            "allocator": self.allocator,
            "padding_free": p["padding_free"],
            "data_notes": p["data_notes"],
            "even_rows": p["even_rows"],
            "liger": any(k.startswith("liger") for k in self.kernels),
            "kernels": self.kernels,
            "steps": c["steps"],
            "tokens_per_step": tokens,
            "step_seconds": [round(s, 4) for s in steps],
            "median_step_seconds": statistics.median(steady) if steady else None,
            "tokens_per_second": tokens / statistics.median(steady) if steady else None,
            "losses": losses,
            "paged_state_gib": paged_gib,
            "resident_allocated_gib": resident,
            "resident_without_adapters_gib": p["net"],
            "after_load_allocated_gib": self.load_allocated,
            "baseline_allocated_gib": baseline or 0.0,
            "order_in_process": self.count,
            **loss_calls,
            # PyTorch's allocation recorder slows every allocation: the peaks hold, the times do not.
            **({"memory_history": True} if history else {}),
            "t_train_start": t0,
            "t_train_end": t_train_end,
            "t_end": t1,
            **peaks,
        }
        self.cleanup()
        return rec

    def cleanup(self) -> None:
        p, self.prepared = self.prepared, None
        if p is not None:
            accelerator = getattr(p["trainer"], "accelerator", None)
            if accelerator is not None:
                accelerator.free_memory()  # drops its references to the optimizer and model
            del p, accelerator
        if self.backend == "hf" and self.model is not None:
            self.model.unload()  # peft: the 4-bit layers back in place of the LoRA layers
            self.model = None
            self._clean_base()
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
            _evict_paged(self.torch)

    def serve(self) -> None:
        """Answer the driver: prepare ID, train ID, skip ID, exit."""
        self.channel.send(ev="ready")
        while True:
            msg = _exit_if_told(self.channel.wait({"prepare", "train", "skip", "exit"}))
            cmd, c = msg["cmd"], msg.get("config")
            try:
                if cmd == "prepare":
                    info = self.prepare(c)
                    self.channel.send(ev="prepared", id=c["id"], **info)
                elif cmd == "train":
                    rec = self.train(c)
                    self.channel.send(ev="record", record=rec)
                    self.channel.send(ev="ready")
                elif cmd == "skip":
                    self.cleanup()
                    self.channel.send(ev="skipped", id=c["id"])
                    self.channel.send(ev="ready")
            except Exception as exc:
                traceback.print_exc()
                failed_id = c["id"] if c else None
                self.channel.send(
                    ev="failed", id=failed_id, error=f"{exc.__class__.__name__}: {str(exc)[:800]}"
                )
                try:
                    self.cleanup()
                except Exception:
                    traceback.print_exc()
                    self.channel.send(ev="fatal", error="cleanup failed after an error")
                    sys.exit(1)
                self.channel.send(ev="ready")


def reused_adapters_refusal(first: Any, plan: Any) -> str | None:
    """Why a configuration cannot run on adapters Unsloth refused to make again (its generic path,
    Gemma 3 and Phi-4, keeps the first get_peft_model for good), or None where it can.

    The plan they were made with can always run again: the warm-up's short step asks for exactly
    the first configuration's. Partial checkpointing is marked by get_peft_model alone, so another
    partial plan would not be the configuration asked for; nor does for_training turn
    checkpointing off there: measured on Gemma-3-4B and Phi-4 (H100, 2026-12-05), a "no
    checkpointing" step peaked at a checkpointed step's memory (4.07 GiB reserved against 19.5
    estimated without)."""
    if first is None:
        return "no adapters were made in this process"
    if (plan.layers, plan.checkpointed) == (first.layers, first.checkpointed):
        return None
    if plan.partial or first.partial:
        return "partial checkpointing needs a fresh get_peft_model"
    if plan.enabled != first.enabled:
        return "another checkpointing mode needs a fresh get_peft_model on this path"
    return None


def _unsloth_loss_calls(backend: str) -> dict[str, int]:
    """unsloth_zoo's counters of the routes its fused linear loss took in this process (CALLS): its
    tiled "flash" pass keeps a rows x 16,384 fp32 tile, the chunked one a rows x vocab buffer, and
    which one runs depends on the card and the labelled tokens (fused_linear._flash_min_rows)."""
    if backend != "unsloth":
        return {}
    try:
        from unsloth_zoo.fused_losses import fused_linear
    except ImportError:
        return {}
    return {k: int(v) for k, v in getattr(fused_linear, "CALLS", {}).items()}


def _unsloth_loss_route(torch: Any) -> dict[str, Any]:
    """The switches unsloth_zoo's fused linear loss reads on this card (private names, read where
    they exist): the fewest labelled rows for its tiled pass, Triton's use, fp32 logits, and whether
    a Triton failure sent this card to the torch path."""
    from unsloth_zoo.fused_losses import fused_linear as fl

    device = torch.device("cuda", torch.cuda.current_device())
    out: dict[str, Any] = {}
    for name, call in (
        ("flash_min_rows", lambda: fl._flash_min_rows(device)),
        ("use_triton", lambda: fl._use_triton(device)),
        ("flash_ce_ok", lambda: fl._flash_ce_ok(device)),
        ("logits_mode", lambda: list(fl._logits_mode(device, torch.bfloat16))),
        ("budget_bytes", lambda: fl._budget_bytes(device)),
        ("triton_broken", lambda: sorted(str(d) for d in fl._TRITON_BROKEN)),
    ):
        try:
            out[name] = call()
        except Exception as exc:  # a private name that moved: say so, never fail the record
            out[name] = f"{exc.__class__.__name__}: {exc}"[:200]
    return out


def _step_timer(torch: Any, device: str) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Each optimizer step's wall time, the GPU synchronised at its end; no checkpoint saves."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._last = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.seconds.append(now - self._last)
            self._last = now
            # The Trainer saves a checkpoint after its last step; a measurement needs none, and
            # the GPU is granted to the next configuration sooner without it.
            control.should_save = False

    return StepTimer()


def _paged_tensors() -> list[Any]:
    try:
        import bitsandbytes.functional as F

        return list(F.GlobalPageManager.get_instance().paged_tensors)
    except Exception:
        return []


def _evict_paged(torch: Any) -> None:
    """Drop every paged optimizer state from bitsandbytes' page manager, so a later configuration
    does not prefetch it again. bitsandbytes never frees managed memory: the state stays allocated
    but idle. It is not in this process's NVML figure (the probe checks that: managed memory counts
    only in the device's), so the next configuration's device figure is unaffected. It is not
    moved to the host: with bitsandbytes 0.50 on CUDA 13, prefetching to the CPU fails with
    "invalid device ordinal" and bitsandbytes exits the process (seen on the H200, 2026-12-04)."""
    try:
        import bitsandbytes.functional as F

        torch.cuda.synchronize()
        F.GlobalPageManager.get_instance().paged_tensors.clear()
    except Exception:
        traceback.print_exc()


def _lora_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------
# Build and probe children
# ---------------------------------------------------------------------------------------------


def build(arch: str, out: Path, channel: Channel, dry_run: bool) -> int:
    """Random bf16 weights of `arch`, saved to `out` (the driver deletes it after the runs)."""
    import torch

    from bench.gpu_common import build_model, folder_bytes, hf_config, shrunk_config

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    channel.send(ev="hello", pid=os.getpid(), device=device)
    cuda_init(channel, device)
    t0 = time.time()
    config = shrunk_config(arch) if dry_run else hf_config(arch)
    tmp = out.with_name(out.name + ".tmp")
    seconds = build_model(arch, tmp, config, device=device)
    tmp.rename(out)
    channel.send(ev="built", seconds=seconds, t0=t0, t1=time.time(), bytes=folder_bytes(out))
    return 0


def probe(channel: Channel) -> int:
    """Allocations the driver watches through NVML to learn what it reports: a context, 1 GiB
    through torch, 512 MiB of managed memory (bitsandbytes' paged allocation) on the device, then
    moved to the host."""
    from engine import allocator

    allocator.configure()  # the workers' allocator: the probe checks NVML counts its memory
    import torch

    from bench.gpu_memory import PROBE_PHASE_S

    device = "cuda" if torch.cuda.is_available() else "cpu"
    channel.send(ev="hello", pid=os.getpid(), device=device)
    cuda_init(channel, device)
    channel.send(ev="phase", phase="inited")
    time.sleep(PROBE_PHASE_S)
    if device == "cuda":
        x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        x.fill_(1)
        torch.cuda.synchronize()
    else:
        x = bytearray(b"\x01" * 2**30)  # a dry run's stand-in for NVML counts resident memory
    channel.send(ev="phase", phase="torch_alloc")
    time.sleep(PROBE_PHASE_S)
    managed = None
    try:
        if device == "cuda":
            import bitsandbytes.functional as F

            managed = F.get_paged(2**29, dtype=torch.uint8, device=torch.device("cuda", 0))
            F.fill(managed, 1)
            F.prefetch_tensor(managed)
            torch.cuda.synchronize()
            channel.send(ev="phase", phase="managed")
            time.sleep(PROBE_PHASE_S)
            # No eviction phase: prefetching managed memory to the CPU makes bitsandbytes 0.50 exit
            # the process on CUDA 13 ("invalid device ordinal"); the workers never evict either.
    except Exception as exc:
        channel.send(ev="note", note=f"managed allocation failed: {exc.__class__.__name__}: {exc}")
    del x, managed
    channel.send(ev="phase", phase="done")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--spec", type=Path, required=True)
    w.add_argument("--channel", type=Path, required=True)
    w.add_argument("--name", required=True)
    b = sub.add_parser("build")
    b.add_argument("--arch", required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--channel", type=Path, required=True)
    b.add_argument("--name", required=True)
    b.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("probe")
    p.add_argument("--channel", type=Path, required=True)
    p.add_argument("--name", required=True)
    if len(sys.argv) > 1 and sys.argv[1] not in ("worker", "build", "probe", "-h", "--help"):
        # The old entry point: --out DIR --arch A [--arch B] [--backend hf|unsloth] ...
        from bench import calibration_matrix

        return calibration_matrix.main(sys.argv[1:])
    args = ap.parse_args()
    if args.cmd is None:
        ap.print_help()
        return 2
    channel = Channel.for_child(args.channel, args.name)
    if args.cmd == "build":
        return build(args.arch, args.out, channel, args.dry_run)
    if args.cmd == "probe":
        return probe(channel)
    spec = json.loads(args.spec.read_text())
    worker = Worker(spec, channel)
    try:
        worker.start()
    except SystemExit:
        raise
    except BaseException as exc:
        traceback.print_exc()
        channel.send(ev="fatal", error=f"{exc.__class__.__name__}: {str(exc)[:800]}")
        return 1
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
