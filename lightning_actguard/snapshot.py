"""Plain numbers describing the activations of one window of training batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["STATISTICS", "ActivationSnapshot", "Histogram", "LayerStats"]

#: Logged statistic -> what it means. Keys are ``<prefix><statistic>/<layer>``.
STATISTICS: dict[str, str] = {
    "act_dead_frac": "share of units that never fired (never rose above the floor) in the window",
    "act_zero_frac": "share of outputs at or below a hard floor (ReLU's zeros), else exactly zero",
    "act_saturated_frac": "share of outputs within saturation_eps of a bound (bounded activations only)",
    "act_out_mean": "mean of the activation's outputs",
    "act_out_std": "standard deviation of the activation's outputs",
    "act_in_mean": "mean of what flows into the activation",
    "act_in_std": "standard deviation of what flows into the activation",
    "act_nonfinite": "number of NaN or infinite outputs in the window",
}


@dataclass(frozen=True)
class Histogram:
    """Bucketed outputs of one layer on one batch, ready for ``add_histogram_raw``.

    ``counts[i]`` counts outputs in ``(limits[i-1], limits[i]]``; empty buckets at either end
    are dropped.
    """

    minimum: float
    maximum: float
    count: float
    total: float
    total_squares: float
    limits: list[float]
    counts: list[float]


@dataclass(frozen=True)
class LayerStats:
    """One activation layer over one window.

    Attributes:
        name: qualified module name; ``name[i]`` for the i-th call of a module called more than
            once per forward.
        kind: activation name (``"relu"``, ``"sigmoid"``...).
        units: number of units (channels or features).
        dead_frac: share of units that never fired in the window, in [0, 1].
        zero_frac: share of outputs that are "off", in [0, 1].
        saturated_frac: share of outputs near a bound, in [0, 1]; ``None`` for unbounded kinds.
        out_mean: mean output. NaN when the window held non-finite outputs.
        out_std: standard deviation of the outputs.
        in_mean: mean input.
        in_std: standard deviation of the inputs.
        nonfinite: number of NaN or infinite outputs.
        dead_units: boolean mask over units, True where the unit never fired (on the CPU).
        histogram: the outputs of one batch in buckets, on histogram windows; else ``None``.
    """

    name: str
    kind: str
    units: int
    dead_frac: float
    zero_frac: float
    saturated_frac: float | None
    out_mean: float
    out_std: float
    in_mean: float
    in_std: float
    nonfinite: int
    dead_units: Tensor = field(repr=False)
    histogram: Histogram | None = field(default=None, repr=False)

    def metrics(self) -> Iterator[tuple[str, float]]:
        """Yield ``(statistic, value)`` pairs in the order of :data:`STATISTICS`."""
        yield "act_dead_frac", self.dead_frac
        yield "act_zero_frac", self.zero_frac
        if self.saturated_frac is not None:
            yield "act_saturated_frac", self.saturated_frac
        yield "act_out_mean", self.out_mean
        yield "act_out_std", self.out_std
        yield "act_in_mean", self.in_mean
        yield "act_in_std", self.in_std
        yield "act_nonfinite", float(self.nonfinite)


@dataclass(frozen=True)
class ActivationSnapshot:
    """Statistics of every monitored layer over one window of training batches.

    Attributes:
        step: the optimizer step that closed the window.
        batches: training batches in the window (on this rank).
        layers: per-layer statistics, in the order the layers first ran.
    """

    step: int
    batches: int
    layers: dict[str, LayerStats]

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flatten to ``{"<prefix><statistic>/<layer>": value}`` for a logger."""
        return {
            f"{prefix}{statistic}/{name}": value
            for name, layer in self.layers.items()
            for statistic, value in layer.metrics()
        }


def mean_and_std(total: float, total_squares: float, count: float) -> tuple[float, float]:
    """Mean and (population) standard deviation from running sums; NaN for an empty count."""
    if count <= 0:
        return math.nan, math.nan
    mean = total / count
    variance = total_squares / count - mean * mean
    return mean, math.sqrt(max(variance, 0.0)) if math.isfinite(variance) else math.nan


def empty_mask() -> Tensor:
    """A mask over zero units."""
    return torch.zeros(0, dtype=torch.bool)
