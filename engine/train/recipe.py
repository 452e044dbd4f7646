"""One training run, backend-agnostic: setup (model, adapters, data, trainer), train,
save_checkpoint (the final adapter), cleanup.

The recipe calls its backend's steps (engine.train.backends.base.Backend) and never branches on
which stack trains. The trainer talks to the outside through engine.train.callback.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from engine import __version__, allocator, protocol
from engine.config import RunConfig, load_resolved
from engine.errors import UserError
from engine.memory.checkpointing import BatchSplit, CheckpointPlan, plan_layout
from engine.run import checkpoints, fingerprint, runs, standby
from engine.run.control import CommandQueue
from engine.run.distributed import Ranks, Timeouts
from engine.run.events import Emitter
from engine.train import failures, faults
from engine.train.backends.base import Backend
from engine.train.state import RunState
from engine.train.usage import cuda_memory, host_rss_gb


class Recipe:
    """setup -> train -> save_checkpoint -> cleanup, for one run directory."""

    def __init__(
        self,
        run_dir: Path,
        emitter: Emitter,
        commands: CommandQueue,
        resume: bool = False,
        ranks: Ranks = Ranks(),
    ) -> None:
        from engine.train.collectives import SharedCommands

        self.run_dir = run_dir
        self.emitter = emitter
        self.ranks = ranks
        self.timeouts = Timeouts.from_env()  # every wait between ranks has a limit
        self.commands = SharedCommands(commands, ranks, self.timeouts)  # rank 0's commands, on every rank
        self.resume = resume
        self.cfg: RunConfig = load_resolved(run_dir / runs.CONFIG)
        self.state = RunState()
        self.backend: Backend | None = None
        self.device = "cpu"
        self.trainer: Any = None
        self.tokenizer: Any = None
        self.resume_from: Path | None = None
        self.kernels: list[str] = []
        self.sources: Any = None  # engine.train.sources.Sources: local paths and pinned commits

    @property
    def backend_name(self) -> str | None:
        return self.backend.name if self.backend is not None else None

    # ---- hello: which stack, on which device, from which checkpoint --------------------------

    def hello(self) -> None:
        from engine.models.loading import with_compute_dtype
        from engine.train import backends

        self.device = backends.choose_device(self.cfg)
        name, reason = backends.choose_backend(self.cfg, self.device, self.ranks.world_size)
        self.backend = backends.get(name)
        self.backend.prepare()  # before anything imports transformers, peft or TRL
        # quant.compute_dtype auto, decided once for this device: everything after reads the answer.
        self.cfg, dtype = with_compute_dtype(self.cfg, self.device)
        removed, skipped = self._find_resume_point()
        self.emitter.emit(
            protocol.Hello(
                engine_version=__version__,
                run_id=self.run_dir.name,
                pid=os.getpid(),
                mode="resume" if self.resume else "train",
                resumed_from=self.resume_from.name if self.resume_from else None,
                backend=name,
                backend_reason=reason,
                device=self._describe_device(),
                world_size=self.ranks.world_size,
                trust_remote_code=self.cfg.model.trust_remote_code,
                compute_dtype=dtype.name,
                compute_dtype_reason=dtype.reason,
                started=process_started_at(),
            )
        )
        self._log_start(removed, skipped)
        self._start_process_group()
        if self.resume:
            fingerprint.check(self.run_dir, self.cfg, full=True)

    def _start_process_group(self) -> None:
        """Several processes: the process group starts here, before anything loads, so that a rank
        or NCCL that does not come fails with one line about that (engine/train/collectives.py)."""
        from engine.train.backends import parallel
        from engine.train.collectives import start_process_group

        note = start_process_group(
            self.ranks, self.device, parallel.sharded(self.cfg, self.ranks), self.timeouts
        )
        if note:
            self.emitter.log(note)

    def _find_resume_point(self) -> tuple[list[str], list[tuple[Path, str]]]:
        """(stale saves removed, damaged checkpoints skipped). What an engine killed mid-save left
        behind is removed by rank 0, which holds the run's lock; the others wait for it at the
        first collective."""
        removed = checkpoints.clean_stale(self.run_dir / runs.CHECKPOINTS) if self.ranks.is_main else []
        skipped: list[tuple[Path, str]] = []
        if self.resume:
            runs.find_checkpoint(self.run_dir)  # one line if there is none at all
            self.resume_from, skipped = checkpoints.newest_verified(self.run_dir / runs.CHECKPOINTS)
            if self.resume_from is None:
                raise UserError(
                    f"run {self.run_dir.name}: no checkpoint passes verification ({skipped[0][1]})",
                    "start a new run with `qlc train`",
                )
        return removed, skipped

    def _describe_device(self) -> str:
        from engine.run.distributed import describe

        device = self.device
        if device == "cuda":
            import torch

            torch.cuda.set_device(self.ranks.local_rank)  # this rank's GPU, before anything lands on one
            device = f"cuda:{self.ranks.local_rank} ({torch.cuda.get_device_name(self.ranks.local_rank)})"
        return describe(self.ranks, self.cfg.hardware.strategy, device)

    def _log_start(self, removed: list[str], skipped: list[tuple[Path, str]]) -> None:
        plan = faults.plan_from_env()
        if standby.served:
            self.emitter.log(
                f"a warm engine took this launch: its {self.backend_name} libraries were imported "
                f"{standby.served['waited']:.0f} s before it (hardware.keep_warm)"
            )
        if self.device == "cuda":
            self.emitter.log(allocator.describe())
        if plan.armed:
            self.emitter.log(f"fault injection armed ({faults.ENV}={plan.describe()})", level="warning")
        for name in removed:
            self.emitter.log(f"removed {name}: an incomplete save from an earlier session")
        for path, reason in skipped:
            assert self.resume_from is not None
            self.emitter.emit(
                protocol.WarningEvent(
                    message=f"{path.name} is damaged ({reason}); resuming from {self.resume_from.name}",
                    hint="the damaged checkpoint is left in place for inspection",
                )
            )

    # ---- setup: model, adapters, data, trainer ------------------------------------------------

    def setup(self) -> None:
        from engine.models.loading import load_tokenizer
        from engine.train.sources import prepare as prepare_sources

        # Hub sources: downloaded with progress and pinned to the commits of the run's start
        # (engine/train/sources.py); the loaders read local folders from here on.
        sources = prepare_sources(self.run_dir, self.cfg, self.emitter.emit, is_main=self.ranks.is_main)
        self.cfg = cfg = sources.cfg
        self.sources = sources
        self.emitter.emit(
            protocol.StageEvent(stage="loading_model", message=f"loading {cfg.model.name_or_path}")
        )
        t0 = time.perf_counter()
        path = sources.model_path
        self.tokenizer = load_tokenizer(cfg, path)
        # Decided before the weights load: the GPU's free memory is the budget auto spends.
        self.checkpointing, self.split = self._plan_step(path)
        if self.split.changed(cfg):
            # The same rows per optimizer step, split into other micro-batches: everything
            # downstream (the trainer's arguments, the data report's steps, the estimate) reads it.
            self.cfg = cfg = self.split.apply(cfg)
        model = self._load_model(path)
        self._emit_model_ready(model, path, time.perf_counter() - t0)
        prepared, template = self._prepare_data(self.backend.padding_free_rows(model))
        for note in self.backend.fit_to_data(prepared, model, self.checkpointing):
            self.emitter.emit(protocol.Log(message=note))
        # After the data: how the rows are batched (even rows) changes the peak a little.
        self._emit_estimate(even_rows=prepared.collator.even_rows)
        self.trainer = self._build_trainer(model, prepared, template)

    def _plan_step(self, path: str) -> tuple[CheckpointPlan, BatchSplit]:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            path, revision=self.cfg.model.revision, trust_remote_code=self.cfg.model.trust_remote_code
        )
        layers = int(getattr(config.get_text_config(), "num_hidden_layers", 0) or 0)
        assert self.backend is not None
        return plan_layout(self.cfg, self.backend.name, self.device, layers, self.ranks.world_size)

    def _load_model(self, path: str) -> Any:
        """The base, the backend's kernels, then the adapters. LoRA's A matrices are drawn at random
        when the adapters are created, before the trainer seeds anything: seed right before, or two
        runs of one preset start from different adapters."""
        from transformers import set_seed

        cfg, backend, plan = self.cfg, self.backend, self.checkpointing
        assert backend is not None
        self.emitter.emit(
            protocol.StageEvent(stage="quantizing", message=f"loading weights: {self._layout(path)}")
        )
        model = backend.load_model(cfg, path, self.device, plan, self.ranks)
        self.kernels = backend.apply_kernels(model, cfg, self.device)
        set_seed(cfg.train.seed)
        model = backend.apply_lora(model, cfg, plan, self.ranks)
        self.kernels += backend.fuse_lora(model)
        return model

    def _layout(self, path: str) -> str:
        """The weights' layout as they load: the checkpoint's own quantization, or quant.*'s."""
        from engine.models import quantization
        from engine.models.loading import checkpoint_quantization

        ckpt = checkpoint_quantization(path, self.cfg)
        if ckpt is not None:
            return f"{ckpt.describe()} (the checkpoint's own)"
        asked = quantization.requested(self.cfg.quant, self.cfg.quant.compute_dtype)
        return asked.describe() if asked else f"16-bit ({self.cfg.quant.compute_dtype})"

    def _emit_model_ready(self, model: Any, path: str, seconds: float) -> None:
        from engine.models.loading import resolved_source

        total, trainable = count_params(model)
        mem = cuda_memory()
        gc = self.checkpointing
        # The commit pinned at the run's start (engine/train/sources.py) where the model came from
        # the hub through the engine; else what the loaded model says of itself.
        pinned = self.sources.model if self.sources is not None else None
        repo, commit = (pinned.repo, pinned.commit) if pinned else resolved_source(model, path)
        self.emitter.emit(
            protocol.ModelReady(
                total_params=total,
                trainable_params=trainable,
                quantized=self.cfg.quant.load_in_4bit,
                memory_allocated_gb=mem.get("memory_allocated_gb"),
                memory_reserved_gb=mem.get("memory_reserved_gb"),
                host_rss_gb=host_rss_gb(),
                load_seconds=seconds,
                layers=gc.layers,
                checkpointed_layers=gc.checkpointed,
                checkpoint_reason=gc.reason,
                micro_batch=self.cfg.train.micro_batch,
                grad_accum=self.cfg.train.grad_accum,
                split_reason=self.split.reason,
                kernels=self.kernels,
                repo=repo,
                commit=commit,
                quantization=self._layout(path),
            )
        )

    def _prepare_data(self, padding_free: bool) -> tuple[Any, str]:
        """The tokenized data, collated as the backend trains (one padding-free row or padded
        rows), and the chat template's family."""
        from engine import data
        from engine.data.report import steps

        cfg, emit = self.cfg, self.emitter.emit
        emit(protocol.StageEvent(stage="preparing_data", message=f"preparing {cfg.data.source}"))
        if not self.resume and self.ranks.is_main:
            fingerprint.record(self.run_dir, cfg)  # what a later resume checks against

        # Progress (examples/s, ETA) comes as StageEvents; the prepared rows are cached on disk,
        # so a resume (or a run after `qlc data`) reuses them.
        prepared = data.prepare(cfg, self.tokenizer, emit)
        prepared.collator.padding_free = padding_free
        template = prepared.template.family if prepared.template else "auto"
        if prepared.template is not None:
            # Checkpoints and the final adapter save this tokenizer: they carry the template the
            # model learned, so sampling and export render prompts exactly as training did.
            self.tokenizer.chat_template = prepared.template.source
        r = prepared.report
        per_epoch, total = steps(
            r.rows,
            cfg.train.micro_batch * self.ranks.world_size,
            cfg.train.grad_accum,
            cfg.train.epochs,
            cfg.train.max_steps,
        )
        ready = protocol.DataReady(
            train_examples=r.examples,
            eval_examples=r.eval_examples,
            train_tokens=r.tokens_per_epoch,
            trained_tokens=r.trained_tokens_per_epoch,
            truncated=r.truncated,
            dropped=r.dropped,
            steps_per_epoch=per_epoch,  # each step takes micro_batch x grad_accum rows per rank
            total_steps=total,
            format=r.format or "",
            template=r.template or "",
            skipped=r.skipped,
        )
        if self.resume and self.ranks.is_main:
            changed = data_changed(self.run_dir, ready)
            if changed:
                emit(protocol.WarningEvent(message=changed, hint=RESUMED_ON_OTHER_DATA_HINT))
        emit(ready)
        if r.skipped and self.ranks.is_main:
            from engine.data.report import skipped_line

            emit(
                protocol.WarningEvent(
                    message=skipped_line(r),
                    hint="with data.bad_records: stop, preparation stops at the first bad record, named",
                )
            )
        return prepared, template

    def _build_trainer(self, model: Any, prepared: Any, template: str) -> Any:
        from engine.train.backends import parallel
        from engine.train.callback import Context, EngineCallback
        from engine.train.watchdog import step_clock

        assert self.backend is not None
        context = Context(
            self.emitter,
            self.commands,
            self.tokenizer,
            template,
            self.ranks,
            self.device,
            sharded=parallel.sharded(self.cfg, self.ranks),
            chat=prepared.template is not None,
        )
        return self.backend.build_trainer(
            model,
            self.tokenizer,
            self.cfg,
            prepared,
            self.run_dir / runs.CHECKPOINTS,
            self.device,
            # The step clock first: the engine's callback reads the step it records.
            [step_clock(self.commands), EngineCallback(context, self.state)],
            self.checkpointing,
            self.ranks,
        )

    def _emit_estimate(self, even_rows: bool = False) -> None:
        """The memory model's estimate, for the dashboard's estimate-versus-actual. Never fatal."""
        try:
            est, gpu = estimate_for_run(
                self.cfg,
                self.device,
                self.backend_name,
                self.checkpointing.checkpointed,
                self.ranks.world_size,
                liger=any(k.startswith("liger") for k in self.kernels),
                even_rows=even_rows,
            )
            self.emitter.emit(est.to_event(gpu))
        except Exception as exc:  # an estimate must never stop a run
            self.emitter.log(f"no memory estimate: {exc}", level="debug")

    # ---- train, save, cleanup -----------------------------------------------------------------

    def train(self) -> None:
        self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)

    def save_checkpoint(self) -> Path:
        """The final adapter, written to a temporary folder and renamed: never half-written.
        Rank 0 writes it; with FSDP every rank takes part in gathering the sharded adapter."""
        from engine.train.backends import parallel

        target = self.run_dir / runs.ADAPTER
        tmp = self.run_dir / f".{runs.ADAPTER}.tmp"
        sharded = parallel.sharded(self.cfg, self.ranks)
        if sharded:
            if self.ranks.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self.trainer.save_model(str(tmp))  # gathers on every rank, writes on rank 0
        if not self.ranks.is_main:
            return target
        self.emitter.emit(protocol.StageEvent(stage="saving", message="saving the final adapter"))
        if not sharded:
            shutil.rmtree(tmp, ignore_errors=True)
            self.trainer.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        # peft's empty card template: `qlc export` writes the card a model is published with.
        (tmp / "README.md").unlink(missing_ok=True)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return target

    def cleanup(self) -> None:
        """After a run that did not fail: every rank waits for the others here, before rank 0
        announces the end, so rank 0 lets go of the run's lock only once every rank is done with
        it; then the process group closes. (A failed run returns at once: torchrun ends the other
        ranks, wherever they wait.)"""
        from engine.train.collectives import finish

        finish(self.ranks, self.timeouts)


