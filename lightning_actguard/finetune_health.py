"""The pretrained model's health, and the rules that judge each fine-tuning window against it.

Plain PyTorch, no Lightning. The rules read the plain numbers of a
:class:`~lightning_actguard.snapshot.WindowSnapshot`; a window *breaches* when one of these holds
(each rule can be turned off):

* a layer of the ReLU family has a dead-unit fraction more than ``dead_margin`` above the
  baseline's (0.1: ten more units in a hundred have stopped firing);
* a bounded layer (sigmoid, tanh) has a saturated share more than ``saturation_margin`` above
  the baseline's;
* the loss spiked: see :func:`loss_spike`; or a loss, or a gradient, was NaN or infinite;
* a layer drifted from its pretrained weights beyond its budget;
* the loss of the canary (a batch of the original task) rose more than ``canary_margin`` over
  its pretrained value: the model is forgetting.

:class:`BaselineRecorder` measures the baseline on one batch with its own temporary hooks, and
:func:`rates_above_cap` finds the starting learning rates above a cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_actguard._packing import ReduceSum, read_back
from lightning_actguard.activations import ActivationLayer
from lightning_actguard.collector import ActivationCollector
from lightning_actguard.snapshot import ActivationStats, WindowSnapshot

__all__ = [
    "Baseline",
    "BaselineRecorder",
    "Breach",
    "HealthRules",
    "canary_breach",
    "drift_breaches",
    "loss_spike",
    "rates_above_cap",
    "window_breaches",
]


@dataclass(frozen=True)
class Baseline:
    """The pretrained model's health, measured before its first update.

    Attributes:
        dead_frac: share of dead units per activation layer, in [0, 1].
        saturated_frac: share of saturated outputs per bounded activation layer, in [0, 1].
        alive_units: per activation layer, a boolean mask over units, True where the unit fired.
        loss: the training loss, or ``None`` when none was returned or it was not finite.
        canary_loss: the canary batch's loss, when a canary is given.
    """

    dead_frac: dict[str, float]
    saturated_frac: dict[str, float]
    alive_units: dict[str, Tensor] = field(repr=False)
    loss: float | None
    canary_loss: float | None = None

    @classmethod
    def from_layers(
        cls, layers: Iterable[ActivationStats], loss: float | None, canary_loss: float | None = None
    ) -> Baseline:
        """The baseline from one measurement's activation statistics and loss."""
        layers = list(layers)
        return cls(
            dead_frac={layer.name: layer.dead_frac for layer in layers},
            saturated_frac={layer.name: layer.saturated_frac for layer in layers if layer.saturated_frac is not None},
            alive_units={layer.name: ~layer.dead_units for layer in layers},
            loss=loss if loss is not None and math.isfinite(loss) else None,
            canary_loss=canary_loss,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {
            "dead_frac": dict(self.dead_frac),
            "saturated_frac": dict(self.saturated_frac),
            "alive_units": {name: mask.tolist() for name, mask in self.alive_units.items()},
            "loss": self.loss,
            "canary_loss": self.canary_loss,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Baseline:
        """Rebuild from :meth:`to_dict`."""
        return cls(
            dead_frac=dict(values.get("dead_frac", {})),
            saturated_frac=dict(values.get("saturated_frac", {})),
            alive_units={
                name: torch.tensor(mask, dtype=torch.bool) for name, mask in values.get("alive_units", {}).items()
            },
            loss=values.get("loss"),
            canary_loss=values.get("canary_loss"),
        )


class BaselineRecorder:
    """Measures the baseline on one batch: hooks in place from construction to :meth:`finish`.

    The window statistics of a shared engine cannot serve: by the end of the first window the
    weights have been updated many times, possibly by a learning rate that does damage at once.
    The first batch's forward pass is the only one that sees the pretrained weights, so the
    recorder hooks the activation layers for that batch alone.

    Args:
        layers: the activation layers to measure (the engine's, so that names match).
        unit_dim: as for :class:`~lightning_actguard.collector.ActivationCollector`.
        saturation_eps: as for :class:`~lightning_actguard.collector.ActivationCollector`.
        max_calls_per_module: as for :class:`~lightning_actguard.collector.ActivationCollector`.

    Example:
        >>> from torch import nn
        >>> from lightning_actguard.activations import find_activation_layers
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = model[0].weight.zero_(), model[0].bias.copy_(torch.tensor([1.0, -1.0, 1.0]))
        >>> recorder = BaselineRecorder(find_activation_layers(model))
        >>> loss = model(torch.ones(4, 2)).sum()
        >>> baseline = recorder.finish(loss)
        >>> baseline.dead_frac, baseline.loss, baseline.alive_units["1"].tolist()
        ({'1': 0.3333333333333333}, 8.0, [True, False, True])
    """

    def __init__(
        self,
        layers: Iterable[ActivationLayer],
        *,
        unit_dim: int | str = "auto",
        saturation_eps: float = 0.01,
        max_calls_per_module: int = 8,
    ) -> None:
        self._collector = ActivationCollector(
            unit_dim=unit_dim, saturation_eps=saturation_eps, max_calls_per_module=max_calls_per_module
        )
        self._collector.attach(layers)
        self._collector.start_batch()

    def pause(self) -> None:
        """Stop counting forwards (recomputations during backward)."""
        self._collector.pause()

    def resume(self) -> None:
        """Count forwards again."""
        self._collector.resume()

    def detach(self) -> None:
        """Remove the hooks without a result; safe to call twice."""
        self._collector.detach()

    def finish(
        self,
        loss: Tensor | None,
        reduce_sum: ReduceSum | None = None,
        world_size: int = 1,
        canary_loss: float | None = None,
    ) -> Baseline:
        """Read the batch's activations and ``loss`` in one transfer, remove the hooks, return the baseline.

        Args:
            loss: the batch's loss (its mean is used), or ``None``.
            reduce_sum: sums across processes; the loss is then divided by ``world_size``.
            world_size: number of processes.
            canary_loss: the canary's pretrained loss, kept in the baseline.
        """
        collector = self._collector
        collector.end_batch()
        try:
            pieces = collector.pack()
            extra = [loss.detach().float().mean().reshape(1)] if loss is not None else []
            layers: list[ActivationStats] = []
            value = None
            if pieces or extra:
                take = read_back([*pieces, *extra], reduce_sum)
                layers = collector.unpack(take) if pieces else []
                value = take(1)[0] / world_size if extra else None
        finally:
            collector.detach()
        return Baseline.from_layers(layers, value, canary_loss)


def configured_rate(group: Mapping[str, Any]) -> float:
    """The highest rate a param group is set to reach: its ``lr``, or a scheduler's ``initial_lr``/``max_lr``."""
    return max(float(group[key]) for key in ("lr", "initial_lr", "max_lr") if key in group)


def rates_above_cap(optimizers: Iterable[torch.optim.Optimizer], cap: float) -> list[tuple[int, int, float]]:
    """``(optimizer index, group index, rate)`` for each param group whose :func:`configured_rate` exceeds ``cap``.

    Example:
        >>> optimizer = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.ones(1)], "lr": 0.5}], lr=0.01)
        >>> rates_above_cap([optimizer], cap=0.1)
        [(0, 1, 0.5)]
    """
    return [
        (index, group_index, rate)
        for index, optimizer in enumerate(optimizers)
        for group_index, group in enumerate(optimizer.param_groups)
        if (rate := configured_rate(group)) > cap
    ]


@dataclass(frozen=True)
class HealthRules:
    """Margins over the baseline; ``None`` turns a rule off.

    Attributes:
        dead_margin: allowed rise of a layer's dead-unit fraction, in (0, 1].
        saturation_margin: allowed rise of a bounded layer's saturated share, in (0, 1].
        loss_spike_ratio: a loss above this many times the reference is a spike (see
            :func:`loss_spike`); greater than 1.
        loss_spike_min_delta: and only if it is also this much above it in absolute terms, so a
            loss near zero that doubles (0.01 to 0.02) is no spike; non-negative. It also absorbs
            the noise of the baseline loss, measured on one batch: the mean cross-entropy of a
            batch of 32 varies by about 0.1 per misclassified sample, and a lucky first batch can
            read a third of the true level. 0.25 suits cross-entropy with batches of 32 or more;
            raise it for smaller batches or losses of a larger scale.
        canary_margin: allowed rise of the canary loss over its pretrained value, in the loss's
            own units; positive.

    Raises:
        ValueError: a margin is out of range.
    """

    dead_margin: float | None = 0.1
    saturation_margin: float | None = 0.2
    loss_spike_ratio: float | None = 2.0
    loss_spike_min_delta: float = 0.25
    canary_margin: float | None = 0.5

    def __post_init__(self) -> None:
        for name in ("dead_margin", "saturation_margin"):
            value = getattr(self, name)
            if value is not None and not (_is_real(value) and 0 < value <= 1):
                raise ValueError(f"`{name}` must be in (0, 1] or None, got {value!r}.")
        if self.loss_spike_ratio is not None and not (_is_real(self.loss_spike_ratio) and self.loss_spike_ratio > 1):
            raise ValueError(
                f"`loss_spike_ratio` must be a number greater than 1 or None, got {self.loss_spike_ratio!r}."
            )
        if not (_is_real(self.loss_spike_min_delta) and self.loss_spike_min_delta >= 0):
            raise ValueError(
                f"`loss_spike_min_delta` must be a non-negative number, got {self.loss_spike_min_delta!r}."
            )
        if self.canary_margin is not None and not (_is_real(self.canary_margin) and self.canary_margin > 0):
            raise ValueError(f"`canary_margin` must be a positive number or None, got {self.canary_margin!r}.")


@dataclass(frozen=True)
class Breach:
    """One rule a window broke.

    Attributes:
        kind: ``"dead_units"``, ``"saturation"``, ``"loss_spike"``, ``"nonfinite_loss"``,
            ``"nonfinite_gradient"``, ``"drift"`` or ``"canary"``.
        condition: what was seen, in plain words with the numbers.
        evidence: the numbers, for the event record.
    """

    kind: str
    condition: str
    evidence: dict[str, Any] = field(default_factory=dict)


def loss_spike(loss: float, reference: float, ratio: float, min_delta: float) -> bool:
    """Whether ``loss`` is a spike over ``reference``: non-finite, or both ``ratio`` times and ``min_delta`` above it.

    For a reference at or below zero (a loss that can be negative) only the absolute rise counts.

    Example:
        >>> loss_spike(0.9, reference=0.3, ratio=2.0, min_delta=0.1), loss_spike(0.03, 0.01, 2.0, 0.1)
        (True, False)
    """
    if not math.isfinite(loss):
        return True
    above = loss - reference > min_delta
    return above and (reference <= 0 or loss > ratio * reference)


def window_breaches(
    snapshot: WindowSnapshot,
    baseline: Baseline,
    rules: HealthRules,
    reference_loss: float | None,
    can_die: Callable[[ActivationStats], bool],
) -> list[Breach]:
    """The rules ``snapshot`` breaks against ``baseline``: activations, loss and gradients.

    Args:
        snapshot: the window.
        baseline: the pretrained model's health.
        rules: the margins.
        reference_loss: what a loss spike is measured against (the lowest healthy loss so far);
            ``None`` skips the spike rule.
        can_die: which activation layers' dead units mean something (the ReLU family).
    """
    found = [
        _dead(snapshot, baseline, rules, can_die),
        _saturated(snapshot, baseline, rules),
        _loss(snapshot, rules, reference_loss),
        _nonfinite_gradients(snapshot),
    ]
    return [breach for breach in found if breach is not None]


def _dead(
    snapshot: WindowSnapshot, baseline: Baseline, rules: HealthRules, can_die: Callable[[ActivationStats], bool]
) -> Breach | None:
    now = {name: layer.dead_frac for name, layer in snapshot.activations.items() if can_die(layer)}
    return _rise("dead_units", "dead units", now, baseline.dead_frac, rules.dead_margin)


def _saturated(snapshot: WindowSnapshot, baseline: Baseline, rules: HealthRules) -> Breach | None:
    now = {name: layer.saturated_frac for name, layer in snapshot.activations.items()}
    return _rise("saturation", "saturated outputs", now, baseline.saturated_frac, rules.saturation_margin)


def _rise(
    kind: str, what: str, now: Mapping[str, float | None], before: Mapping[str, float], margin: float | None
) -> Breach | None:
    """A breach naming the layers whose share rose more than ``margin`` above the baseline's."""
    if margin is None:
        return None
    risen = {
        name: (before[name], value)
        for name, value in now.items()
        if name in before and value is not None and value > before[name] + margin
    }
    if not risen:
        return None
    described = ", ".join(f"{name!r} {old:.0%} -> {new:.0%}" for name, (old, new) in risen.items())
    return Breach(
        kind,
        f"{what} rose more than {margin:.0%} above the pretrained model's in {described}",
        {name: {"pretrained": old, "now": new} for name, (old, new) in risen.items()},
    )


def _loss(snapshot: WindowSnapshot, rules: HealthRules, reference: float | None) -> Breach | None:
    window = snapshot.losses.get("")
    if window is None:
        return None
    if window.nonfinite:
        return Breach(
            "nonfinite_loss",
            f"the loss was NaN or infinite at {window.nonfinite} step(s)",
            {"nonfinite_losses": window.nonfinite},
        )
    if rules.loss_spike_ratio is None or reference is None or not window.count:
        return None
    if not loss_spike(window.mean, reference, rules.loss_spike_ratio, rules.loss_spike_min_delta):
        return None
    return Breach(
        "loss_spike",
        f"the loss spiked to {window.mean:.4g}, over {rules.loss_spike_ratio:g} times its lowest healthy "
        f"level {reference:.4g}",
        {"loss": window.mean, "reference_loss": reference},
    )


def _nonfinite_gradients(snapshot: WindowSnapshot) -> Breach | None:
    gradients = snapshot.gradients
    if gradients is None or not gradients.nonfinite_steps:
        return None
    layers = [name for name, layer in gradients.layers.items() if layer.nonfinite_steps]
    return Breach(
        "nonfinite_gradient",
        f"NaN or infinite gradients at {gradients.nonfinite_steps} step(s), in {', '.join(map(repr, layers))}",
        {"nonfinite_gradient_steps": gradients.nonfinite_steps, "layers": layers},
    )


def drift_breaches(drift: Mapping[str, float], budgets: Mapping[str, float]) -> list[Breach]:
    """One breach for the layers whose relative drift is above their budget (NaN drift included).

    Example:
        >>> [breach.kind for breach in drift_breaches({"head": 0.3, "body": 0.01}, {"head": 0.2, "body": 0.2})]
        ['drift']
    """
    over = {
        name: value for name, value in drift.items() if name in budgets and (math.isnan(value) or value > budgets[name])
    }
    if not over:
        return []
    described = ", ".join(f"{name!r} {value:.3g} (budget {budgets[name]:.3g})" for name, value in over.items())
    return [
        Breach("drift", f"layers drifted from the pretrained weights beyond their budget: {described}", {"drift": over})
    ]


def canary_breach(loss: float, baseline: Baseline, rules: HealthRules) -> Breach | None:
    """A breach when the canary's loss rose more than ``canary_margin`` over its pretrained value."""
    if rules.canary_margin is None or baseline.canary_loss is None:
        return None
    if math.isfinite(loss) and loss <= baseline.canary_loss + rules.canary_margin:
        return None
    return Breach(
        "canary",
        f"the canary batch's loss rose from {baseline.canary_loss:.4g} (pretrained) to {loss:.4g}, more than "
        f"{rules.canary_margin:g} above: the model is forgetting the original task",
        {"canary_loss": loss, "baseline_canary_loss": baseline.canary_loss},
    )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
