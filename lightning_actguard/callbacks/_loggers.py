"""Writing snapshots to Lightning loggers: scalars to all, charts and histograms to TensorBoard."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from lightning_actguard.snapshot import ACTIVATION_STATISTICS, WindowSnapshot

_CHART_TITLES = {
    "act_dead_frac": "dead unit fraction",
    "act_zero_frac": "zero share",
    "act_saturated_frac": "saturated share",
    "act_out_mean": "output mean",
    "act_out_std": "output std",
    "act_in_mean": "input mean",
    "act_in_std": "input std",
    "act_nonfinite": "non-finite outputs",
}


def custom_scalars_layout(prefix: str, category: str = "activations") -> dict[str, dict[str, list]]:
    """A TensorBoard custom-scalars layout: one chart per statistic, every layer a line on it."""
    return {
        category: {
            _CHART_TITLES[statistic]: ["Multiline", [f"^{re.escape(prefix + statistic)}/"]]
            for statistic in ACTIVATION_STATISTICS
        }
    }


def _tensorboard_loggers(loggers: Iterable[pl.loggers.Logger]) -> list[TensorBoardLogger]:
    return [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]


@rank_zero_only
def write_activation_layout(trainer: pl.Trainer, prefix: str) -> None:
    """Add the custom-scalars layout to every TensorBoard logger of ``trainer``."""
    for logger in _tensorboard_loggers(trainer.loggers):
        logger.experiment.add_custom_scalars(custom_scalars_layout(prefix))


@rank_zero_only
def write_activations(trainer: pl.Trainer, snapshot: WindowSnapshot, prefix: str, step: int) -> None:
    """Log a snapshot's scalars to every logger and its histograms to TensorBoard."""
    metrics = snapshot.activation_metrics(prefix)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    for logger in _tensorboard_loggers(trainer.loggers):
        for name, layer in snapshot.activations.items():
            histogram = layer.histogram
            if histogram is None or not histogram.counts:
                continue
            logger.experiment.add_histogram_raw(
                f"{prefix}act_out_hist/{name}",
                min=histogram.minimum,
                max=histogram.maximum,
                num=histogram.count,
                sum=histogram.total,
                sum_squares=histogram.total_squares,
                bucket_limits=histogram.limits,
                bucket_counts=histogram.counts,
                global_step=step,
            )
    for logger in trainer.loggers:
        logger.save()
