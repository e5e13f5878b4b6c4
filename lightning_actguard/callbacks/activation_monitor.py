"""ActivationMonitor: per-layer activation health, logged once per window."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_actguard import _compat
from lightning_actguard._warnings import ActGuardWarning
from lightning_actguard.activations import ExtraTypes, LayerPredicate, validate_extra_types
from lightning_actguard.callbacks import _loggers
from lightning_actguard.engine import ActivationEngine, CollectorSettings, acquire
from lightning_actguard.snapshot import ActivationSnapshot
from lightning_actguard.summary import print_summary

_DEFAULT_WINDOW = 50


class ActivationMonitor(Callback):
    r"""Measures every activation layer on every training batch and logs one summary per window.

    Statistics are accumulated on the model's device inside forward hooks and read back once
    per window (by default every ``trainer.log_every_n_steps`` optimizer steps) in a single
    transfer. Only training batches count: sanity checking, validation, test and prediction
    forwards, and forwards recomputed during backward, are not measured.

    Logged metrics (``<log_key_prefix><statistic>/<layer>``, one TensorBoard section per statistic):

    ======================  =================================================================
    ``act_dead_frac``       share of units that never rose above the floor in the window
    ``act_zero_frac``       share of outputs at or below a hard floor (ReLU's zeros), else == 0
    ``act_saturated_frac``  share of outputs within ``saturation_eps`` of a bound (bounded kinds)
    ``act_out_mean/std``    mean and standard deviation of the outputs
    ``act_in_mean/std``     mean and standard deviation of the inputs
    ``act_nonfinite``       number of NaN or infinite outputs
    ``act_out_hist``        histogram of one batch's outputs (TensorBoard, when asked for)
    ======================  =================================================================

    A *unit* is the channel of an output with four or more dimensions and the last dimension
    otherwise; ``unit_dim`` overrides this. A module called several times in one forward (one
    ``self.act`` reused by every block) is reported once per call position, as ``name[0]``,
    ``name[1]``, ...

    Args:
        every_n_steps: window length in optimizer steps; ``None`` uses the trainer's
            ``log_every_n_steps``.
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
        _check_positive("every_n_steps", every_n_steps, allow_none=True)
        _check_positive("max_calls_per_module", max_calls_per_module)
        _check_positive("histogram_every_n_steps", histogram_every_n_steps, allow_none=True)
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
        self.every_n_steps = every_n_steps
        self.extra_types = extra_types
        self.name_pattern = name_pattern
        self.predicate = predicate
        self.unit_dim = unit_dim
        self.saturation_eps = saturation_eps
        self.max_calls_per_module = max_calls_per_module
        self.histogram_every_n_steps = histogram_every_n_steps
        self.log_key_prefix = log_key_prefix
        self.print_summary = print_summary
        self._engine: ActivationEngine | None = None
        self._last_snapshot: ActivationSnapshot | None = None

    @property
    def snapshot(self) -> ActivationSnapshot | None:
        """Statistics of the last completed window, or ``None`` before the first one."""
        return self._engine.latest if self._engine is not None else self._last_snapshot

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        window = self.every_n_steps or trainer.log_every_n_steps or _DEFAULT_WINDOW
        if self.histogram_every_n_steps is not None and self.histogram_every_n_steps % window:
            raise ValueError(
                f"`histogram_every_n_steps` must be a multiple of the logging window ({window} steps), "
                f"got {self.histogram_every_n_steps}."
            )
        settings = CollectorSettings(window, self.unit_dim, self.saturation_eps, self.max_calls_per_module)
        self._engine = acquire(
            pl_module,
            self,
            settings,
            reduce_sum=_reduce_sum(trainer),
            extra_types=self.extra_types,
            name_pattern=self.name_pattern,
            predicate=self.predicate,
        )
        if self.histogram_every_n_steps is not None:
            self._engine.histogram_every_n_windows = self.histogram_every_n_steps // window
        if not self._engine.collector.layers:
            pl.utilities.rank_zero_warn(
                f"ActivationMonitor found no activation layers in {type(pl_module).__name__}. It looks for "
                "torch.nn activation modules (ReLU, GELU, Sigmoid, Tanh, ...); activations applied as functions "
                "(F.relu, torch.sigmoid) are invisible to it. Name custom activation modules with "
                "`extra_types=`, `name_pattern=` or `predicate=`.",
                category=ActGuardWarning,
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _loggers.write_layout(trainer, self.log_key_prefix)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._engine is not None:
            self._engine.start_batch((trainer.current_epoch, batch_idx))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._engine is not None:
            self._engine.collector.pause()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None:
            self._engine.collector.resume()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._engine is None:
            return
        snapshot = self._engine.end_batch((trainer.current_epoch, batch_idx), trainer.global_step)
        if snapshot is not None:
            _loggers.write_snapshot(trainer, snapshot, self.log_key_prefix, _compat.logger_step(trainer))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is None:
            return
        if self._engine.collector.batches:
            snapshot = self._engine.close_window(trainer.global_step)
            if snapshot is not None:
                _loggers.write_snapshot(trainer, snapshot, self.log_key_prefix, _compat.logger_step(trainer))
        if self.print_summary and self._engine.latest is not None and self._engine.latest.layers:
            rank_zero_only(print_summary)(self._engine.latest)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._engine is not None:
            self._last_snapshot = self._engine.latest
            self._engine.release(self)
            self._engine = None


def _reduce_sum(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
    if trainer.world_size <= 1:
        return None
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")


def _check_positive(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