RESUMED_ON_OTHER_DATA_HINT = (
    "the run goes on from its checkpoint over the data as prepared now; start a new run to train on "
    "one preparation throughout"
)


def data_changed(run_dir: Path, now: protocol.DataReady) -> str:
    """What differs between the data a resumed run prepares now and what its first session trained
    on ("" when nothing): the files are checked at resume (engine.run.fingerprint), but the rules
    that turn them into rows can change between versions (a new default, a masking rule)."""
    events, _ = runs.read_events(run_dir)
    first = next((e for e in events if isinstance(e, protocol.DataReady)), None)
    if first is None:
        return ""
    fields = ("train_examples", "eval_examples", "train_tokens", "trained_tokens")
    diffs = [f"{f.replace('_', ' ')} {getattr(first, f):,} -> {getattr(now, f):,}" for f in fields
             if getattr(first, f) != getattr(now, f)]  # fmt: skip
    return f"the data prepares differently than when the run started: {', '.join(diffs)}" if diffs else ""


def estimate_for_run(
    cfg: RunConfig,
    device: str,
    backend: str | None,
    checkpointed: int,
    world_size: int,
    liger: bool = False,
    even_rows: bool = False,
) -> tuple[Any, Any]:
    """(the estimate a run reports, the GPU it is checked against).

    On a GPU: this run's plan (the layers it checkpoints, its kernels), against hardware.gpu. On
    the CPU there is no GPU memory to compare with, so the figure is what the run would need on
    hardware.gpu, planned as there: the same estimate `qlc estimate` and the console's Memory pane
    show for the preset (the CPU run itself checkpoints every layer)."""
    from engine import memory

    # "auto" means the GPU present: with none there is no budget to check against.
    gpu = memory.resolve_gpu(cfg.hardware.gpu) if device == "cuda" or cfg.hardware.gpu != "auto" else None
    if world_size > 1:
        # What one GPU holds: this rank's share of the run, with the layers it checkpoints on a GPU.
        layers = checkpointed if device == "cuda" else None
        return memory.per_gpu.per_gpu(cfg, world_size, backend=backend, gpu=gpu, checkpointed=layers), gpu
    # gpu= also picks the card's class (its CUDA context and workspaces, engine/memory/devices.py).
    if device != "cuda":
        return memory.estimate(cfg, gpu=gpu), gpu
    est = memory.estimate(
        cfg, backend=backend, gpu=gpu, checkpointed=checkpointed, liger=liger, even_rows=even_rows
    )
    return est, gpu


