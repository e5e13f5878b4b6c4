"""Give dead units a fresh start: re-initialise their incoming weights and bias, nothing else.

Plain PyTorch. A ReLU unit whose pre-activation is negative on every input gets no gradient and
stays dead whatever the learning rate. :func:`revive_units` draws new values, with the layer
type's default initialisation, for the row of the weight that feeds each such unit (a row of a
``Linear`` weight, an output channel of a convolution weight) and its bias entry; every other
entry of the layer is left bit for bit as it was. The optimizer state of those entries (Adam's
moments, SGD's momentum) is zeroed too, so that momentum built up while the unit died does not
push it straight back.

:func:`feeding_layer` finds the layer whose outputs an activation's units are, by a simple rule
(see there). :class:`Reviver` puts both together for a model: given which units fired in a
baseline and which are dead now, it revives those that died since.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_actguard.activations import TORCH_ACTIVATIONS

__all__ = ["Revival", "Reviver", "feeding_layer", "revivable", "revive_units"]


def revivable(module: nn.Module) -> bool:
    """Whether :func:`revive_units` knows ``module``'s unit layout: ``Linear`` and non-transposed ``ConvNd``."""
    if isinstance(module, _ConvNd):
        return not module.transposed
    return isinstance(module, nn.Linear)


def feeding_layer(model: nn.Module, activation: str, units: int | None = None) -> tuple[str, nn.Module] | None:
    """The weight layer whose outputs are the units of activation layer ``activation``.

    The rule: the nearest module before ``activation`` in ``model.named_modules()`` order that
    has a weight of two or more dimensions, provided it is a ``Linear`` or a (non-transposed)
    convolution with ``units`` outputs and no other activation (:data:`~lightning_actguard.
    activations.TORCH_ACTIVATIONS`) comes between. Layers without such a weight in between
    (BatchNorm, LayerNorm, Dropout) are stepped over.

    Limits: registration order is not always the order of the forward pass (a model that
    registers its activation before its layers, or applies one activation module after several
    layers); a residual sum or a concatenation before the activation mixes several layers. The
    rule then finds no layer, or the wrong one: name the layer explicitly instead. A
    normalisation layer stepped over keeps its own per-unit scale and shift, which may keep a
    revived unit silent.

    Args:
        model: the model.
        activation: qualified name of the activation module.
        units: number of units the activation has; ``None`` skips the size check.

    Returns:
        ``(name, module)``, or ``None`` when the rule finds no matching layer.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        >>> feeding_layer(model, "2", units=8)[0]
        '0'
    """
    nearest: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if name == activation:
            if nearest is None or not revivable(nearest[1]):
                return None
            if units is not None and nearest[1].weight.shape[0] != units:
                return None
            return nearest
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() >= 2:
            nearest = (name, module)
        elif isinstance(module, TORCH_ACTIVATIONS):
            nearest = None
    return None


def revive_units(
    layer: nn.Module,
    units: Sequence[int] | Tensor,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    generator: torch.Generator | None = None,
) -> int:
    """Re-initialise the incoming weights and bias of ``units`` of ``layer``, and their optimizer state.

    The new values follow the default initialisation of ``Linear`` and ``ConvNd`` layers: uniform
    in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` for the weights and the bias alike, where ``fan_in``
    is the number of inputs of one unit. They are drawn on the CPU from ``generator``, so the same
    generator seed gives the same values on every process and device.

    In every optimizer that holds the weight or the bias, each state tensor shaped like that
    parameter (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``, RMSprop's
    ``square_avg``) is zeroed at the units' entries. State shared by the whole tensor, such as
    Adam's step count, is left alone, so the revived entries restart their moments with the
    bias correction of a late step: their first updates are somewhat larger than Adam's first
    step.

    Args:
        layer: a ``Linear`` or non-transposed convolution layer.
        units: indices of the output units to revive.
        optimizers: optimizers whose state to reset at those entries.
        generator: random source; ``None`` uses torch's global CPU generator.

    Returns:
        The number of units revived.

    Raises:
        TypeError: ``layer`` is of another type.
        IndexError: a unit index is out of range.

    Example:
        >>> layer = nn.Linear(3, 4)
        >>> before = layer.weight.detach().clone()
        >>> revive_units(layer, [1], generator=torch.Generator().manual_seed(0))
        1
        >>> bool(torch.equal(layer.weight[[0, 2, 3]], before[[0, 2, 3]]))
        True
    """
    if not revivable(layer):
        raise TypeError(f"`layer` must be a Linear or a non-transposed convolution, got {type(layer).__name__}.")
    weight: Tensor = layer.weight  # type: ignore[assignment]
    bias: Tensor | None = layer.bias  # type: ignore[assignment]
    index = torch.as_tensor(units, dtype=torch.long).flatten().unique()
    if not index.numel():
        return 0
    if index.min() < 0 or index.max() >= weight.shape[0]:
        raise IndexError(f"`units` must lie in [0, {weight.shape[0]}), got {index.tolist()}.")
    fan_in = weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    rows = torch.empty((index.numel(), *weight.shape[1:]), dtype=torch.float32).uniform_(
        -bound, bound, generator=generator
    )
    on_device = index.to(weight.device)
    with torch.no_grad():
        weight.index_copy_(0, on_device, rows.to(device=weight.device, dtype=weight.dtype))
        if bias is not None:
            entries = torch.empty(index.numel()).uniform_(-bound, bound, generator=generator)
            bias.index_copy_(0, on_device, entries.to(device=bias.device, dtype=bias.dtype))
        for optimizer in optimizers:
            for param in (weight, bias):
                if param is not None:
                    _reset_state(optimizer.state.get(param, {}), param, on_device)
    return int(index.numel())


