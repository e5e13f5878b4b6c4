"""Plain numbers describing the activations of one window of training batches."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_actguard import _stats
from lightning_actguard.activations import ActivationSpec
from lightning_actguard.losses import LossWindow

__all__ = [
    "ACTIVATION_STATISTICS",
    "GRADIENT_STATISTICS",
    "ActivationStats",
    "GradientLayerStats",
    "GradientStats",
    "Histogram",
    "WindowSnapshot",
]

#: Logged statistic -> what it means. Keys are ``<prefix><statistic>/<layer>``.
ACTIVATION_STATISTICS: dict[str, str] = {
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
class ActivationStats:
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
        """Yield ``(statistic, value)`` pairs in the order of :data:`ACTIVATION_STATISTICS`."""
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
class GradientLayerStats:
    """The gradients of one layer (a module's own parameters) over one window.

    Attributes:
        name: qualified name of the module that owns the parameters.
        norm: root mean square over the window's optimizer steps of the layer's gradient norm
            (the norm of all its parameters' gradients together), after unscaling.
        nonfinite_steps: optimizer steps at which the layer's gradient held a NaN or infinity.
        update_ratio: ``|W_after - W_before| / |W_before|`` across one real optimizer step (the
            window's first), ``None`` when not measured. About 1e-3 is the usual healthy order.
        histogram: the layer's gradients at one step in buckets, on histogram windows.
    """

    name: str
    norm: float
    nonfinite_steps: int
    update_ratio: float | None
    histogram: Histogram | None = field(default=None, repr=False)


@dataclass(frozen=True)
class GradientStats:
    """Gradient flow of a whole model over one window.

    Attributes:
        layers: per-layer statistics, in registration (depth) order.
        total_norm: root mean square over the window's steps of the global gradient norm.
        steps: optimizer steps measured (finite gradients, not skipped).
        skipped_steps: steps a gradient scaler skipped because of non-finite gradients.
        nonfinite_steps: steps with non-finite gradients that were not skipped.
        depth_ratio: norm of the first weight layer over the norm of the last; ``None`` with
            fewer than two weight layers.
        vanishing: the depth ratio is below its threshold, or most weight layers' norms are
            below the absolute floor.
        exploding: the total norm is above its bound, a non-finite gradient reached an
            optimizer, or a gradient scaler skipped every step of the window.
        diagnosis: the flags in plain words; empty when healthy.
    """

    layers: dict[str, GradientLayerStats]
    total_norm: float
    steps: int
    skipped_steps: int
    nonfinite_steps: int
    depth_ratio: float | None
    vanishing: bool
    exploding: bool
    diagnosis: str = ""

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flatten to logger keys (see :data:`GRADIENT_STATISTICS`)."""
        metrics: dict[str, float] = {}
        for name, layer in self.layers.items():
            metrics[f"{prefix}grad_norm/{name}"] = layer.norm
            metrics[f"{prefix}grad_nonfinite/{name}"] = float(layer.nonfinite_steps)
            if layer.update_ratio is not None:
                metrics[f"{prefix}grad_update_ratio/{name}"] = layer.update_ratio
        metrics[f"{prefix}grad_norm_total"] = self.total_norm
        if self.depth_ratio is not None:
            metrics[f"{prefix}grad_depth_ratio"] = self.depth_ratio
        metrics[f"{prefix}grad_vanishing"] = float(self.vanishing)
        metrics[f"{prefix}grad_exploding"] = float(self.exploding)
        metrics[f"{prefix}grad_skipped_steps"] = float(self.skipped_steps)
        return metrics

    def histograms(self, prefix: str = "") -> dict[str, Histogram]:
        """``{"<prefix>grad_hist/<layer>": histogram}`` for the layers that have one."""
        return {f"{prefix}grad_hist/{name}": layer.histogram for name, layer in self.layers.items() if layer.histogram}


#: Logged gradient statistic -> what it means.
GRADIENT_STATISTICS: dict[str, str] = {
    "grad_norm": "RMS over the window's steps of each layer's gradient norm",
    "grad_update_ratio": "|change of the weights| / |weights| across one optimizer step",
    "grad_nonfinite": "optimizer steps at which the layer's gradient held a NaN or infinity",
    "grad_norm_total": "RMS over the window's steps of the global gradient norm",
    "grad_depth_ratio": "gradient norm of the first weight layer / of the last",
    "grad_vanishing": "1 when gradients have vanished (see GradientStats.vanishing), else 0",
    "grad_exploding": "1 when gradients have exploded (see GradientStats.exploding), else 0",
    "grad_skipped_steps": "optimizer steps a gradient scaler skipped for non-finite gradients",
}


@dataclass(frozen=True)
class WindowSnapshot:
    """Everything measured over one window of training batches.

    Attributes:
        step: the optimizer step that closed the window.
        batches: training batches in the window (on this rank).
        measured_batches: of those, the batches whose activations and gradients were measured (see
            the overhead budget); the loss is tracked on every batch.
        overhead: the engine's estimate of the share of the training step time its callbacks took
            in this window (0.02: 2%); ``None`` until it has the timings for one.
        activations: per-layer activation statistics, in the order the layers first ran.
        gradients: gradient statistics, when a gradient consumer is attached.
        losses: the window's training loss by metric name (``""``: what ``training_step``
            returned), when a loss consumer is attached.
    """

    step: int
    batches: int
    activations: dict[str, ActivationStats]
    measured_batches: int = 0
    overhead: float | None = None
    gradients: GradientStats | None = None
    losses: dict[str, LossWindow] = field(default_factory=dict)

    def activation_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flatten activations to ``{"<prefix><statistic>/<layer>": value}`` for a logger."""
        return {
            f"{prefix}{statistic}/{name}": value
            for name, layer in self.activations.items()
            for statistic, value in layer.metrics()
        }

    def activation_histograms(self, prefix: str = "") -> dict[str, Histogram]:
        """``{"<prefix>act_out_hist/<layer>": histogram}`` for the layers that have one."""
        return {
            f"{prefix}act_out_hist/{name}": layer.histogram
            for name, layer in self.activations.items()
            if layer.histogram
        }


def histogram_from_packed(packed: Sequence[float], spec: ActivationSpec) -> Histogram:
    """A :class:`Histogram` from ``[sum, sum of squares, *bucket counts]`` read back from the device.

    The buckets are those of :func:`lightning_actguard._stats.histogram_limits` for ``spec``.
    """
    total, total_squares, *counts = packed
    limits = [*_stats.histogram_limits(spec), torch.finfo(torch.float32).max]
    nonempty = [index for index, count in enumerate(counts) if count]
    if not nonempty:
        return Histogram(0.0, 0.0, 0.0, total, total_squares, [], [])
    first, last = nonempty[0], nonempty[-1]
    lowest, highest = limits[first - 1] if first > 0 else limits[0], limits[last]
    if spec.hard_floor:
        lowest = max(lowest, spec.floor)
    if spec.bounds is not None:
        lowest, highest = max(lowest, spec.bounds[0]), min(highest, spec.bounds[1])
    return Histogram(
        minimum=lowest,
        maximum=highest,
        count=float(sum(counts)),
        total=total,
        total_squares=total_squares,
        limits=limits[first : last + 1],
        counts=counts[first : last + 1],
    )


def mean_and_std(total: float, total_squares: float, count: float) -> tuple[float, float]:
    """Mean and (population) standard deviation from running sums; NaN for an empty count."""
    if count <= 0:
        return math.nan, math.nan
    mean = total / count
    variance = total_squares / count - mean * mean
    return mean, math.sqrt(max(variance, 0.0)) if math.isfinite(variance) else math.nan
