"""Per-layer gradient norms, accumulated on the device at each optimizer step.

Plain PyTorch. Call :meth:`GradientCollector.before_step` where the gradients are final (after
unscaling, right before ``optimizer.step()``); it adds each layer's squared gradient norm to a
device buffer with fused multi-tensor kernels and no host synchronisation. Once per window the
buffers are packed, reduced and read back with everything else the engine measures.

A *layer* is a module that owns trainable parameters directly (``net.0`` for ``net.0.weight``
and ``net.0.bias``); layers are listed in registration order, which for most models is the
order from input to output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_actguard import _stats
from lightning_actguard._packing import FlatReader, ReduceSum, read_back
from lightning_actguard._warnings import WarnOnce
from lightning_actguard.activations import ActivationSpec
from lightning_actguard.snapshot import GradientLayerStats, GradientStats, Histogram, histogram_from_packed

__all__ = ["GradientCollector", "GradientThresholds"]

_TOTALS = ("total_sq", "steps", "skipped_steps", "nonfinite_steps")
#: Elements of each parameter (evenly spaced) on which the update ratio is measured: a copy of
#: these, not of the whole weights, is what the measurement costs.
UPDATE_RATIO_SAMPLE = 4096
_UNBOUNDED = ActivationSpec("gradient")  # gradients use the symmetric log-spaced buckets


@dataclass(frozen=True)
class GradientThresholds:
    """When gradients count as vanished or exploded.

    Attributes:
        vanishing_ratio: vanished when the first weight layer's gradient norm is below this
            share of the last weight layer's (default 1e-3, a thousandfold decay with depth).
        vanishing_floor: also vanished when most weight layers' gradient norms are below this.
        exploding_norm: exploded when the global gradient norm is above this.
    """

    vanishing_ratio: float = 1e-3
    vanishing_floor: float = 1e-8
    exploding_norm: float = 1e3


class GradientCollector:
    """Accumulates gradient norms and update ratios of ``model``'s layers.

    Args:
        model: the model whose trainable parameters are measured.
        thresholds: when to raise the vanishing and exploding flags.
        update_ratio: also measure how far the window's first optimizer step moved each layer's
            weights, on up to :data:`UPDATE_RATIO_SAMPLE` evenly spaced elements of each parameter
            (all of a smaller one), copied during that one step.
        sharded: the parameters are shards (FSDP): squared norms are summed across processes.
            Otherwise every process holds the same averaged gradients and the sums are divided by
            the number of processes.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> collector = GradientCollector(model)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> collector.before_step(optimizer)
        >>> list(collector.read().layers)
        ['0', '2']
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        thresholds: GradientThresholds | None = None,
        update_ratio: bool = True,
        sharded: bool = False,
    ) -> None:
        self.thresholds = thresholds or GradientThresholds()
        self.update_ratio = update_ratio
        self.sharded = sharded
        self.layer_names: list[str] = []
        self._layer_of: dict[int, int] = {}
        self._weight_layers: list[int] = []
        self._index_layers(model)
        self._buffers: dict[str, Tensor] = {}
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self._measure_update_next = update_ratio
        self._before_update: dict[int, tuple[list[Tensor], list[Tensor], Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        self._hooked: set[int] = set()
        self._histograms: Tensor | None = None
        self._edges: Tensor | None = None
        self._warn = WarnOnce()
        self._packed_histograms = False
        #: Seconds spent measuring (host time; on a GPU, the time to queue the work).
        self.seconds = 0.0

    def _index_layers(self, model: nn.Module) -> None:
        seen: set[int] = set()
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                if not self.layer_names or self.layer_names[-1] != (module_name or "(root)"):
                    self.layer_names.append(module_name or "(root)")
                layer = len(self.layer_names) - 1
                self._layer_of[id(param)] = layer
                if param_name == "weight" and param.dim() >= 2 and layer not in self._weight_layers:
                    self._weight_layers.append(layer)

    # ------------------------------------------------------------------ optimizer steps

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Hook the end of each optimizer's ``step()`` to finish update-ratio measurements."""
        for optimizer in optimizers:
            if id(optimizer) not in self._hooked:
                self._hooked.add(id(optimizer))
                self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def detach(self) -> None:
        """Remove the optimizer hooks; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        self._before_update.clear()

    def before_step(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        grad_scale: Tensor | None = None,
        scaler: bool = False,
        histograms: bool = False,
    ) -> None:
        """Add this step's gradient norms of the parameters ``optimizer`` updates.

        Args:
            optimizer: the optimizer about to step.
            grad_scale: the loss scale still multiplying the gradients, for optimizers that
                unscale inside their own ``step()`` (fused Adam under a GradScaler).
            scaler: a gradient scaler will skip this step if its gradients are not finite; such
                steps are counted as skipped instead of exploding.
            histograms: also bucket each layer's gradients, if not done yet in this window.
        """
        params = _params(optimizer)
        pairs = [(p, self._layer_of[id(p)]) for p in params if id(p) in self._layer_of]
        if params and not pairs:
            self._warn(
                "None of the parameters this optimizer updates belongs to a module of the model (a strategy may "
                "have replaced them, as FSDP does without use_orig_params=True): their gradients are not measured."
            )
        pairs = [(p, layer) for p, layer in pairs if p.grad is not None and not p.grad.is_sparse]
        if not pairs:
            return
        start = time.perf_counter()
        try:
            self._add_norms(pairs, grad_scale, scaler)
            if self._measure_update_next:
                self._copy_weights(optimizer, pairs)
            if histograms and self._histograms is None:
                self._histograms = self._bucket(pairs, grad_scale)
        except Exception as error:
            self._warn(f"Measuring gradients failed at one step and was skipped ({type(error).__name__}: {error}).")
        self.seconds += time.perf_counter() - start

    def _add_norms(self, pairs: list[tuple[nn.Parameter, int]], grad_scale: Tensor | None, scaler: bool) -> None:
        grads = [p.grad for p, _ in pairs]
        squares = torch.stack(torch._foreach_norm(grads)).float().square()  # type: ignore[arg-type]
        if grad_scale is not None:
            squares = squares / grad_scale.float().square()
        per_layer = self._per_layer(squares, pairs)
        total = per_layer.sum()
        finite = torch.isfinite(total)
        buffers = self._state(per_layer.device)
        buffers["nonfinite"].add_(~torch.isfinite(per_layer))
        buffers["squares"].add_(torch.where(finite, per_layer, 0.0))
        nonfinite = (~finite).float()
        step = torch.stack(
            (torch.where(finite, total, 0.0), finite.float(), nonfinite * scaler, nonfinite * (not scaler))
        )
        buffers["totals"].add_(step)

    def _layer_index(self, pairs: list[tuple[nn.Parameter, int]], device: torch.device) -> Tensor:
        """The layer of each parameter as a device tensor, made once per set of parameters."""
        key = tuple(layer for _, layer in pairs)
        index = self._index_cache.get(key)
        if index is None or index.device != device:
            index = self._index_cache[key] = torch.tensor(key, device=device)
        return index

    def _per_layer(self, values: Tensor, pairs: list[tuple[nn.Parameter, int]]) -> Tensor:
        index = self._layer_index(pairs, values.device)
        return values.new_zeros(len(self.layer_names)).index_add_(0, index, values)

    def _state(self, device: torch.device) -> dict[str, Tensor]:
        if not self._buffers:
            layers = len(self.layer_names)
            self._buffers = {
                "squares": torch.zeros(layers, device=device),
                "nonfinite": torch.zeros(layers, device=device),
                "totals": torch.zeros(len(_TOTALS), device=device),
                "update": torch.zeros(2, layers, device=device),
            }
        return self._buffers

    def _bucket(self, pairs: list[tuple[nn.Parameter, int]], grad_scale: Tensor | None) -> Tensor:
        device = pairs[0][0].device
        if self._edges is None or self._edges.device != device:
            self._edges = _stats.histogram_edges(_UNBOUNDED, device)
        packed = torch.zeros(len(self.layer_names), 2 + self._edges.numel() + 1, device=device)
        for param, layer in pairs:
            grad = _stats.as_float(param.grad if grad_scale is None else param.grad / grad_scale)  # type: ignore[arg-type, operator]
            packed[layer, 0] += grad.sum()
            packed[layer, 1] += torch.dot(grad, grad)
            packed[layer, 2:] += _stats.histogram_counts(grad, self._edges)
        return packed

    def _copy_weights(self, optimizer: torch.optim.Optimizer, pairs: list[tuple[nn.Parameter, int]]) -> None:
        samples = [_update_sample(p) for p, _ in pairs]
        layers = self._layer_index(pairs, samples[0].device)
        self._before_update[id(optimizer)] = (samples, [sample.clone() for sample in samples], layers)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        measured = self._before_update.pop(id(optimizer), None)
        if measured is None:
            return
        samples, before, layers = measured
        start = time.perf_counter()
        try:
            changes = torch.stack(torch._foreach_norm(torch._foreach_sub(samples, before))).float().square()
            sizes = torch.stack(torch._foreach_norm(before)).float().square()
            update = self._buffers["update"]
            update[0].index_add_(0, layers, changes)
            update[1].index_add_(0, layers, sizes)
            self._measure_update_next = False
        except Exception as error:
            self._warn(f"Measuring the update ratio failed and was skipped ({type(error).__name__}: {error}).")
        self.seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ read-back

    def pack(self) -> list[Tensor]:
        """The window's buffers as flat device tensors, in the order :meth:`unpack` reads them."""
        if not self._buffers:
            return []
        pieces = [self._buffers[name].flatten() for name in ("squares", "nonfinite", "totals", "update")]
        self._packed_histograms = self._histograms is not None
        if self._histograms is not None:
            pieces.append(self._histograms.flatten())
        return pieces

    def unpack(self, take: FlatReader, world_size: int = 1) -> GradientStats | None:
        """Statistics from the reduced values of the last :meth:`pack`."""
        if not self._buffers:
            return None
        layers = len(self.layer_names)
        squares, nonfinite = take(layers), take(layers)
        totals = dict(zip(_TOTALS, take(len(_TOTALS)), strict=True))
        changes, sizes = take(layers), take(layers)
        histograms: dict[str, Histogram] = {}
        if self._packed_histograms:
            width = 2 + self._edges.numel() + 1  # type: ignore[union-attr]
            for name in self.layer_names:
                histograms[name] = histogram_from_packed(take(width), _UNBOUNDED)
        replicas = 1 if self.sharded else world_size
        counts = world_size  # every process counts the same steps
        steps = totals["steps"] / counts
        per_step = replicas * steps if steps else math.nan

        def rms(value: float) -> float:
            return math.sqrt(value / per_step) if steps else math.nan

        stats = {
            name: GradientLayerStats(
                name=name,
                norm=rms(squares[index]),
                nonfinite_steps=round(nonfinite[index] / counts),
                update_ratio=math.sqrt(changes[index] / sizes[index]) if sizes[index] > 0 else None,
                histogram=histograms.get(name),
            )
            for index, name in enumerate(self.layer_names)
        }
        return self._judge(
            stats,
            rms(totals["total_sq"]),
            round(steps),
            totals["skipped_steps"] / counts,
            totals["nonfinite_steps"] / counts,
        )

    def _judge(
        self, layers: dict[str, GradientLayerStats], total_norm: float, steps: int, skipped: float, nonfinite: float
    ) -> GradientStats:
        weight_norms = [layers[self.layer_names[index]].norm for index in self._weight_layers]
        depth_ratio = weight_norms[0] / weight_norms[-1] if len(weight_norms) >= 2 and weight_norms[-1] > 0 else None
        limits = self.thresholds
        vanished, exploded = [], []
        if depth_ratio is not None and depth_ratio < limits.vanishing_ratio:
            first, last = (self.layer_names[self._weight_layers[i]] for i in (0, -1))
            vanished.append(
                f"the first layer {first!r} gets {depth_ratio:.1e} of the gradient norm of the last layer {last!r} "
                f"(threshold {limits.vanishing_ratio:g})"
            )
        below_floor = sum(norm < limits.vanishing_floor for norm in weight_norms)
        if below_floor > len(weight_norms) / 2:
            floor = limits.vanishing_floor
            vanished.append(f"{below_floor} of {len(weight_norms)} weight layers have gradient norms below {floor:g}")
        if total_norm > limits.exploding_norm:
            exploded.append(f"the global norm {total_norm:.3g} is above {limits.exploding_norm:g}")
        if nonfinite:
            exploded.append(f"{round(nonfinite)} optimizer steps got NaN or infinite gradients")
        if skipped and not steps:
            exploded.append(f"the gradient scaler skipped all {round(skipped)} steps of the window")
        verdicts = [
            f"gradients have {verb}: {'; '.join(reasons)}"
            for verb, reasons in (("vanished", vanished), ("exploded", exploded))
            if reasons
        ]
        return GradientStats(
            layers=layers,
            total_norm=total_norm,
            steps=steps,
            skipped_steps=round(skipped),
            nonfinite_steps=round(nonfinite),
            depth_ratio=depth_ratio,
            vanishing=bool(vanished),
            exploding=bool(exploded),
            diagnosis=". ".join(verdicts),
        )

    def reset(self) -> None:
        """Start a new window."""
        if self._buffers:
            torch._foreach_zero_(list(self._buffers.values()))
        self._before_update.clear()
        self._measure_update_next = self.update_ratio
        self._histograms = None

    def read(self, reduce_sum: ReduceSum | None = None, world_size: int = 1) -> GradientStats | None:
        """Reduce, read back and reset in one go (for use without the engine)."""
        pieces = self.pack()
        if not pieces:
            return None
        stats = self.unpack(read_back(pieces, reduce_sum), world_size)
        self.reset()
        return stats


def _update_sample(param: nn.Parameter) -> Tensor:
    """A view of about :data:`UPDATE_RATIO_SAMPLE` evenly spaced elements of ``param``, which the step updates in place.

    A parameter that is not contiguous (channels-last convolution weights) cannot be flattened
    into a view, and is taken whole.
    """
    if not param.is_contiguous():
        return param.detach()
    flat = param.detach().view(-1)
    return flat[:: max(flat.numel() // UPDATE_RATIO_SAMPLE, 1)]


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [param for group in optimizer.param_groups for param in group["params"]]
