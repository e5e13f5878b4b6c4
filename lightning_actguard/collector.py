"""Forward hooks on activation layers that keep running totals on the device.

The collector is plain PyTorch. Between :meth:`ActivationCollector.start_batch` and
:meth:`ActivationCollector.end_batch` every call of a hooked layer adds its totals to a small
per-layer buffer on the layer's device; :meth:`ActivationCollector.read` turns a window's
buffers into :class:`~lightning_actguard.snapshot.ActivationStats` with a single device-to-host
transfer, however many layers there are.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_actguard import _stats
from lightning_actguard._packing import FlatReader, ReduceSum, host_to_device, read_back
from lightning_actguard._warnings import WarnOnce
from lightning_actguard.activations import ActivationLayer, spec_for
from lightning_actguard.snapshot import ActivationStats, Histogram, histogram_from_packed, mean_and_std

__all__ = ["ActivationCollector"]

_FIELDS = (*_stats.INPUT_FIELDS, *_stats.OUTPUT_FIELDS)
_IN = slice(0, len(_stats.INPUT_FIELDS))


class _Site:
    """Running totals of one call position of one activation module."""

    def __init__(self, layer: ActivationLayer, call: int) -> None:
        self.call = call
        self.use_layer(layer)
        self.totals: Tensor | None = None
        #: Per unit, how far the largest output of the window rose above the floor (0: never).
        self.unit_rise: Tensor | None = None
        self.reduce_dims: dict[int, tuple[int, ...]] = {}
        self.out_elements = 0
        self.in_elements = 0
        self.histogram: Tensor | None = None

    def use_layer(self, layer: ActivationLayer) -> None:
        """Measure ``layer`` from now on (also when a swapped activation takes the place of another)."""
        self.layer = layer
        self.edges: Tensor | None = None
        #: Where the layer's output totals go in :attr:`totals` (unbounded activations have no saturation).
        self.out_slice = slice(_IN.stop, _IN.stop + _stats.output_field_count(layer.spec))

    def buffers(self, like: Tensor) -> Tensor:
        if self.totals is None:
            self.totals = torch.zeros(len(_FIELDS), device=like.device, dtype=torch.float32)
        return self.totals

    def reset(self) -> None:
        """Start a new window (the caller zeroes :meth:`tensors`, all sites in one call)."""
        self.out_elements = self.in_elements = 0
        self.histogram = None

    def tensors(self) -> list[Tensor]:
        return [tensor for tensor in (self.totals, self.unit_rise) if tensor is not None]


class ActivationCollector:
    """Measures activation layers during the batches it is told to.

    Args:
        unit_dim: which dimension of an output indexes units. ``"auto"``: dim 1 for outputs with
            four or more dimensions (convolutions), the last dimension otherwise. Give ``1``
            for Conv1d-shaped ``(N, C, L)`` outputs.
        saturation_eps: an output within this distance of a bound counts as saturated.
        max_calls_per_module: a module called more often than this in one batch is measured
            for its first ``max_calls_per_module`` calls only (with a warning).

    Example:
        >>> from lightning_actguard.activations import find_activation_layers
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> collector = ActivationCollector()
        >>> collector.attach(find_activation_layers(model))
        >>> collector.start_batch()
        >>> _ = model(torch.randn(8, 3))
        >>> collector.end_batch()
        >>> [layer.units for layer in collector.read()]
        [4]
        >>> collector.detach()
    """

    def __init__(
        self, *, unit_dim: int | str = "auto", saturation_eps: float = 0.01, max_calls_per_module: int = 8
    ) -> None:
        self.unit_dim = unit_dim
        self.saturation_eps = saturation_eps
        self.max_calls_per_module = max_calls_per_module
        self.batches = 0
        #: Seconds spent measuring inside the hooks (host time; on a GPU, the time to queue the work).
        self.seconds = 0.0
        self._layers: dict[int, ActivationLayer] = {}
        self._handles: dict[int, tuple[RemovableHandle, RemovableHandle]] = {}
        self._sites: dict[tuple[int, int], _Site] = {}
        self._calls: dict[int, int] = {}
        self._collecting = False
        self._measuring = False
        self._want_histograms = False
        self._failed: set[int] = set()
        self._warn = WarnOnce()
        self._packed_sites: list[_Site] = []

    # ------------------------------------------------------------------ hooks

    @property
    def layers(self) -> list[ActivationLayer]:
        """The layers measured, in the order they were attached."""
        return list(self._layers.values())

    @property
    def attached(self) -> bool:
        """Whether any hook is in place (only during a measured batch)."""
        return bool(self._handles)

    def attach(self, layers: Iterable[ActivationLayer]) -> None:
        """Measure ``layers`` too; layers already attached are skipped.

        The hooks themselves are only in place from :meth:`start_batch` of a measured batch to
        :meth:`end_batch`: a module with no hook runs PyTorch's fast path, so batches that are
        not measured (and validation) cost nothing, however many layers there are.
        """
        for layer in layers:
            key = id(layer.module)
            if key in self._layers:
                continue
            self._layers[key] = layer
            if self._measuring:
                self._hook(layer.module)

    def _hook(self, module: nn.Module) -> None:
        self._handles[id(module)] = (
            module.register_forward_pre_hook(self._before_forward),
            module.register_forward_hook(self._after_forward),
        )

    def _unhook_all(self) -> None:
        for handles in self._handles.values():
            for handle in handles:
                handle.remove()
        self._handles.clear()

    def replace(self, old: nn.Module, new: nn.Module) -> None:
        """Move the hooks of ``old`` to ``new``, which took its place in the model (a swapped activation).

        The layer keeps its name, so its statistics continue on the same lines; they are read
        against the new module's spec from now on. Call it between windows: a window that
        mixes both modules mixes their statistics.
        """
        layer = self._layers.pop(id(old), None)
        if layer is None:
            return
        hooked = self._handles.pop(id(old), ())
        for handle in hooked:
            handle.remove()
        moved = ActivationLayer(layer.name, new, spec_for(new))
        self._layers[id(new)] = moved
        if hooked:
            self._hook(new)
        self._failed.discard(id(old))
        for (module, call), site in list(self._sites.items()):
            if module == id(old):
                del self._sites[(module, call)]
                site.use_layer(moved)
                self._sites[(id(new), call)] = site

    def detach(self) -> None:
        """Remove every hook and forget the layers; safe to call more than once."""
        self._unhook_all()
        self._layers.clear()
        self._collecting = self._measuring = False

    # ------------------------------------------------------------------ batches

    def start_batch(self, histograms: bool = False, measure: bool = True) -> None:
        """Start a training batch: count it if ``measure``; with ``histograms`` also bucket its outputs."""
        self._calls.clear()
        self._measuring = self._collecting = measure
        self._want_histograms = histograms
        self.batches += measure
        if not measure:
            self._unhook_all()
        elif not self._handles:
            for layer in self._layers.values():
                self._hook(layer.module)

    def pause(self) -> None:
        """Stop counting forwards (for example recomputations during backward)."""
        self._collecting = False

    def resume(self) -> None:
        """Count forwards again after :meth:`pause`, if this batch is measured."""
        self._collecting = self._measuring

    def end_batch(self) -> None:
        """Stop counting until the next :meth:`start_batch`, and take the hooks off."""
        self._collecting = self._measuring = False
        self._want_histograms = False
        self._unhook_all()

    def _site(self, module: nn.Module, call: int) -> _Site | None:
        key = id(module)
        if call >= self.max_calls_per_module or key in self._failed:
            if call == self.max_calls_per_module:
                name = self._layers[key].name
                self._warn(
                    f"Activation layer {name!r} ran more than {self.max_calls_per_module} times in one batch; "
                    "later calls are not measured. Raise `max_calls_per_module` to measure them."
                )
            return None
        site = self._sites.get((key, call))
        if site is None:
            site = self._sites[(key, call)] = _Site(self._layers[key], call)
        return site

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self._collecting:
            return
        call = self._calls.get(id(module), 0)
        self._calls[id(module)] = call + 1
        site = self._site(module, call)
        if site is None or not args or not isinstance(args[0], Tensor):
            return
        start = time.perf_counter()
        try:
            inputs = args[0]
            site.buffers(inputs)[_IN].add_(_stats.input_totals(inputs))
            site.in_elements += inputs.numel()
        except Exception as error:
            self._give_up(module, error)
        self.seconds += time.perf_counter() - start

    def _after_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._collecting or not isinstance(output, Tensor):
            return
        site = self._site(module, self._calls.get(id(module), 1) - 1)
        if site is None:
            return
        start = time.perf_counter()
        try:
            self._measure_output(site, output)
        except Exception as error:
            self._give_up(module, error)
        self.seconds += time.perf_counter() - start

    def _measure_output(self, site: _Site, output: Tensor) -> None:
        spec = site.layer.spec
        site.buffers(output)[site.out_slice].add_(_stats.output_totals(output, spec, self.saturation_eps))
        site.out_elements += output.numel()
        dims = site.reduce_dims.get(output.dim())
        if dims is None:
            dims = site.reduce_dims[output.dim()] = _stats.unit_reduce_dims(output.dim(), self.unit_dim)
        rise = _stats.unit_maxima(output, dims)
        if spec.floor:
            rise = rise - spec.floor
        if site.unit_rise is None:
            site.unit_rise = torch.zeros_like(rise)
        if rise.shape == site.unit_rise.shape:
            torch.maximum(site.unit_rise, rise, out=site.unit_rise)
        else:
            self._warn(
                f"Activation layer {site.layer.name!r} changed its number of units from "
                f"{site.unit_rise.numel()} to {rise.numel()}; its dead units are counted on the first shape only."
            )
        if self._want_histograms and site.histogram is None:
            site.histogram = _histogram(site, output)

    def _give_up(self, module: nn.Module, error: Exception) -> None:
        self._failed.add(id(module))
        self._warn(
            f"Measuring activation layer {self._layers[id(module)].name!r} failed and is switched off for the "
            f"rest of the run ({type(error).__name__}: {error}). Training is not affected."
        )

    # ------------------------------------------------------------------ read-back

    def read(self, reduce_sum: ReduceSum | None = None) -> list[ActivationStats]:
        """Turn the window's totals into statistics and start a new window.

        Every buffer goes into one flat tensor that is reduced once with ``reduce_sum`` (a sum
        across processes under distributed training) and copied to the host once.

        Args:
            reduce_sum: sums a tensor across processes; ``None`` for a single process.

        Returns:
            One :class:`ActivationStats` per layer call position that ran, in first-run order.
        """
        pieces = self.pack()
        if not pieces:
            return []
        stats = self.unpack(read_back(pieces, reduce_sum))
        self.reset()
        return stats

    def pack(self) -> list[Tensor]:
        """The window's buffers as flat device tensors, in the order :meth:`unpack` reads them."""
        self._packed_sites = [
            site for site in self._sites.values() if site.totals is not None and site.unit_rise is not None
        ]
        return self._packed(self._packed_sites) if self._packed_sites else []

    def reset(self) -> None:
        """Start a new window."""
        tensors = [tensor for site in self._sites.values() for tensor in site.tensors()]
        if tensors:
            torch._foreach_zero_(tensors)
        for site in self._sites.values():
            site.reset()
        self.batches = 0

    def _packed(self, sites: Sequence[_Site]) -> list[Tensor]:
        device = sites[0].totals.device  # type: ignore[union-attr]
        counts = [float(n) for site in sites for n in (site.out_elements, site.in_elements)]
        pieces = [site.totals for site in sites]
        pieces.append(host_to_device(counts, device))
        # Rises are never negative, so their sum across processes is above 0 where any process saw the unit fire.
        pieces.extend(site.unit_rise for site in sites)  # type: ignore[misc]
        pieces.extend(site.histogram for site in sites if site.histogram is not None)
        return pieces  # type: ignore[return-value]

    def unpack(self, take: FlatReader) -> list[ActivationStats]:
        """Statistics from the reduced values of the last :meth:`pack`, read with ``take``."""
        sites = self._packed_sites
        totals = [take(len(_FIELDS)) for _ in sites]
        counts = [take(2) for _ in sites]
        rises = [take(site.unit_rise.numel()) for site in sites]  # type: ignore[union-attr]
        histograms = [
            None if site.histogram is None else histogram_from_packed(take(site.histogram.numel()), site.layer.spec)
            for site in sites
        ]
        calls_per_module = Counter(id(site.layer.module) for site in sites)
        stats = []
        for site, row, (out_n, in_n), unit_rises, histogram in zip(
            sites, totals, counts, rises, histograms, strict=True
        ):
            if out_n == 0:  # the layer did not run in this window (on any process)
                continue
            name = site.layer.name
            if calls_per_module[id(site.layer.module)] > 1:
                name = f"{name}[{site.call}]"
            totals_by_field = dict(zip(_FIELDS, row, strict=True))
            stats.append(_layer_stats(name, site, totals_by_field, out_n, in_n, unit_rises, histogram))
        return stats


