"""FinetuneGuard's argument checks, texts and tables: what does not decide or act."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

from rich.table import Table
from torch import Tensor, nn

from lightning_actguard.drift import DriftReport
from lightning_actguard.finetune_health import Breach
from lightning_actguard.revive import revivable

CanaryLoss = Callable[[nn.Module, Any], Tensor]

#: Parameter finding -> (what was found, what to do).
PARAMETER_FINDINGS = {
    "frozen_in_optimizer": (
        "in an optimizer but frozen (requires_grad=False): they get no gradient and never train",
        "unfreeze them if they are meant to train, or leave them out of the optimizer",
    ),
    "trainable_outside_optimizer": (
        "trainable (requires_grad=True) but in no optimizer: they get gradients and never change",
        "add them to the optimizer, or freeze them with requires_grad_(False)",
    ),
    "frozen_changed": (
        "frozen (requires_grad=False) but changed since training started",
        "something other than the optimizer writes to them (user code, a callback); find what does",
    ),
    "never_updated": (
        "in an optimizer and trainable, but not changed at all during the first window",
        "their gradient is zero or None: check that the forward pass uses them and that no dead layer cuts them off",
    ),
}

_LEARNING_RATE_KINDS = {"dead_units", "saturation", "loss_spike", "nonfinite_loss", "nonfinite_gradient"}


def diagnosis(breaches: list[Breach]) -> str:
    """The likely causes of ``breaches``, in plain words."""
    kinds = {breach.kind for breach in breaches}
    causes = []
    if kinds & _LEARNING_RATE_KINDS:
        causes.append("the learning rate is most likely too high for fine-tuning this model")
    if "drift" in kinds:
        causes.append("layers moved further from the pretrained weights than their budget allows")
    if "canary" in kinds:
        causes.append("the model is forgetting its original task: lower the rate, or freeze more layers")
    return "; ".join(causes)


def cross_entropy_canary(model: nn.Module, canary: Any) -> Tensor:
    """The default canary loss: cross-entropy of ``model(inputs)`` against ``targets``."""
    inputs, targets = canary
    return nn.functional.cross_entropy(model(inputs), targets)


def drift_table(drift: DriftReport, budgets: Mapping[str, float]) -> Table:
    """One row per layer: relative drift from the pretrained weights, and its budget."""
    table = Table(title="Drift from the pretrained weights")
    table.add_column("layer", no_wrap=True)
    table.add_column("||w - w0|| / ||w0||", justify="right")
    table.add_column("budget", justify="right")
    for layer, value in drift.layers.items():
        budget = budgets.get(layer)
        table.add_row(layer, f"{value:.3g}", "-" if budget is None else f"{budget:.3g}")
    return table


# ---------------------------------------------------------------------- arguments


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")


def check_number(name: str, value: object, allowed: str, accept: Callable[[float], bool]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number that ``accept`` takes."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not real or not accept(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def checked_budget(budget: object, track_drift: bool) -> float | dict[str, float] | None:
    """``drift_budget`` as a number or a ``{layer: number}`` dict.

    Raises:
        ValueError: a budget is not a positive number, or drift is not tracked.
    """
    if budget is None:
        return None
    if not track_drift:
        raise ValueError("`drift_budget` needs `track_drift=True`: the drift is measured from the kept weights.")
    allowed = "a positive number or a mapping {layer: positive number}"
    for value in budget.values() if isinstance(budget, Mapping) else [budget]:
        check_number("drift_budget", value, allowed, lambda number: number > 0)
    return {str(name): float(value) for name, value in budget.items()} if isinstance(budget, Mapping) else float(budget)  # type: ignore[arg-type]


def check_budget_names(budgets: Mapping[str, float], layers: Collection[str]) -> None:
    """Raise ``ValueError`` when ``drift_budget`` names a layer the drift is not measured for."""
    unknown = sorted(name for name in budgets if name not in layers)
    if unknown:
        raise ValueError(
            f"`drift_budget` names layers that own no floating-point parameters: {unknown}; they are {list(layers)}."
        )


def check_canary(canary: object, canary_loss: object) -> None:
    """Raise ``ValueError`` when the canary arguments cannot work together."""
    if canary_loss is not None and not callable(canary_loss):
        raise ValueError(f"`canary_loss` must be a callable (model, canary) -> loss or None, got {canary_loss!r}.")
    if canary is None and canary_loss is not None:
        raise ValueError("`canary_loss` was given without a `canary` batch to evaluate it on.")
    pair = isinstance(canary, (tuple, list)) and len(canary) == 2
    if canary is not None and canary_loss is None and not pair:
        raise ValueError(f"`canary` must be a pair (inputs, targets) when `canary_loss` is not given, got {canary!r}.")


def check_revive_names(
    mapping: Mapping[str, str], activations: Collection[str], modules: Mapping[str, nn.Module]
) -> None:
    """Raise ``ValueError`` unless every name in a ``revive`` mapping is an activation and a revivable layer."""
    unknown = sorted(name for name in mapping if name not in activations)
    if unknown:
        raise ValueError(
            f"`revive` names activation layers the model does not have: {unknown}; it has {sorted(activations)}."
        )
    for activation, layer in mapping.items():
        if layer not in modules or not revivable(modules[layer]):
            raise ValueError(
                f"`revive` maps {activation!r} to {layer!r}, which is not a Linear or non-transposed convolution "
                "layer of the model."
            )
