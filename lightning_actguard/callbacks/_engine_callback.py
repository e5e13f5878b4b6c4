"""The base of every callback that reads the model's shared measuring engine."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_actguard import _compat
from lightning_actguard._warnings import ActGuardWarning
from lightning_actguard.engine import DEFAULT_OVERHEAD_BUDGET, Engine, acquire
from lightning_actguard.snapshot import WindowSnapshot

_DEFAULT_WINDOW = 50

_Hook = TypeVar("_Hook", bound=Callable[..., None])


def _charged(hook: _Hook) -> _Hook:
    """Charge the time a per-batch hook takes to the engine, whose overhead budget counts it."""

    @functools.wraps(hook)
    def timed(self: EngineCallback, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        hook(self, *args, **kwargs)
        if self._engine is not None:
            self._engine.charge(time.perf_counter() - started)

    return timed  # type: ignore[return-value]


class EngineCallback(Callback):
    """Joins the model's :class:`~lightning_actguard.engine.Engine` for the length of ``fit``.

    It forwards the training loop's events to the engine (which counts each event once however
    many callbacks forward it) and calls :meth:`on_window` with every window's snapshot.
    Subclasses say what they need measured in :meth:`configure_engine`.

    Args:
        every_n_steps: window length in optimizer steps; ``None`` uses the trainer's
            ``log_every_n_steps``.
        overhead_budget: share of the step time that the package's callbacks may take in all
            (default 0.01); the engine measures fewer batches to stay within it. ``None``
            measures every batch.
    """

    def __init__(
        self, every_n_steps: int | None = None, overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        if overhead_budget is not None and not 0 < overhead_budget < 1:
            raise ValueError(f"`overhead_budget` must be in (0, 1) or None, got {overhead_budget!r}.")
        self.every_n_steps = every_n_steps
        self.overhead_budget = overhead_budget
        self._engine: Engine | None = None
        self._last_snapshot: WindowSnapshot | None = None

    @property
    def snapshot(self) -> WindowSnapshot | None:
        """Statistics of the last completed window, or ``None`` before the first one."""
        return self._engine.latest if self._engine is not None else self._last_snapshot

    def window_length(self, trainer: pl.Trainer) -> int:
        """The window in optimizer steps: this callback's, another's chosen one, or the trainer's default."""
        if self._engine is not None:
            return self._engine.every_n_steps
        return self.every_n_steps or trainer.log_every_n_steps or _DEFAULT_WINDOW

    def configure_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: Engine) -> None:
        """Ask ``engine`` to measure what this callback needs."""

    def request_histograms(self, engine: Engine, every_n_steps: int | None) -> None:
        """Ask for histograms every ``every_n_steps`` steps, which must be a multiple of the window.

        Raises:
            ValueError: ``every_n_steps`` is not a multiple of the window.
        """
        if every_n_steps is None:
            return
        if every_n_steps % engine.every_n_steps:
            raise ValueError(
                f"`histogram_every_n_steps` must be a multiple of the logging window ({engine.every_n_steps} steps), "
                f"got {every_n_steps}."
            )
        engine.use_histograms(self, every_n_steps)

    def on_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: WindowSnapshot) -> None:
        """Called on every rank with the reduced statistics of each window that closes."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        reduce_sum = None
        if trainer.world_size > 1:
            reduce_sum = _strategy_sum(trainer)
        self._engine = acquire(
            pl_module,
            self,
            every_n_steps=self.window_length(trainer),
            explicit=self.every_n_steps is not None,
            reduce_sum=reduce_sum,
            world_size=trainer.world_size,
        )
        try:
            self._engine.use_overhead_budget(self, self.overhead_budget)
            self.configure_engine(trainer, pl_module, self._engine)
        except BaseException:
            self._release()
            raise

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None and self._engine.gradients is not None:
            self._engine.gradients.attach(trainer.optimizers)

    @override
    @_charged
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._engine is not None:
            self._engine.start_batch((trainer.current_epoch, batch_idx), trainer.global_step)

    @override
    @_charged
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._engine is not None:
            self._engine.pause()

    @override
    @_charged
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None:
            self._engine.resume()

    @override
    @_charged
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._engine is not None and self._engine.measures_gradients:
            self._engine.before_optimizer_step(
                (trainer.current_epoch, trainer.global_step),
                optimizer,
                grad_scale=_compat.pending_grad_scale(trainer, optimizer),
                scaler=_compat.grad_scaler(trainer) is not None,
            )

    @override
    @_charged
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._engine is None:
            return
        batch_key = (trainer.current_epoch, batch_idx)
        if self._engine.wants_losses(batch_key):
            self._engine.add_losses(batch_key, loss_values(trainer, outputs, self._engine.losses))
        snapshot = self._engine.end_batch(batch_key, trainer.global_step)
        self._report_functional(self._engine)
        if snapshot is not None:
            self._report_over_budget(self._engine)
            self.on_window(trainer, pl_module, snapshot)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None:
            self._engine.interrupt()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None:
            self._engine.interrupt()

    @staticmethod
    def _report_functional(engine: Engine) -> None:
        """Say once per run which activations the hooks cannot see because they are applied as functions."""
        if not engine.functional or engine.functional_reported:
            return
        engine.functional_reported = True
        found = "; ".join(finding.describe() for finding in engine.functional)
        rank_zero_warn(
            f"{len(engine.functional)} activation(s) are applied functionally: {found}.", category=ActGuardWarning
        )

    @staticmethod
    def _report_over_budget(engine: Engine) -> None:
        """Say once per run when even one measured batch per window costs more than the budget."""
        estimate = engine.estimate
        if not engine.over_budget or engine.over_budget_reported or estimate is None:
            return
        if not (estimate.every_batch and estimate.window_end):  # the first window times neither
            return
        engine.over_budget_reported = True
        rank_zero_info(
            f"The lightning-actguard callbacks cost more than overhead_budget={engine.overhead_budget:g} of the "
            f"training time even when they measure one batch per window: a batch takes "
            f"{estimate.plain_batch * 1e3:.3g} ms, a measured batch {estimate.measured_batch * 1e3:.3g} ms more, every "
            f"batch {estimate.every_batch * 1e3:.3g} ms more, and closing a window {estimate.window_end * 1e3:.3g} ms. "
            "Only the first batch of each window is measured. Longer windows (`every_n_steps`) spread these costs "
            "over more batches."
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is None:
            return
        snapshot = self._engine.flush(trainer.global_step)
        if snapshot is not None:
            self.on_window(trainer, pl_module, snapshot)

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


def loss_values(trainer: pl.Trainer, outputs: Any, metrics: Iterable[str]) -> dict[str, Tensor]:
    """This batch's value of each metric: ``""`` is the loss ``training_step`` returned.

    Metrics that are not there (not logged yet, or a training step that returned nothing) are
    left out.
    """
    values = {}
    for metric in metrics:
        if metric:
            value = trainer.callback_metrics.get(metric)
        else:
            value = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(value, Tensor):
            values[metric] = value
    return values


def _strategy_sum(trainer: pl.Trainer) -> Callable[[Tensor], Tensor]:
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")


def check_positive_int(name: str, value: int | None, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a positive int (or an allowed None)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
