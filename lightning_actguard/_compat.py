"""The one place that reads private Lightning and PyTorch attributes, each with a public fallback."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning itself passes to loggers, so our curves line up with the user's."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The precision plugin's gradient scaler (fp16 mixed precision), if any."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def pending_grad_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The loss scale still multiplying the gradients when ``on_before_optimizer_step`` runs.

    Lightning unscales gradients before that hook, except for optimizers that unscale inside
    their own ``step()`` (fused Adam): their gradients still carry the scale. Returned as a
    device tensor, so dividing by it costs no host synchronisation.
    """
    scaler = grad_scaler(trainer)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else torch.tensor(scaler.get_scale())


def tensorboard_event_writer(logger: TensorBoardLogger) -> tuple[Any, str] | None:
    """The event-file writer behind a TensorBoard logger and the prefix its ``log_metrics`` adds to keys.

    ``None`` when the writer is not ``torch.utils.tensorboard``'s (tensorboardX), or when the
    logger no longer names its prefix: callers then go through ``log_metrics``.
    """
    writer = getattr(logger.experiment, "file_writer", None)
    prefix = getattr(logger, "_prefix", None)
    if writer is None or not hasattr(writer, "add_summary") or not isinstance(prefix, str):
        return None
    return writer, f"{prefix}{logger.LOGGER_JOIN_CHAR}" if prefix else ""