def process_started_at() -> float:
    """When this run's launch started, in epoch seconds, else 0: the launch breakdown then starts
    at `hello`. The interpreter's own start and the imports before `hello` are what it measures
    (Unsloth's import alone takes about 30 s). A warm engine (engine.run.standby) counts from the
    start of the process that handed the run to it, whose imports it had done before."""
    from engine.run import proc

    return float(standby.served.get("started") or proc.started_at())


KEEP_WARM_AUTO_MIN = 10  # hardware.keep_warm: auto, on a GPU


def keep_warm(cfg: RunConfig, backend: str, device: str, emitter: Emitter) -> None:
    """Start a warm engine for the next launch (hardware.keep_warm; engine/run/standby.py)."""
    minutes = cfg.hardware.keep_warm
    if minutes == "auto":
        minutes = KEEP_WARM_AUTO_MIN if device == "cuda" else 0
    if not minutes:
        return
    try:
        pid = standby.spawn(backend, minutes, standby.launch_env or os.environ)
    except OSError as exc:
        emitter.log(f"no warm engine kept: {exc}", level="warning")
        return
    emitter.log(
        f"a warm engine (pid {pid}) imports {backend} and waits {minutes} min for the next launch "
        "from this environment; `qlc warm --stop` ends it, hardware.keep_warm: 0 keeps none"
    )


