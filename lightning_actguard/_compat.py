"""The one place that reads private Lightning attributes, each with a public fallback."""

from __future__ import annotations

import pytorch_lightning as pl


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning itself passes to loggers, so our curves line up with the user's."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))
