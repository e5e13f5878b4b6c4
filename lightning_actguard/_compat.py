"""The one place that reads private Lightning and PyTorch attributes, each with a public fallback."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
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
