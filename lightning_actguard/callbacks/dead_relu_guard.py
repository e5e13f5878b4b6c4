"""DeadReLUGuard: act when most units of a layer have stopped firing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from lightning_actguard.activations import find_activation_layers
from lightning_actguard.callbacks._engine_callback import check_positive_int
from lightning_actguard.callbacks._guard import Finding, Guard
from lightning_actguard.engine import Engine
from lightning_actguard.snapshot import ActivationStats, WindowSnapshot
from lightning_actguard.swap import Replacement, Selector

_DEFAULT_COOLDOWN_WINDOWS = 5


class DeadReLUGuard(Guard):
    r"""Triggers when a layer's dead-unit fraction stays above ``threshold`` for ``patience`` windows.

    A unit is dead in a window when it never fired on any sample of it (see
    :class:`~lightning_actguard.ActivationMonitor`). Nine units in ten dead (the default
    threshold, 0.9) is a design problem, not noise: the usual cause is a learning rate high
    enough to push the units' biases far negative, from where no gradient brings them back.

    Only activations unbounded above are judged (the ReLU family: ReLU, LeakyReLU, ELU, GELU,
    SiLU, ...); sigmoid- and tanh-like layers saturate rather than die, which the monitors report.

    The guard uses the same hooks as :class:`~lightning_actguard.ActivationMonitor` if both are
    attached; on its own it measures the activations itself.

    Args:
        threshold: dead-unit fraction above which a layer counts as dead, in (0, 1].
        patience: consecutive windows the fraction must stay above ``threshold``.
        hysteresis: once triggered, the condition clears only when every layer is below
            ``threshold - hysteresis``, so a value hovering at the threshold does not flap.
        action: ``"warn"``, ``"reduce_lr"``, ``"swap"`` (the dead layers' activations, ReLU ->
            ELU by default), ``"stop"``, or a ladder such as
            ``("warn", "reduce_lr", "stop")``.
        every_n_steps: window length in optimizer steps; ``None`` uses ``log_every_n_steps``.
        factor: ``reduce_lr`` multiplies every learning rate by this.
        min_lr: ``reduce_lr`` never goes below this.
        cooldown: optimizer steps between two actions (default: five windows, time for the
            statistics to reflect the last action).
        print_summary: print the guard's events at the end of training.
        swap_mapping, swap_all, swap_init, review_steps, revert_if_worse: how ``"swap"`` swaps
            and reviews; see :class:`~lightning_actguard.callbacks.Guard`.

    Raises:
        ValueError: an argument is out of range.

    Example::

        Trainer(callbacks=[DeadReLUGuard(threshold=0.9, action="reduce_lr")])
    """

    def __init__(
        self,
        *,
        threshold: float = 0.9,
        patience: int = 1,
        hysteresis: float = 0.05,
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
        if not 0 < threshold <= 1:
            raise ValueError(f"`threshold` must be in (0, 1], got {threshold!r}.")
        check_positive_int("patience", patience)
        if not 0 <= hysteresis < threshold:
            raise ValueError(f"`hysteresis` must be in [0, threshold), got {hysteresis!r}.")
        self.threshold = threshold
        self.patience = patience
        self.hysteresis = hysteresis
        self._windows_above = 0
        self._triggered = False

    @override
    def configure_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: Engine) -> None:
        engine.use_activations(self, None, find_activation_layers(pl_module))

    @override
    def default_cooldown(self, window: int) -> int:
        return _DEFAULT_COOLDOWN_WINDOWS * window

    @override
    def inspect(self, trainer: pl.Trainer, snapshot: WindowSnapshot) -> Finding | None:
        judged = {name: layer.dead_frac for name, layer in snapshot.activations.items() if layer_can_die(layer)}
        above = {name: fraction for name, fraction in judged.items() if fraction > self.threshold}
        clear_below = self.threshold - self.hysteresis
        if above:
            self._windows_above += 1
        elif all(fraction < clear_below for fraction in judged.values()):
            self._windows_above, self._triggered = 0, False
        self._triggered = self._triggered or self._windows_above >= self.patience
        if not self._triggered:
            return None
        dead = above or {name: fraction for name, fraction in judged.items() if fraction >= clear_below}
        lrs = current_learning_rates(trainer)
        worst = ", ".join(f"{name!r} {fraction:.0%}" for name, fraction in sorted(dead.items(), key=lambda kv: -kv[1]))
        return Finding(
            condition=f"dead units above {self.threshold:.0%} in {len(dead)} layer(s): {worst}",
            evidence={"dead_frac": dead, "learning_rates": lrs, "windows_above": self._windows_above},
            layers=tuple(dead),
            diagnosis=(
                f"a too-high learning rate (now {', '.join(f'{lr:.3g}' for lr in lrs)}) kills ReLU units for good; "
                "lower it, or move to LeakyReLU/ELU/SELU whose units keep a gradient"
            ),
        )

    @override
    def identity(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "patience": self.patience}

    @override
    def guard_state(self) -> dict[str, Any]:
        return {"windows_above": self._windows_above, "triggered": self._triggered}

    @override
    def load_guard_state(self, state: Mapping[str, Any]) -> None:
        self._windows_above = state.get("windows_above", 0)
        self._triggered = state.get("triggered", False)


def layer_can_die(layer: ActivationStats) -> bool:
    """Whether a layer's dead units mean something: activations unbounded above (the ReLU family)."""
    return layer.saturated_frac is None and layer.kind not in ("logsigmoid", "tanhshrink", "softshrink", "hardshrink")


def current_learning_rates(trainer: pl.Trainer) -> list[float]:
    """The learning rate of every param group of every optimizer, in order."""
    return [float(group["lr"]) for optimizer in trainer.optimizers for group in optimizer.param_groups]
