"""GradientMonitor: how the gradient signal flows from the last layer to the first."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_actguard import _compat
from lightning_actguard._warnings import ActGuardWarning
from lightning_actguard.callbacks import _loggers
from lightning_actguard.callbacks._engine_callback import EngineCallback, check_positive_int
from lightning_actguard.engine import DEFAULT_OVERHEAD_BUDGET, Engine, GradientSettings
from lightning_actguard.gradients import GradientThresholds
from lightning_actguard.snapshot import WindowSnapshot
from lightning_actguard.summary import gradient_table, print_summary

_CHARTS = {
    "gradient norm": "grad_norm",
    "update / weight ratio": "grad_update_ratio",
    "non-finite gradient steps": "grad_nonfinite",
}
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
_VANISHED_ADVICE = (
    "A loss that makes no progress for hundreds of steps is most often this. Usual causes: saturating "
    "activations (sigmoid, tanh) stacked deep, unnormalised inputs, or a poor initialisation. Usual remedies: "
    "ReLU-family activations (ELU/SELU if units die), normalisation layers, residual connections."
)
_EXPLODED_ADVICE = (
    "Usual remedies: a lower learning rate, gradient clipping (Trainer(gradient_clip_val=...)), normalisation layers."
)


class GradientMonitor(EngineCallback):
    r"""Per-layer gradient norms at the optimizer steps, logged once per window, with a depth profile.

    Every optimizer step is measured within the ``overhead_budget``; beyond it, the steps of
    every k-th batch (the first of each window always).

    Gradients are measured in ``on_before_optimizer_step``, where they are final: accumulated
    over ``accumulate_grad_batches``, unscaled under fp16 mixed precision (including optimizers
    such as fused Adam that unscale inside their own ``step()``), averaged across processes
    under DDP, and not yet clipped. Norms are computed with fused multi-tensor kernels and stay
    on the device until the window's single read-back.

    A *layer* is a module that owns trainable parameters (``encoder.0`` for ``encoder.0.weight``
    and ``encoder.0.bias``), listed in registration order.

    Logged metrics:

    ======================  =================================================================
    ``grad_norm/<layer>``   RMS over the window's optimizer steps of the layer's gradient norm
    ``grad_update_ratio/…`` ``|W_after - W_before| / |W_before|`` across the window's first step
    ``grad_nonfinite/…``    optimizer steps at which the layer's gradient held a NaN or infinity
    ``grad_norm_total``     RMS over the window's steps of the global gradient norm
    ``grad_depth_ratio``    norm of the first weight layer / norm of the last
    ``grad_vanishing``      1 when gradients have vanished (see below)
    ``grad_exploding``      1 when gradients have exploded (see below)
    ``grad_skipped_steps``  steps the fp16 gradient scaler skipped for non-finite gradients
    ``grad_hist/<layer>``   TensorBoard histogram of one step's gradients, when asked for
    ======================  =================================================================

    Gradients have **vanished** when ``grad_depth_ratio < vanishing_ratio`` or when most weight
    layers' norms are below ``vanishing_floor``; they have **exploded** when
    ``grad_norm_total > exploding_norm``, when a non-finite gradient reached an optimizer, or
    when the gradient scaler skipped every step of a window. Steps a gradient scaler skips are
    expected now and then under fp16 and are counted apart; they never enter the norms.

    The update ratio is the actual relative change of the weights across one optimizer step
    (the first of each window), measured by copying the optimizer's parameters for that one
    step; pass ``update_ratio=False`` to save the copy on very large models.

    Args:
        every_n_steps: window length in optimizer steps; ``None`` uses ``log_every_n_steps``.
        overhead_budget: share of the training step time that the package's callbacks may take
            in all (default 0.01). After each window the engine measures only every k-th batch
            (always the window's first), with k chosen from its own measured cost to stay within
            the budget; the loss is still tracked on every batch. ``None`` measures every batch.
        vanishing_ratio: threshold on ``grad_depth_ratio`` (default 1e-3).
        vanishing_floor: absolute norm below which a weight layer counts as starved (1e-8).
        exploding_norm: bound on the global gradient norm (1e3).
        update_ratio: measure the update-to-weight ratio.
        histogram_every_n_steps: log a histogram of each layer's gradients (one step) every
            this many steps, a multiple of the window; ``None`` for none.
        log_key_prefix: prepended to every logged key.
        warn: warn once, in plain words, the first time gradients vanish or explode.
        print_summary: print a per-layer table at the end of training (rank zero).

    Raises:
        ValueError: an argument is out of range.

    Example::

        from pytorch_lightning import Trainer
        from lightning_actguard import ActivationMonitor, GradientMonitor

        trainer = Trainer(callbacks=[ActivationMonitor(), GradientMonitor()])

    .. note::
        Under DDP the gradients are already averaged across processes when they are measured,
        so every statistic is the one of the averaged gradient. Under sharded strategies (FSDP,
        DeepSpeed) each process holds a shard: squared norms are summed across processes, so a
        layer's norm is that of the whole layer. With several optimizers, each layer is measured
        when the optimizer that owns it steps, and the global norm covers every optimizer.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        vanishing_ratio: float = 1e-3,
        vanishing_floor: float = 1e-8,
        exploding_norm: float = 1e3,
        update_ratio: bool = True,
        histogram_every_n_steps: int | None = None,
        log_key_prefix: str = "",
        warn: bool = True,
        print_summary: bool = True,
    ) -> None:
        super().__init__(every_n_steps, overhead_budget)
        if not 0 < vanishing_ratio < 1:
            raise ValueError(f"`vanishing_ratio` must be in (0, 1), got {vanishing_ratio!r}.")
        if not vanishing_floor > 0:
            raise ValueError(f"`vanishing_floor` must be positive, got {vanishing_floor!r}.")
        if not exploding_norm > 0:
            raise ValueError(f"`exploding_norm` must be positive, got {exploding_norm!r}.")
        check_positive_int("histogram_every_n_steps", histogram_every_n_steps, allow_none=True)
        self.thresholds = GradientThresholds(vanishing_ratio, vanishing_floor, exploding_norm)
        self.update_ratio = update_ratio
        self.histogram_every_n_steps = histogram_every_n_steps
        self.log_key_prefix = log_key_prefix
        self.warn = warn
        self.print_summary = print_summary
        self._warned: set[str] = set()

    @override
    def configure_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: Engine) -> None:
        self.request_histograms(engine, self.histogram_every_n_steps)
        sharded = type(trainer.strategy).__name__ in _SHARDED_STRATEGIES
        engine.use_gradients(self, GradientSettings(self.thresholds, self.update_ratio), sharded=sharded)
        self._warned.clear()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        layout = _loggers.multiline_layout("gradients", _CHARTS, self.log_key_prefix)
        _loggers.write_layout(trainer, layout)

    @override
    def on_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: WindowSnapshot) -> None:
        gradients = snapshot.gradients
        if gradients is None:
            return
        prefix = self.log_key_prefix
        metrics, histograms = gradients.to_metrics(prefix), gradients.histograms(prefix)
        _loggers.write_window(trainer, metrics, histograms, _compat.logger_step(trainer))
        if self.warn:
            self._warn_once(snapshot)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        latest = self.snapshot
        if self.print_summary and latest is not None and latest.gradients is not None:
            rank_zero_only(print_summary)(gradient_table(latest.gradients, latest.step))

    def _warn_once(self, snapshot: WindowSnapshot) -> None:
        gradients = snapshot.gradients
        assert gradients is not None  # noqa: S101 - checked by the caller
        for flag, raised, advice in (
            ("vanishing", gradients.vanishing, _VANISHED_ADVICE),
            ("exploding", gradients.exploding, _EXPLODED_ADVICE),
        ):
            if raised and flag not in self._warned:
                self._warned.add(flag)
                rank_zero_warn(f"At step {snapshot.step}: {gradients.diagnosis}. {advice}", category=ActGuardWarning)
