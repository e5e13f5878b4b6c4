"""Reductions of one activation tensor to a few running totals, all on the tensor's device.

The kernels are chosen for cost: comparisons that materialise boolean tensors are several
times slower than a sum on a CPU, so counts are taken from ``sign`` with a sum and a dot
product (for ``s = sign(v)``: ``sum(s)`` is #positive - #negative and ``dot(s, s)`` is
#positive + #negative). These two raw sums are what accumulates, across batches and processes
alike; :func:`output_counts` turns them into counts on the host once per window, which saves
the device a handful of scalar kernels per layer and batch. Nothing here reads a value back to
the host.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_actguard.activations import ActivationSpec

#: Order of an output's totals in :func:`output_totals`; the last two only for bounded activations.
OUTPUT_FIELDS = ("out_sum", "out_sumsq", "off_balance", "off_nonzero", "nonfinite", "sat_balance", "sat_nonzero")
#: Order of an input's totals in :func:`input_totals`.
INPUT_FIELDS = ("in_sum", "in_sumsq")


def as_float(tensor: Tensor) -> Tensor:
    """Detach and upcast half-precision tensors, so totals accumulate in float32."""
    tensor = tensor.detach()
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.reshape(-1)


def output_field_count(spec: ActivationSpec) -> int:
    """How many of :data:`OUTPUT_FIELDS` :func:`output_totals` returns for ``spec``."""
    return len(OUTPUT_FIELDS) if spec.bounds is not None else len(OUTPUT_FIELDS) - 2


def output_totals(output: Tensor, spec: ActivationSpec, saturation_eps: float) -> Tensor:
    """Totals of one activation output, in the order of :data:`OUTPUT_FIELDS`.

    ``off_*`` are the sign sums of the output's distance above the floor (of the output itself
    for activations without a hard floor), ``sat_*`` those of its distance inside the
    saturation band; :func:`output_counts` turns them into counts.

    Example:
        >>> from lightning_actguard.activations import ActivationSpec
        >>> spec = ActivationSpec("relu", floor=0.0, hard_floor=True)
        >>> output_totals(torch.tensor([0.0, 0.0, 1.0, 3.0]), spec, 0.01).tolist()
        [4.0, 10.0, 2.0, 2.0, 0.0]
    """
    flat = as_float(output)
    above_floor = flat - spec.floor if spec.hard_floor and spec.floor else flat
    signs = torch.sign(above_floor)
    # x * 0 is NaN exactly where x is NaN or infinite.
    nonfinite = (flat * 0).nan_to_num_(nan=1.0).sum()
    totals = [flat.sum(), torch.dot(flat, flat), signs.sum(), torch.dot(signs, signs), nonfinite]
    if spec.bounds is not None:
        low, high = spec.bounds
        # Negative inside the band, positive within eps of a bound.
        band = (flat - (low + high) / 2).abs_().sub_((high - low) / 2 - saturation_eps)
        band_signs = torch.sign(band)
        totals += [band_signs.sum(), torch.dot(band_signs, band_signs)]
    return torch.stack(totals)


def output_counts(totals: dict[str, float], spec: ActivationSpec, elements: float) -> tuple[float, float | None]:
    """(outputs that carry no signal, saturated outputs) from summed :func:`output_totals`.

    An output carries no signal at or below a hard floor, or when it is exactly zero; it is
    saturated within ``saturation_eps`` of either bound (``None`` for unbounded activations).

    Example:
        >>> from lightning_actguard.activations import ActivationSpec
        >>> spec = ActivationSpec("tanh", bounds=(-1.0, 1.0))
        >>> values = torch.tensor([0.0, 0.5, -0.995, 0.999])
        >>> totals = dict(zip(OUTPUT_FIELDS, output_totals(values, spec, 0.01).tolist()))
        >>> output_counts(totals, spec, 4)
        (1.0, 2.0)
    """
    balance, nonzero = totals["off_balance"], totals["off_nonzero"]
    above = (nonzero + balance) / 2
    off = elements - above if spec.hard_floor else elements - nonzero
    if spec.bounds is None:
        return off, None
    inside = (totals["sat_nonzero"] - totals["sat_balance"]) / 2
    return off, elements - inside


def input_totals(inputs: Tensor) -> Tensor:
    """Sum and sum of squares of what flows into an activation."""
    flat = as_float(inputs)
    return torch.stack((flat.sum(), torch.dot(flat, flat)))


def unit_reduce_dims(ndim: int, unit_dim: int | str) -> tuple[int, ...]:
    """Dimensions to reduce away to get one value per unit.

    With ``unit_dim="auto"`` a unit is the channel (dim 1) of outputs with four or more
    dimensions (N, C, H, W, ...) and the last dimension otherwise ((N, F), (N, L, F)).
    """
    if ndim <= 1:
        return ()
    unit = (1 if ndim >= 4 else ndim - 1) if unit_dim == "auto" else int(unit_dim) % ndim
    return tuple(dim for dim in range(ndim) if dim != unit)


def unit_maxima(output: Tensor, reduce_dims: tuple[int, ...]) -> Tensor:
    """The largest output of each unit in this batch, as float32."""
    detached = output.detach()
    maxima = detached.amax(dim=reduce_dims) if reduce_dims else detached
    return maxima.reshape(-1).float()


@functools.cache
def histogram_limits(spec: ActivationSpec) -> tuple[float, ...]:
    """Fixed bucket edges for one activation's histograms, as plain numbers.

    64 even buckets between the bounds of a bounded activation; otherwise 0 and ±10^k for k
    from -4 to 4, eight buckets a decade. Fixed, data-independent edges let the buckets be
    counted on the device without first reading the minimum and maximum back to the host.
    """
    if spec.bounds is not None:
        low, high = spec.bounds
        return tuple(low + (high - low) * index / 64 for index in range(65))
    positive = [10 ** (-4 + index / 8) for index in range(65)]
    return (*(-edge for edge in reversed(positive)), 0.0, *positive)


def histogram_edges(spec: ActivationSpec, device: torch.device | str = "cpu") -> Tensor:
    """:func:`histogram_limits` as a tensor on ``device`` (made once per layer, not per step)."""
    return torch.tensor(histogram_limits(spec), device=device)


def histogram_counts(output: Tensor, edges: Tensor) -> Tensor:
    """Counts per bucket ``(edges[i-1], edges[i]]``, with one last bucket above the top edge."""
    flat = as_float(output)
    index = torch.bucketize(flat, edges)
    counts = torch.zeros(edges.numel() + 1, device=flat.device, dtype=torch.float32)
    return counts.index_add_(0, index, torch.ones_like(flat, dtype=torch.float32))
