"""ActivationMonitor: per-layer activation health, logged once per window."""

from __future__ import annotations

import re

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

from lightning_actguard import _compat
from lightning_actguard._warnings import ActGuardWarning
from lightning_actguard.activations import ExtraTypes, LayerPredicate, find_activation_layers, validate_extra_types
from lightning_actguard.callbacks import _loggers
from lightning_actguard.callbacks._engine_callback import EngineCallback, check_positive_int
from lightning_actguard.engine import DEFAULT_OVERHEAD_BUDGET, ActivationSettings, Engine
from lightning_actguard.snapshot import WindowSnapshot
from lightning_actguard.summary import print_summary, summary_table

_CHARTS = {
    "dead unit fraction": "act_dead_frac",
    "zero share": "act_zero_frac",
    "saturated share": "act_saturated_frac",
    "output mean": "act_out_mean",
    "output std": "act_out_std",
    "input mean": "act_in_mean",
    "input std": "act_in_std",
    "non-finite outputs": "act_nonfinite",
}


class ActivationMonitor(EngineCallback):
    r"""Measures the activation layers on the training batches and logs one summary per window.

    Statistics are accumulated on the model's device inside forward hooks and read back once
    per window (by default every ``trainer.log_every_n_steps`` optimizer steps) in a single
    transfer. Only training batches count: sanity checking, validation, test and prediction
    forwards, and forwards recomputed during backward, are not measured. Within the
    ``overhead_budget`` (1% of the step time by default, for everything the package's callbacks
    do) every batch is measured; when measuring costs more, every k-th batch is (the first of
    each window always), and ``act_measured_batches`` says how many were.

    Logged metrics (``<log_key_prefix><statistic>/<layer>``, one TensorBoard section per statistic):

    ========================  =================================================================
    ``act_dead_frac``         share of units that never rose above the floor in the window
    ``act_zero_frac``         share of outputs at or below a hard floor (ReLU's zeros), else == 0
    ``act_saturated_frac``    share of outputs within ``saturation_eps`` of a bound (bounded kinds)
    ``act_out_mean/std``      mean and standard deviation of the outputs
    ``act_in_mean/std``       mean and standard deviation of the inputs
    ``act_nonfinite``         number of NaN or infinite outputs
    ``act_out_hist``          histogram of one batch's outputs (TensorBoard, when asked for)
    ``act_measured_batches``  batches of the window that were measured (no layer suffix)
    ``act_overhead``          estimated share of the step time the callbacks took (no suffix)
    ========================  =================================================================

    A *unit* is the channel of an output with four or more dimensions and the last dimension
    otherwise; ``unit_dim`` overrides this. A module called several times in one forward (one
    ``self.act`` reused by every block) is reported once per call position, as ``name[0]``,
    ``name[1]``, ...

    Args:
        every_n_steps: window length in optimizer steps; ``None`` uses the trainer's
            ``log_every_n_steps``.
        overhead_budget: share of the training step time that the package's callbacks may take
            in all (default 0.01): measuring, their per-batch bookkeeping, and reading, logging
            and judging each window. After each window the engine measures only every k-th batch
            (always the window's first), with k chosen from its own measured cost to stay within
            the budget; the loss is still tracked on every batch. ``None`` measures every batch.
        extra_types: custom activation classes to monitor, or a mapping from such a class to the
            torch activation it behaves like (``{GELUActivation: "gelu"}``).
        name_pattern: regular expression; modules whose qualified name matches are monitored.
        predicate: ``(name, module) -> bool``; modules for which it is true are monitored.
        unit_dim: dimension that indexes units, or ``"auto"``.
        saturation_eps: distance from a bound that counts as saturated (default 0.01: there the
            sigmoid's derivative is 4% of its peak, tanh's 2%).
        max_calls_per_module: calls of one module per batch that are measured.
        histogram_every_n_steps: log a histogram of each layer's outputs (one batch) every this
            many steps, a multiple of the window; ``None`` for none.
        log_key_prefix: prepended to every logged key.
        print_summary: print a per-layer table at the end of training (rank zero).

    Raises:
        ValueError: an argument is out of range, at construction; the histogram interval is
            not a multiple of the window, at setup.

    Example::

        from pytorch_lightning import Trainer
        from lightning_actguard import ActivationMonitor

        trainer = Trainer(callbacks=[ActivationMonitor()])

    .. note::
        Under distributed training every statistic is summed across processes before it is
        logged, so each rank holds the same numbers at the same step; a unit is dead only if it
        never fired on any rank.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        extra_types: ExtraTypes = (),
        name_pattern: str | None = None,
        predicate: LayerPredicate | None = None,
        unit_dim: int | str = "auto",
        saturation_eps: float = 0.01,
        max_calls_per_module: int = 8,
        histogram_every_n_steps: int | None = None,
        log_key_prefix: str = "",
        print_summary: bool = True,
    ) -> None:
        super().__init__(every_n_steps, overhead_budget)
        check_positive_int("max_calls_per_module", max_calls_per_module)
        check_positive_int("histogram_every_n_steps", histogram_every_n_steps, allow_none=True)
        validate_extra_types(extra_types)
        if name_pattern is not None:
            try:
                re.compile(name_pattern)
            except re.error as error:
                raise ValueError(
                    f"`name_pattern` must be a regular expression, got {name_pattern!r}: {error}."
                ) from None
        if predicate is not None and not callable(predicate):
            raise ValueError(f"`predicate` must be callable as predicate(name, module), got {predicate!r}.")
        if not (unit_dim == "auto" or (isinstance(unit_dim, int) and not isinstance(unit_dim, bool))):
            raise ValueError(f"`unit_dim` must be 'auto' or an int, got {unit_dim!r}.")
        if not 0 < saturation_eps < 0.5:
            raise ValueError(f"`saturation_eps` must be in (0, 0.5), got {saturation_eps!r}.")
        self.extra_types = extra_types
        self.name_pattern = name_pattern
        self.predicate = predicate
        self.unit_dim = unit_dim
        self.saturation_eps = saturation_eps
        self.max_calls_per_module = max_calls_per_module
        self.histogram_every_n_steps = histogram_every_n_steps
        self.log_key_prefix = log_key_prefix
        self.print_summary = print_summary

    @override
    def configure_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: Engine) -> None:
        self.request_histograms(engine, self.histogram_every_n_steps)
        layers = find_activation_layers(
            pl_module, extra_types=self.extra_types, name_pattern=self.name_pattern, predicate=self.predicate
        )
        engine.use_activations(
            self, ActivationSettings(self.unit_dim, self.saturation_eps, self.max_calls_per_module), layers
        )
        if not layers:
            pl.utilities.rank_zero_warn(
                f"ActivationMonitor found no activation layers in {type(pl_module).__name__}. It looks for "
                "torch.nn activation modules (ReLU, GELU, Sigmoid, Tanh, ...); activations applied as functions "
                "(F.relu, torch.sigmoid) are invisible to it. Name custom activation modules with "
                "`extra_types=`, `name_pattern=` or `predicate=`.",
                category=ActGuardWarning,
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        _loggers.write_layout(trainer, _loggers.multiline_layout("activations", _CHARTS, self.log_key_prefix))

    @override
    def on_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: WindowSnapshot) -> None:
        prefix = self.log_key_prefix
        metrics, histograms = snapshot.activation_metrics(prefix), snapshot.activation_histograms(prefix)
        metrics[f"{prefix}act_measured_batches"] = float(snapshot.measured_batches)
        if snapshot.overhead is not None:
            metrics[f"{prefix}act_overhead"] = snapshot.overhead
        _loggers.write_window(trainer, metrics, histograms, _compat.logger_step(trainer))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        latest = self.snapshot
        if self.print_summary and latest is not None and latest.activations:
            rank_zero_only(print_summary)(summary_table(latest))