def count_params(model: Any) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        # bitsandbytes packs two 4-bit values per byte: count logical parameters.
        n = p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def run(
    run_dir: Path, emitter: Emitter, commands: CommandQueue, resume: bool = False, ranks: Ranks = Ranks()
) -> int:
    """Train (or resume) one run; returns the process exit code (0 ok or stopped, 1 failed).
    Every rank of a multi-process run calls this; rank 0's emitter alone writes anywhere."""
    started = time.time()
    recipe: Recipe | None = None
    status, failure = "failed", None
    adapter: str | None = None
    try:
        recipe = Recipe(run_dir, emitter, commands, resume=resume, ranks=ranks)
        recipe.hello()
        recipe.setup()
        recipe.train()
        failure = recipe.state.failure
        if failure is None:
            # A stop during the evaluation after the last step leaves every step done: completed.
            trained = recipe.trainer.state
            done = trained.max_steps > 0 and trained.global_step >= trained.max_steps
            status = "stopped" if recipe.state.stop_requested and not done else "completed"
            if status == "completed":
                adapter = str(recipe.save_checkpoint())
    except UserError as exc:
        failure = protocol.ErrorEvent(kind=getattr(exc, "kind", "input"), message=exc.message, hint=exc.hint)
    except BaseException as exc:
        step = recipe.trainer.state.global_step if recipe and recipe.trainer else None
        classified = failures.classify(exc, run_dir, step) if isinstance(exc, Exception) else None
        if classified is not None:
            failure = classified
        elif failures.is_oom(exc) and recipe is not None:
            failure = failures.out_of_memory(exc, recipe.cfg, step, recipe.backend_name)
        elif isinstance(exc, KeyboardInterrupt):
            failure = protocol.ErrorEvent(kind="interrupted", message="the engine was interrupted", step=step)
        else:
            traceback.print_exc()  # to engine.log: a bug, keep its traceback
            failure = protocol.ErrorEvent(
                kind="internal",
                step=step,
                message=f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                hint=f"details in {run_dir / runs.ENGINE_LOG}",
            )
    if failure is None and recipe is not None:
        try:
            recipe.cleanup()  # every rank meets here before the end is announced
        except UserError as exc:  # a rank that never came: one line, and the run failed
            failure = protocol.ErrorEvent(
                kind=getattr(exc, "kind", "input"), message=exc.message, hint=exc.hint
            )
        except Exception as exc:
            traceback.print_exc()
            failure = protocol.ErrorEvent(
                message=f"at the end of the run: {exc.__class__.__name__}: {str(exc)[:200]}",
                hint=f"details in {run_dir / runs.ENGINE_LOG}",
            )
    if failure is not None:
        emitter.emit(failure)
        status = "failed"
    if recipe is not None and recipe.backend is not None and not ranks.distributed:
        keep_warm(recipe.cfg, recipe.backend.name, recipe.device, emitter)
    state = recipe.state if recipe else RunState()
    last = runs.checkpoints(run_dir)
    emitter.emit(
        protocol.Finished(
            status=status,  # type: ignore[arg-type]
            step=recipe.trainer.state.global_step if recipe and recipe.trainer else 0,
            last_checkpoint=str(last[-1]) if last else None,
            adapter_path=adapter,
            final_loss=state.last_loss,
            elapsed_seconds=time.time() - started,
        )
    )
    if status == "failed" or recipe is None:
        return 1  # torchrun ends the other ranks, wherever they wait
    return 0
