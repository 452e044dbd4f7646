"""One training run, backend-agnostic: setup (model, adapters, data, trainer), train, save, cleanup.

The trainer talks to the outside through `EngineCallback`: it turns the trainer's logs into step
events, applies commands at optimizer-step boundaries (stop, save, sample), and refuses to save a
checkpoint once the loss is no longer finite.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import __version__, allocator, checkpoints, failures, faults, fingerprint, protocol, runs
from engine.backends import batches_padding_free
from engine.backends.checkpointing import CheckpointPlan, plan_checkpointing
from engine.config import RunConfig, load_resolved
from engine.control import CommandQueue
from engine.distributed import Ranks
from engine.errors import UserError
from engine.events import Emitter

GIB = 1024**3


def host_rss_gb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    except (OSError, ValueError):
        return None


def cuda_memory() -> dict[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "memory_allocated_gb": torch.cuda.memory_allocated() / GIB,
        "memory_reserved_gb": torch.cuda.memory_reserved() / GIB,
        "memory_peak_allocated_gb": torch.cuda.max_memory_allocated() / GIB,
        "memory_peak_reserved_gb": torch.cuda.max_memory_reserved() / GIB,
    }


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


@dataclass
class RunState:
    """What the callback learns during training, read back by the recipe when training ends."""

    stop_requested: bool = False
    failure: protocol.ErrorEvent | None = None
    last_loss: float | None = None
    last_checkpoint: str | None = None
    total_steps: int = 0
    first_step: int = 0
    started: float = field(default_factory=time.time)


def _make_callback(
    emitter: Emitter,
    commands: Any,
    state: RunState,
    tokenizer: Any,
    template: str,
    ranks: Ranks = Ranks(),
    device: str = "cpu",
    sharded: bool = False,
) -> Any:
    from transformers import TrainerCallback

    from engine import collectives
    from engine.sampling import generate

    class EngineCallback(TrainerCallback):
        def __init__(self) -> None:
            self._last_time = 0.0
            self._last_step = 0
            self._last_tokens = 0
            self._step_seconds: float | None = None

        def on_train_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            reset_peak_memory()  # the peaks a step reports are training's, not the load's
            state.total_steps = st.max_steps
            state.first_step = st.global_step
            self._last_step = st.global_step
            self._last_time = time.perf_counter()
            emitter.emit(
                protocol.StageEvent(
                    stage="training",
                    message=f"training {st.max_steps} steps",
                    current=st.global_step,
                    total=st.max_steps,
                )
            )

        def on_step_end(self, args: Any, st: Any, control: Any, model: Any = None, **kw: Any) -> None:
            for command in commands.drain():
                if isinstance(command, protocol.Stop):
                    if state.stop_requested:  # a second console's stop, or a second Ctrl-C
                        emitter.log("already stopping", level="debug")
                        continue
                    state.stop_requested = True
                    control.should_training_stop = True
                    control.should_save = command.save
                    emitter.log(
                        f"stopping after step {st.global_step}"
                        + (", saving a checkpoint" if command.save else "")
                    )
                elif isinstance(command, protocol.Save):
                    control.should_save = True
                elif isinstance(command, protocol.SampleRequest) and collectives.samples_here(ranks, sharded):
                    t0 = time.perf_counter()
                    generate(
                        model,
                        tokenizer,
                        command,
                        emitter,
                        source="live",
                        step=st.global_step,
                        template=template,
                        # Sharded ranks generate together: the same draws keep them in step.
                        seed=st.global_step if sharded else None,
                    )
                    self._last_time += time.perf_counter() - t0  # sampling is not training time

        def on_log(
            self, args: Any, st: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            logs = logs or {}
            if "eval_loss" in logs:
                loss = logs["eval_loss"]
                emitter.emit(
                    protocol.Eval(
                        step=st.global_step, loss=loss, perplexity=math.exp(loss) if loss < 50 else None
                    )
                )
            if "loss" not in logs:
                return
            loss = float(logs["loss"])
            now = time.perf_counter()
            steps = max(st.global_step - self._last_step, 1)
            seconds = (now - self._last_time) / steps
            # The trainer's exact count (engine.backends.safe_trainer), restored on resume; TRL's
            # own only where a patched training loop skipped it.
            tokens = int(logs.get("num_input_tokens_seen") or logs.get("num_tokens", 0))
            tok_s = (
                (tokens - self._last_tokens) / max(now - self._last_time, 1e-9) if self._last_tokens else 0.0
            )
            # An exponential average: one slow step (a save, a sample) must not swing the ETA.
            self._step_seconds = (
                seconds if self._step_seconds is None else 0.8 * self._step_seconds + 0.2 * seconds
            )
            remaining = max(st.max_steps - st.global_step, 0)
            rss = host_rss_gb()
            devices = collectives.gather_devices(ranks, device, rss)  # every rank calls: a collective
            emitter.emit(
                protocol.Step(
                    step=st.global_step,
                    total_steps=st.max_steps,
                    epoch=float(st.epoch or 0.0),
                    loss=loss,
                    lr=float(logs.get("learning_rate", 0.0)),
                    grad_norm=logs.get("grad_norm"),
                    tokens_seen=tokens,
                    tokens_per_s=tok_s,
                    step_seconds=seconds,
                    elapsed_seconds=time.time() - state.started,
                    eta_seconds=remaining * self._step_seconds,
                    host_rss_gb=rss,
                    devices=devices,
                    **cuda_memory(),
                )
            )
            self._last_time, self._last_step, self._last_tokens = now, st.global_step, tokens
            if math.isfinite(loss):
                state.last_loss = loss
            else:
                # Keep the last good checkpoint: never save weights trained on a non-finite loss.
                first = int(logs.get("nonfinite_since_step", st.global_step))
                state.failure = failures.nonfinite_loss(loss, first, st.global_step)
                control.should_training_stop = True
                control.should_save = False

        def on_save(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir) / f"{runs.CHECKPOINT_PREFIX}{st.global_step}"
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
            state.last_checkpoint = path.name
            emitter.emit(protocol.CheckpointSaved(step=st.global_step, path=str(path), size_mb=size / 2**20))

    return EngineCallback()


class Recipe:
    """setup -> train -> save -> cleanup, for one run directory."""

    def __init__(
        self,
        run_dir: Path,
        emitter: Emitter,
        commands: CommandQueue,
        resume: bool = False,
        ranks: Ranks = Ranks(),
    ) -> None:
        from engine.collectives import SharedCommands

        self.run_dir = run_dir
        self.emitter = emitter
        self.ranks = ranks
        self.commands = SharedCommands(commands, ranks)  # rank 0's commands, on every rank
        self.resume = resume
        self.cfg: RunConfig = load_resolved(run_dir / runs.CONFIG)
        self.state = RunState()
        self.trainer: Any = None
        self.tokenizer: Any = None
        self.resume_from: Path | None = None
        self.padding_free = False  # one padding-free row per micro-batch (the Unsloth backend)

    def hello(self) -> None:
        from engine.backends import choose_backend, choose_device
        from engine.distributed import describe

        self.device = choose_device(self.cfg)
        self.backend, reason = choose_backend(self.cfg, self.device, self.ranks.world_size)
        if self.backend == "unsloth":
            from engine.backends import unsloth

            unsloth.preload()  # before anything imports transformers, peft or TRL
        plan = faults.plan_from_env()
        # What an engine killed mid-save left behind. Rank 0 holds the run's lock; the others
        # wait for it at the first collective.
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
        device = self.device
        if device == "cuda":
            import torch

            torch.cuda.set_device(self.ranks.local_rank)  # this rank's GPU, before anything lands on one
            device = f"cuda:{self.ranks.local_rank} ({torch.cuda.get_device_name(self.ranks.local_rank)})"
        device = describe(self.ranks, self.cfg.hardware.strategy, device)
        self.emitter.emit(
            protocol.Hello(
                engine_version=__version__,
                run_id=self.run_dir.name,
                pid=os.getpid(),
                mode="resume" if self.resume else "train",
                resumed_from=self.resume_from.name if self.resume_from else None,
                backend=self.backend,
                backend_reason=reason,
                device=device,
                world_size=self.ranks.world_size,
                trust_remote_code=self.cfg.model.trust_remote_code,
            )
        )
        if self.device == "cuda":
            self.emitter.log(allocator.describe())
        if plan.armed:
            self.emitter.log(f"fault injection armed ({faults.ENV}={plan.describe()})", level="warning")
        for name in removed:
            self.emitter.log(f"removed {name}: an incomplete save from an earlier session")
        for path, reason in skipped:
            self.emitter.emit(
                protocol.WarningEvent(
                    message=f"{path.name} is damaged ({reason}); resuming from {self.resume_from.name}",
                    hint="the damaged checkpoint is left in place for inspection",
                )
            )
        if self.resume:
            fingerprint.check(self.run_dir, self.cfg, full=True)

    def _checkpointing(self, path: str) -> CheckpointPlan:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            path, revision=self.cfg.model.revision, trust_remote_code=self.cfg.model.trust_remote_code
        )
        layers = int(getattr(config.get_text_config(), "num_hidden_layers", 0) or 0)
        return plan_checkpointing(self.cfg, self.backend, self.device, layers)

    def setup(self) -> None:
        from engine import data
        from engine.backends import hf, parallel
        from engine.data.report import steps

        cfg, emit = self.cfg, self.emitter.emit
        emit(protocol.StageEvent(stage="loading_model", message=f"loading {cfg.model.name_or_path}"))
        t0 = time.perf_counter()
        path = hf.resolve_model_path(cfg)
        self.tokenizer = hf.load_tokenizer(cfg, path)
        # Decided before the weights load: the GPU's free memory is the budget auto spends.
        self.checkpointing = gc = self._checkpointing(path)
        emit(
            protocol.StageEvent(
                stage="quantizing",
                message="loading weights as 4-bit NF4" if cfg.quant.load_in_4bit else "loading weights",
            )
        )
        # LoRA's A matrices are drawn at random when the adapters are created, before the trainer
        # seeds anything: seed here, or two runs of one preset start from different adapters.
        from transformers import set_seed

        kernels: list[str] = []
        if self.backend == "unsloth":
            from engine.backends import unsloth

            model = unsloth.load_model(cfg, path, gc)
            set_seed(cfg.train.seed)
            model = unsloth.apply_lora(model, cfg, gc)
            kernels = ["unsloth: fused RMSNorm, RoPE, SwiGLU, LoRA, cross-entropy"]
        else:
            model = hf.load_model(cfg, self.device, path, ranks=self.ranks)
            kernels = hf.apply_kernels(model, cfg, self.device)
            set_seed(cfg.train.seed)
            model = hf.apply_lora(model, cfg, gc, ranks=self.ranks)
        self.kernels = kernels
        self.padding_free = batches_padding_free(self.backend, model)
        total, trainable = hf.count_params(model)
        mem = cuda_memory()
        emit(
            protocol.ModelReady(
                total_params=total,
                trainable_params=trainable,
                quantized=cfg.quant.load_in_4bit,
                memory_allocated_gb=mem.get("memory_allocated_gb"),
                memory_reserved_gb=mem.get("memory_reserved_gb"),
                host_rss_gb=host_rss_gb(),
                load_seconds=time.perf_counter() - t0,
                layers=gc.layers,
                checkpointed_layers=gc.checkpointed,
                checkpoint_reason=gc.reason,
                kernels=kernels,
            )
        )
        self._emit_estimate()

        emit(protocol.StageEvent(stage="preparing_data", message=f"preparing {cfg.data.source}"))
        if not self.resume and self.ranks.is_main:
            fingerprint.record(self.run_dir, cfg)  # what a later resume checks against

        # Progress (examples/s, ETA) comes as StageEvents; the prepared rows are cached on disk,
        # so a resume (or a run after `qlc data`) reuses them.
        prepared = data.prepare(cfg, self.tokenizer, emit)
        prepared.collator.padding_free = self.padding_free
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
        emit(
            protocol.DataReady(
                train_examples=r.examples,
                eval_examples=r.eval_examples,
                train_tokens=r.tokens_per_epoch,
                trained_tokens=r.trained_tokens_per_epoch,
                truncated=r.truncated,
                dropped=r.dropped,
                steps_per_epoch=per_epoch,  # each step takes micro_batch x grad_accum rows per rank
                total_steps=total,
            )
        )
        callback = _make_callback(
            self.emitter,
            self.commands,
            self.state,
            self.tokenizer,
            template,
            self.ranks,
            self.device,
            sharded=parallel.sharded(cfg, self.ranks),
        )
        self.trainer = hf.build_trainer(
            model,
            self.tokenizer,
            cfg,
            prepared,
            self.run_dir / runs.CHECKPOINTS,
            self.device,
            [callback],
            trainer_checkpointing=gc.enabled and self.backend == "hf",
            ranks=self.ranks,
        )

    def _emit_estimate(self) -> None:
        """The memory model's estimate, for the dashboard's estimate-versus-actual. Never fatal."""
        try:
            from engine import memory
            from engine.memory.distributed import per_gpu

            # "auto" means the GPU present: with none there is no budget to check against.
            cfg_gpu = self.cfg.hardware.gpu
            gpu = memory.resolve_gpu(cfg_gpu) if self.device == "cuda" or cfg_gpu != "auto" else None
            if self.ranks.world_size > 1:
                # What one GPU holds: this rank's share of the run.
                est = per_gpu(self.cfg, self.ranks.world_size, backend=self.backend)
            else:
                est = memory.estimate(
                    self.cfg,
                    backend=self.backend,
                    budget_gb=gpu.budget_gb if gpu else None,
                    checkpointed=self.checkpointing.checkpointed,
                    liger=any(k.startswith("liger") for k in self.kernels),
                )
            self.emitter.emit(est.to_event(gpu))
        except Exception as exc:  # an estimate must never stop a run
            self.emitter.log(f"no memory estimate: {exc}", level="debug")

    def train(self) -> None:
        self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)

    def save_adapter(self) -> Path:
        """The final adapter, written to a temporary folder and renamed: never half-written.
        Rank 0 writes it; with FSDP every rank takes part in gathering the sharded adapter."""
        from engine.backends import parallel

        target = self.run_dir / runs.ADAPTER
        tmp = self.run_dir / f".{runs.ADAPTER}.tmp"
        if parallel.sharded(self.cfg, self.ranks):
            if self.ranks.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self.trainer.save_model(str(tmp))  # gathers on every rank, writes on rank 0
        if not self.ranks.is_main:
            return target
        self.emitter.emit(protocol.StageEvent(stage="saving", message="saving the final adapter"))
        if not parallel.sharded(self.cfg, self.ranks):
            shutil.rmtree(tmp, ignore_errors=True)
            self.trainer.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return target


def is_oom(exc: BaseException) -> bool:
    name = exc.__class__.__name__
    text = str(exc).lower()
    # "can't allocate memory": torch's CPU allocator, which raises a plain RuntimeError.
    return (
        name == "OutOfMemoryError"
        or isinstance(exc, MemoryError)
        or "out of memory" in text
        or "can't allocate memory" in text
    )


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
            status = "stopped" if recipe.state.stop_requested else "completed"
            if status == "completed":
                adapter = str(recipe.save_adapter())
    except UserError as exc:
        failure = protocol.ErrorEvent(kind=getattr(exc, "kind", "input"), message=exc.message, hint=exc.hint)
    except BaseException as exc:
        step = recipe.trainer.state.global_step if recipe and recipe.trainer else None
        classified = failures.classify(exc, run_dir, step) if isinstance(exc, Exception) else None
        if classified is not None:
            failure = classified
        elif is_oom(exc) and recipe is not None:
            failure = failures.out_of_memory(exc, recipe.cfg, step, getattr(recipe, "backend", None))
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
    if failure is not None:
        emitter.emit(failure)
        status = "failed"
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
    if status == "failed":
        return 1  # torchrun ends the other ranks, wherever they wait
    from engine.collectives import barrier

    barrier()  # rank 0 lets go of the run's lock only once every rank is done with it
    return 0
