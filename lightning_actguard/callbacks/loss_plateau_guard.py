"""LossPlateauGuard: act when the training loss stops improving, turns non-finite or diverges."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from lightning_actguard._warnings import ActGuardWarning
from lightning_actguard.activations import find_activation_layers
from lightning_actguard.callbacks._engine_callback import check_positive_int
from lightning_actguard.callbacks._guard import Finding, Guard
from lightning_actguard.callbacks.dead_relu_guard import current_learning_rates
from lightning_actguard.diagnosis import diagnose, implicated_layers
from lightning_actguard.engine import Engine
from lightning_actguard.snapshot import WindowSnapshot
from lightning_actguard.swap import Replacement, Selector


class LossPlateauGuard(Guard):
    r"""Triggers when the training loss has not improved for ``patience`` optimizer steps.

    The loss is what ``training_step`` returns (or the logged metric named by ``monitor``),
    averaged over each window on the device and across processes, then smoothed across windows
    with an exponential moving average (``smoothing`` is the weight of the past). It has
    *improved* when the smoothed loss falls below the best so far by more than ``min_delta``:
    ``best * (1 - min_delta)`` when ``relative`` (the default), ``best - min_delta`` otherwise.

    Two conditions trigger without waiting for ``patience``, since a run in this state needs a
    lower learning rate, not time: a NaN or infinite loss in the window, and divergence, a
    smoothed loss above ``divergence_ratio`` times the best (for positive losses). Both are read
    with the window's single read-back, so they are acted on at the end of the window in which
    they happened: up to ``every_n_steps`` steps late, never with a host synchronisation per step.

    When it triggers, the guard gives a diagnosis from what the monitors see: dead units,
    saturated sigmoid/tanh layers, unnormalised inputs, vanished gradients, or, when none of
    those, "the learning rate may be too small". It measures activations and gradients itself if
    no monitor does.

    Args:
        patience: optimizer steps without improvement before triggering (default 500: no
            progress after about 500 iterations is the classic sign of vanished gradients).
        min_delta: the smallest change that counts as an improvement.
        relative: read ``min_delta`` as a fraction of the best loss rather than an amount.
        monitor: a metric logged with ``self.log`` to watch instead of the returned loss.
        warmup_steps: optimizer steps to ignore at the start.
        smoothing: weight of the past in the moving average of window losses, in [0, 1).
        divergence_ratio: smoothed loss above this many times the best is divergence; ``None``
            turns the check off.
        action: ``"warn"``, ``"reduce_lr"``, ``"swap"`` (the activations the diagnosis names:
            saturated or dead layers, and every sigmoid/tanh-like layer when gradients vanish),
            ``"stop"``, or a ladder of them.
        every_n_steps: window length in optimizer steps; ``None`` uses ``log_every_n_steps``.
        factor: ``reduce_lr`` multiplies every learning rate by this.
        min_lr: ``reduce_lr`` never goes below this.
        cooldown: optimizer steps between two actions (default: ``patience``).
        print_summary: print the guard's events at the end of training.
        swap_mapping, swap_all, swap_init, review_steps, revert_if_worse: how ``"swap"`` swaps
            and reviews; see :class:`~lightning_actguard.callbacks.Guard`.

    Raises:
        ValueError: an argument is out of range.

    Example::

        Trainer(callbacks=[LossPlateauGuard(patience=500, action=("warn", "reduce_lr", "stop"))])
    """

    def __init__(
        self,
        *,
        patience: int = 500,
        min_delta: float = 1e-3,
        relative: bool = True,
        monitor: str | None = None,
        warmup_steps: int = 0,
        smoothing: float = 0.5,
        divergence_ratio: float | None = 3.0,
        action: str | Sequence[str] = "warn",
        every_n_steps: int | None = None,
        factor: float = 0.5,
        min_lr: float = 0.0,
        cooldown: int | None = None,
        print_summary: bool = True,
        swap_mapping: Mapping[Selector, Replacement] | None = None,
        swap_all: bool = False,
        swap_init: bool = False,
        review_steps: int | None = None,
        revert_if_worse: bool = True,
    ) -> None:
        super().__init__(
            action=action,
            every_n_steps=every_n_steps,
            factor=factor,
            min_lr=min_lr,
            cooldown=cooldown,
            print_summary=print_summary,
            swap_mapping=swap_mapping,
            swap_all=swap_all,
            swap_init=swap_init,
            review_steps=review_steps,
            revert_if_worse=revert_if_worse,
        )
        check_positive_int("patience", patience)
        if not min_delta >= 0:
            raise ValueError(f"`min_delta` must be a non-negative number, got {min_delta!r}.")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be a non-negative int, got {warmup_steps!r}.")
        if not 0 <= smoothing < 1:
            raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing!r}.")
        if divergence_ratio is not None and not divergence_ratio > 1:
            raise ValueError(f"`divergence_ratio` must be greater than 1 or None, got {divergence_ratio!r}.")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"`monitor` must be the name of a logged metric or None, got {monitor!r}.")
        self.patience = patience
        self.min_delta = min_delta
        self.relative = relative
        self.monitor = monitor
        self.warmup_steps = warmup_steps
        self.smoothing = smoothing
        self.divergence_ratio = divergence_ratio
        self._smoothed: float | None = None
        self._best: float | None = None
        self._best_step = 0
        self._missing_warned = False

    @override
    def configure_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: Engine) -> None:
        engine.use_loss(self.monitor)
        engine.use_activations(self, None, find_activation_layers(pl_module))
        engine.use_gradients(self)

    @override
    def default_cooldown(self, window: int) -> int:
        return self.patience

    @override
    def inspect(self, trainer: pl.Trainer, snapshot: WindowSnapshot) -> Finding | None:
        window = snapshot.losses.get(self.monitor or "")
        if window is None or window.count + window.nonfinite == 0:
            self._warn_missing(trainer)
            return None
        rates = current_learning_rates(trainer)
        lrs = ", ".join(f"{lr:.3g}" for lr in rates)
        if window.nonfinite:
            return Finding(
                condition=f"the loss was NaN or infinite at {window.nonfinite} step(s) of the last window",
                evidence={"nonfinite_losses": window.nonfinite, "learning_rates": rates},
                diagnosis=f"the learning rate (now {lrs}) is most likely too high; lower it, or clip gradients",
            )
        if snapshot.step <= self.warmup_steps:
            return None
        past = self._smoothed
        self._smoothed = window.mean if past is None else self.smoothing * past + (1 - self.smoothing) * window.mean
        smoothed = self._smoothed
        if self._best is None or self._improves(smoothed, self._best):
            self._best, self._best_step = smoothed, snapshot.step
            return None
        evidence = {"smoothed_loss": smoothed, "best_loss": self._best, "best_step": self._best_step}
        if self.divergence_ratio is not None and self._best > 0 and smoothed > self.divergence_ratio * self._best:
            return Finding(
                condition=f"the loss is diverging: {smoothed:.4g}, over {self.divergence_ratio:g} times its best "
                f"{self._best:.4g} (step {self._best_step})",
                evidence=evidence | {"learning_rates": rates},
                diagnosis=f"the learning rate (now {lrs}) is most likely too high; lower it",
            )
        stalled = snapshot.step - self._best_step
        if stalled < self.patience:
            return None
        return Finding(
            condition=f"no improvement of the loss for {stalled} steps (best {self._best:.4g} at step "
            f"{self._best_step}, now {smoothed:.4g})",
            evidence=evidence | {"steps_without_improvement": stalled, "learning_rates": rates},
            diagnosis="; ".join(diagnose(snapshot)),
            layers=tuple(implicated_layers(snapshot)),
        )

    @override
    def loss_metric(self) -> str:
        return self.monitor or ""

    def _improves(self, loss: float, best: float) -> bool:
        if not math.isfinite(loss):
            return False
        margin = self.min_delta * abs(best) if self.relative else self.min_delta
        return loss < best - margin

    def _warn_missing(self, trainer: pl.Trainer) -> None:
        if self._missing_warned:
            return
        self._missing_warned = True
        if self.monitor is None:
            rank_zero_warn(
                "LossPlateauGuard found no loss: training_step returned none (manual optimization?). Log the loss "
                "with self.log('train_loss', loss) and pass monitor='train_loss'.",
                category=ActGuardWarning,
            )
        else:
            available = sorted(trainer.callback_metrics)
            rank_zero_warn(
                f"LossPlateauGuard watches {self.monitor!r}, which was never logged in training; logged metrics "
                f"are {available}. The guard does nothing until it is.",
                category=ActGuardWarning,
            )

    @override
    def identity(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "patience": self.patience}

    @override
    def guard_state(self) -> dict[str, Any]:
        return {"smoothed": self._smoothed, "best": self._best, "best_step": self._best_step}

    @override
    def load_guard_state(self, state: Mapping[str, Any]) -> None:
        self._smoothed = state.get("smoothed")
        self._best = state.get("best")
        self._best_step = state.get("best_step", 0)
