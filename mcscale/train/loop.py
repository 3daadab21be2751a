"""The one training loop of every stage (``run_steps``) and what it checks between steps: signals,
non-finite losses, the checkpoint schedule."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mcscale.errors import RunError, StopRequested
from mcscale import parallel
from mcscale.data.loading import load_views
from mcscale.models.global_bn import convert_batchnorm
from mcscale.parallel import COMM
from mcscale.progress import progress


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


class StepGuard:
    """What a training loop checks between steps.

    - SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before a kill) set a flag; the loop writes a
      checkpoint at the next step boundary and stops cleanly.
    - A non-finite loss skips the update; after ``max_nonfinite`` in a row the run stops, its last
      good checkpoint intact.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self, max_nonfinite: int = 5, saved_step: int | None = None):
        self.max_nonfinite = max_nonfinite
        self.saved_step = saved_step  # step of the newest checkpoint on disk (None: none yet)
        self.consecutive = 0
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def stop_requested(self) -> bool:
        return self.signal_name is not None

    def loss_is_finite(self, loss: torch.Tensor, step: int, indices) -> bool:
        if bool(torch.isfinite(loss.detach()).all()):
            self.consecutive = 0
            return True
        self.consecutive += 1
        if self.consecutive >= self.max_nonfinite:
            kept = (f"the last good checkpoint (step {self.saved_step}) is kept" if self.saved_step is not None
                    else "no checkpoint was written yet")
            raise RunError(
                f"step {step}: {self.consecutive} non-finite losses in a row (last batch indices"
                f" {list(map(int, indices[:8]))}...); {kept}; lower the learning rate"
                " or check the data for NaN/inf"
            )
        return False

    def end_of_step(self, step: int, total: int, every: int, save, run_dir, agree=None) -> None:
        """Checkpoint on schedule, at the end, or when asked to stop; then stop if asked.

        ``agree(flag) -> bool`` (several ranks): true on every rank when any rank was signalled, so
        all ranks checkpoint and stop at the same step.
        """
        stop = self.stop_requested if agree is None else agree(self.stop_requested)
        if stop and self.signal_name is None:
            self.signal_name = "a signal to another rank"
        if step % every == 0 or step == total or stop:
            save()
            self.saved_step = step
        if stop and step < total:
            raise StopRequested(
                f"stopped by {self.signal_name} at step {step}; checkpoint written to {run_dir};"
                " continue with the same command and --resume auto"
            )

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def rows_per_step(key: str, batch_size: int, num_samples: int, par) -> int:
    """Samples in each global batch: ``batch_size``, or the whole set when that is smaller (said once)."""
    if batch_size > num_samples and par.is_main:
        print(f"mcscale: {key} {batch_size} is larger than the {num_samples} samples; every step uses all "
              f"{num_samples}")
    return min(batch_size, num_samples)


@dataclass
class StepResult:
    """What a stage's forward pass gives the loop for one step.

    ``loss``: what to back-propagate (this rank's part); None when the stage skips the batch (a method
    with nothing confident to learn from). ``global_loss``: the global batch's loss, the same on every
    rank, for the finiteness decision and the log (default: ``loss``). ``record``: the stage's
    per-step values for log.jsonl (statistics, estimated weights)."""

    loss: torch.Tensor | None
    global_loss: torch.Tensor | None = None
    record: dict = field(default_factory=dict)


@dataclass
class Schedule:
    """How many steps a stage runs, how long an epoch is and when it checkpoints."""

    total: int
    per_epoch: int
    checkpoint_every: int


def run_steps(*, name: str, par, views, seed: int, batch_size: int, batch_key: str, model: torch.nn.Module,
              optimizer: torch.optim.Optimizer, schedule: Schedule, step: int, saved_step: int | None, log,
              forward: Callable[[int, object], StepResult], save: Callable[[int, int], None], out,
              max_nonfinite: int, after_step: Callable[[int, bool], dict] | None = None,
              every_step: Callable[[int], None] | None = None, skipped: int = 0,
              counts_skips: bool = False) -> tuple[int, int]:
    """The one step loop of every stage, from ``step`` to ``schedule.total``.

    Each step: the global batch's two views (this rank's rows), ``forward`` -> StepResult, the update
    (zero_grad, backward, gradient average over the ranks, optimizer step) unless the loss is None or
    not finite, ``after_step(step, updated)`` (schedules, EMA; its dict joins the record), the log
    record, the progress bar, ``every_step(step)`` (evaluations), then the checkpoint schedule and the
    stop-on-signal check. ``save(step, skipped)`` writes a checkpoint. ``counts_skips``: the stage can skip
    batches, so each record says whether it did and how many so far. Returns (step, skipped batches)."""
    rows = rows_per_step(batch_key, batch_size, len(views), par)
    bar = progress(total=schedule.total * rows, initial=step * rows, desc=name, unit="img", unit_scale=True,
                   step_size=rows, disable=not par.is_main)
    guard = StepGuard(max_nonfinite, saved_step=saved_step)
    model.train()
    COMM.reset()
    try:
        while step < schedule.total:
            batch = views.two_views(seed, step, batch_size, par.rank, par.world_size)
            result = forward(step, batch)
            value = result.global_loss if result.global_loss is not None else result.loss
            # the loss is the global batch's on every rank: all ranks take the same decision here
            finite = value is None or guard.loss_is_finite(value, step, batch.index)
            updated = result.loss is not None and finite
            if result.loss is None:
                skipped += 1
            elif finite:
                optimizer.zero_grad(set_to_none=True)
                result.loss.backward()
                par.average_gradients(model.parameters())
                optimizer.step()
            extra = after_step(step, updated) if after_step else {}
            step += 1
            record = {"step": step, "epoch": (step - 1) // schedule.per_epoch,
                      "loss": float(value.detach()) if updated else None, **result.record,
                      "lr": optimizer.param_groups[0]["lr"], **extra}
            if counts_skips:
                record.update({"skipped": result.loss is None, "skipped_total": skipped})
            if par.active:
                record["comm_bytes"] = COMM.take()  # this rank's messages in this step's collectives
            if not finite:
                record.update({"nonfinite": True, "indices": batch.index.tolist()})
            if log:
                log.step(record)
            loss_text = "skip" if result.loss is None else "nan" if not finite else f"{record['loss']:.3f}"
            bar.set_postfix(loss=loss_text, **({"skipped": skipped} if skipped else {}))
            bar.update(rows)
            if every_step:
                every_step(step)
            guard.end_of_step(step, schedule.total, schedule.checkpoint_every, lambda: save(step, skipped), out,
                              agree=par.any)
    finally:
        guard.close()
        bar.close()
    return step, skipped


def start_stage(cfg, batch_size: int, batch_key: str, force_cpu: bool):
    """What every training stage does first: refuse a global batch the ranks cannot share, join the
    process group, seed, and load the data (before the run folder exists, so a source or loader that
    fails to start leaves no folder behind). Returns (par, subset, class counts, views)."""
    parallel.check_global_batch(batch_size, parallel.launched_world_size(), batch_key, cfg.distributed.sync_batchnorm)
    par = parallel.setup(cfg.device, force_cpu)
    seed_everything(cfg.seed)
    subset, counts, views = load_views(cfg, par.device, batch_size, par)
    return par, subset, counts, views


def share_model(model: torch.nn.Module, par, cfg) -> None:
    """Global-batch BatchNorm (``distributed.sync_batchnorm``) and rank 0's weights on every rank."""
    if par.active and cfg.distributed.sync_batchnorm:
        convert_batchnorm(model)
    par.broadcast_state(model)