def _reset_state(state: dict[str, object], param: Tensor, index: Tensor) -> None:
    for value in state.values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.index_fill_(0, index.to(value.device), 0)


@dataclass(frozen=True)
class Revival:
    """Units of one layer given a fresh start.

    Attributes:
        activation: the activation layer whose units had died.
        layer: the weight layer whose entries were re-initialised.
        units: the unit indices.
    """

    activation: str
    layer: str
    units: list[int]


class Reviver:
    """Revives, in ``model``, the units that fired in a baseline and are dead now.

    Args:
        model: the model.
        alive: per activation layer, the units that fired in the baseline (boolean mask).
        layers: ``{activation: weight layer name}`` to revive those activations only, with the
            layers named; ``None`` revives every activation whose layer :func:`feeding_layer` finds.
        on_missing: called once with ``(activation, units)`` for an activation with dead units
            whose layer cannot be found or is not revivable.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> reviver = Reviver(model, alive={"1": torch.tensor([True, True, False])})
        >>> dead_now = {"1": torch.tensor([False, True, True])}  # unit 2 was dead from the start
        >>> reviver.revive(dead_now, optimizers=[], seed=0)
        [Revival(activation='1', layer='0', units=[1])]
    """

    def __init__(
        self,
        model: nn.Module,
        alive: Mapping[str, Tensor],
        layers: Mapping[str, str] | None = None,
        on_missing: Callable[[str, int], None] | None = None,
    ) -> None:
        self.model = model
        self.alive = alive
        self.layers = layers
        self.on_missing = on_missing
        self._found: dict[str, tuple[str, nn.Module] | None] = {}

    def layer_for(self, activation: str, units: int) -> tuple[str, nn.Module] | None:
        """The ``(name, module)`` to re-initialise for ``activation``, looked up once."""
        if activation in self._found:
            return self._found[activation]
        found = None
        if self.layers is None:
            found = feeding_layer(self.model, activation, units)
        elif activation in self.layers:
            module = self.model.get_submodule(self.layers[activation])
            if revivable(module) and module.weight.shape[0] == units:  # type: ignore[union-attr]
                found = (self.layers[activation], module)
        self._found[activation] = found
        wanted = self.layers is None or activation in self.layers
        if found is None and wanted and self.on_missing is not None:
            self.on_missing(activation, units)
        return found

    def revive(
        self, dead: Mapping[str, Tensor], optimizers: Iterable[torch.optim.Optimizer], seed: int
    ) -> list[Revival]:
        """Revive the units dead in ``dead`` (per activation, a boolean mask) that were alive in the baseline.

        Args:
            dead: per activation layer, True where the unit is dead now.
            optimizers: their state at the revived entries is zeroed.
            seed: the new values are drawn from a generator seeded with ``seed`` and the layer's
                position in ``dead``: the same on every process.

        Returns:
            What was revived, one entry per layer with revived units.
        """
        optimizers = list(optimizers)
        revivals = []
        for index, (name, mask) in enumerate(dead.items()):
            alive = self.alive.get(name)
            if alive is None or alive.shape != mask.shape:
                continue
            units = (mask & alive).nonzero().flatten()
            target = self.layer_for(name, mask.numel()) if units.numel() else None
            if target is None:
                continue
            revive_units(target[1], units, optimizers, torch.Generator().manual_seed(seed * 1009 + index))
            revivals.append(Revival(name, target[0], units.tolist()))
        return revivals
