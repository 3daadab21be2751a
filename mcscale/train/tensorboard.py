"""Optional TensorBoard logging of the scalars that also go to log.jsonl (``RUN/tensorboard/``).

TensorBoard is an optional extra: when it is asked for but not installed, one notice and no logging,
never a failed run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

TB_DIR = "tensorboard"


def _scalars(values: dict):
    """(name, float) for every finite number; lists (weights, per_class), None and the step itself are left out."""
    for key, value in values.items():
        if key == "step" or isinstance(value, (list, tuple, dict, str)) or value is None:
            continue
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            yield key, float(value)


class ScalarWriter:
    """``step(record)`` for per-step records, ``eval(step, metrics)`` for evaluations; a no-op when disabled.

    ``purge_step``: on resume, the step of the checkpoint; TensorBoard then drops what an earlier
    process logged after it (as ``JsonlLog`` does for log.jsonl), so curves do not double back.
    """

    def __init__(self, run_dir, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("mcscale: logging.tensorboard is on but the tensorboard package is not installed;"
                  " no TensorBoard logs (install the `tensorboard` extra)", file=sys.stderr)
            return
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def step(self, record: dict) -> None:
        if self.writer is None or "step" not in record:
            return
        for key, value in _scalars(record):
            self.writer.add_scalar(f"train/{key}", value, record["step"])

    def eval(self, step: int, metrics: dict) -> None:
        if self.writer is None:
            return
        for key, value in _scalars(metrics):
            self.writer.add_scalar(f"eval/{key}", value, step)
        self.writer.flush()  # evaluations are rare: make them visible to a running TensorBoard at once

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
