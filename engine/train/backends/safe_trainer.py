"""What a transformers Trainer needs to survive faults, as a mixin placed before it:

- Checkpoints are written into a staging folder and committed (manifest, fsync, rename) by
  engine.run.checkpoints: a kill or a full disk never leaves a partial checkpoint under a real name.
  Old checkpoints are rotated by step, through the same rename-first removal.
- A save that fails (ENOSPC above all) removes its partial folder and ends the run with one clear
  error naming the checkpoint that is still intact.
- No checkpoint is ever written once a loss went non-finite. The first such step is tracked on the
  device (no sync per step); it is read at log and save time only.
- The fault hooks of engine.train.faults ($QLC_FAULT), inert when it is unset.
- Tokens trained on are counted exactly (see _track_num_input_tokens), kept in the trainer state
  so that a resumed run goes on counting from its checkpoint.

On several processes (torchrun), every rank runs these hooks at the same points. The main process
alone makes, commits and rotates the staging folder; the others write their parts (their RNG
states, FSDP's gathered state goes through the main one) between barriers. The non-finite step is
reduced over the ranks, so that all of them stop, or save, together.

Used as `class EngineTrainer(SafeTrainerMixin, SFTTrainer)`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from engine.run import checkpoints
from engine.train import failures
from engine.train.faults import FaultInjector
from engine.train.state import EvalInterrupted

MODEL_CARD = "README.md"


class SafeTrainerMixin:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = FaultInjector.from_env()
        self._staging_root: str | None = None
        self._first_nonfinite: Any = None  # a 0-d tensor on the loss's device: 0, or the step
        self._tokens_pending: Any = None  # tokens since the last log or save, on the device

    # ---- training ---------------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.faults.at_train_begin()
        return super().train(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """An evaluation a stop interrupted (engine.train.callback) has no metrics; training then
        stops as the callback asked."""
        try:
            return super().evaluate(*args, **kwargs)
        except EvalInterrupted:
            return {}

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        step = self.state.global_step + 1
        self.faults.before_step(step)
        loss = super().training_step(*args, **kwargs)
        self._track_nonfinite(loss, step)
        return loss

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        out = super().compute_loss(model, inputs, *args, **kwargs)
        if not model.training or self.faults.plan.nan_at_step is None:
            return out
        step = self.state.global_step + 1
        if isinstance(out, tuple):
            return (self.faults.poison_loss(out[0], step), *out[1:])
        return self.faults.poison_loss(out, step)

    def _track_num_input_tokens(self, inputs: Any) -> None:
        """Count the micro-batch's tokens: its attention mask where it has one, else every position
        (equal-length rows and the padding-free row hold no padding; packed rows only a few
        positions at a row's end, which are computed too).

        Replaces transformers' count, whose "non_padding" mode takes a row without a mask for
        padding wherever it holds pad_token_id (often eos, a real token), and TRL's, which counts a
        batch of position_ids as one row. The sum stays on the device until a log or a save.
        """
        import torch

        mask = inputs.get("attention_mask")
        count = mask.sum() if mask is not None else inputs["input_ids"].numel()
        if self._tokens_pending is None:
            self._tokens_pending = torch.zeros((), dtype=torch.long, device=self.args.device)
        if isinstance(count, torch.Tensor):
            count = count.to(self._tokens_pending.device, non_blocking=True)
        self._tokens_pending += count

    def _fold_tokens(self) -> None:
        """Add the pending count, summed over the ranks, to the trainer state (saved with each
        checkpoint). A collective with several ranks: every rank calls it at each log and save."""
        import torch
        import torch.distributed as dist

        pending = self._tokens_pending
        if pending is None:
            pending = torch.zeros((), dtype=torch.long, device=self.args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(pending, op=dist.ReduceOp.SUM)
        self.state.num_input_tokens_seen += int(pending.item())
        self._tokens_pending = None

    def _track_nonfinite(self, loss: Any, step: int) -> None:
        import torch

        bad = ~torch.isfinite(loss.detach())
        if self._first_nonfinite is None:
            self._first_nonfinite = torch.zeros((), dtype=torch.long, device=loss.device)
        self._first_nonfinite = torch.where((self._first_nonfinite == 0) & bad, step, self._first_nonfinite)

    def first_nonfinite_step(self) -> int | None:
        """The first optimizer step whose loss was NaN or infinite on any rank, or None. Syncs the
        device; with several ranks it is a collective (every rank calls it at a log or a save)."""
        import torch
        import torch.distributed as dist

        never = 2**62
        if self._first_nonfinite is None:
            first = torch.full((), never, dtype=torch.long, device=self.args.device)
        else:
            first = torch.where(self._first_nonfinite == 0, never, self._first_nonfinite)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        value = int(first.item())
        return None if value == never else value

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        self._fold_tokens()  # transformers logs state.num_input_tokens_seen
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            # The logged loss averages the steps since the last log: name the step it went bad at.
            logs["nonfinite_since_step"] = self.first_nonfinite_step() or self.state.global_step
        super().log(logs, *args, **kwargs)

    # ---- checkpoints ------------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being saved, the trainer writes it into the staging folder.
        return self._staging_root or super()._get_output_dir(trial)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        self.faults.in_save(output_dir)
        super()._save_optimizer_and_scheduler(output_dir)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL writes a draft card ("a fine-tuned version of [None]") into checkpoints/ at every
        save. The run's card is written by `qlc export`, from the run's config and events."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        step = self.state.global_step
        self._fold_tokens()  # into the trainer state the checkpoint keeps
        bad = self.first_nonfinite_step()
        if bad is not None:  # never save weights trained on a non-finite loss
            raise failures.RunFailure(failures.nonfinite_loss(math.nan, bad, step))
        root = Path(self.args.output_dir)
        staging = checkpoints.staging_root(root, step)
        main = self.args.should_save
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700, parents=True)
        previous = checkpoints.complete(root)
        self._staging_root = str(staging)
        try:
            self.accelerator.wait_for_everyone()  # the staging folder exists for every rank
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's files are in it
            if main:
                # peft's model card template (no model, no data named): `qlc export` writes the
                # card a model is published with.
                (staging / f"{checkpoints.PREFIX}{step}" / MODEL_CARD).unlink(missing_ok=True)
                checkpoints.commit(staging / f"{checkpoints.PREFIX}{step}", root)
        except Exception as exc:
            free = checkpoints.free_bytes(root)  # before the partial folder gives its space back
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            needed = checkpoints.folder_size(previous[-1]) if previous else None
            raise failures.RunFailure(failures.save_failed(exc, root, step, free, needed)) from exc
        finally:
            self._staging_root = None
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            checkpoints.rotate(root, self.args.save_total_limit or 1_000_000)
        self.accelerator.wait_for_everyone()  # the checkpoint is in place before any rank goes on