def _layer_stats(
    name: str,
    site: _Site,
    totals: dict[str, float],
    out_n: float,
    in_n: float,
    unit_rises: list[float],
    histogram: Histogram | None,
) -> ActivationStats:
    out_mean, out_std = mean_and_std(totals["out_sum"], totals["out_sumsq"], out_n)
    in_mean, in_std = mean_and_std(totals["in_sum"], totals["in_sumsq"], in_n)
    dead = [not rise > 0 for rise in unit_rises]
    units = len(dead)
    off, saturated = _stats.output_counts(totals, site.layer.spec, out_n)
    return ActivationStats(
        name=name,
        kind=site.layer.spec.kind,
        units=units,
        dead_frac=sum(dead) / units if units else 0.0,
        zero_frac=off / out_n if out_n else 0.0,
        saturated_frac=saturated / out_n if out_n and saturated is not None else None,
        out_mean=out_mean,
        out_std=out_std,
        in_mean=in_mean,
        in_std=in_std,
        nonfinite=round(totals["nonfinite"]),
        dead_units=torch.tensor(dead, dtype=torch.bool),
        histogram=histogram,
    )


def _histogram(site: _Site, output: Tensor) -> Tensor:
    """Sum, sum of squares and bucket counts of one output, packed in one tensor."""
    if site.edges is None or site.edges.device != output.device:
        site.edges = _stats.histogram_edges(site.layer.spec, output.device)
    flat = _stats.as_float(output)
    header = torch.stack((flat.sum(), torch.dot(flat, flat))).float()
    return torch.cat((header, _stats.histogram_counts(flat, site.edges)))
