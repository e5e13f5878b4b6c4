"""How far each layer has moved from its starting (pretrained) weights, measured on the device.

Plain PyTorch. :class:`DriftTracker` keeps a copy of the model's floating-point parameters as
they were when it was built, on their own devices, and computes each parameter's change
``||w - w0||`` with fused multi-tensor kernels (``torch._foreach_sub``, ``torch._foreach_norm``)
over chunks of parameters, so the temporary memory stays bounded by ``chunk_elements``. The
norms are stacked into one device tensor, for one read-back together with whatever else the
caller reads.

A layer is a module that owns parameters directly (``net.0`` for ``net.0.weight`` and
``net.0.bias``; ``(root)`` for parameters of the model itself). Its relative drift is
``sqrt(sum ||w - w0||^2) / sqrt(sum ||w0||^2)`` over its parameters: 0.01 means the layer moved by
1% of its size. Fine-tuning commonly moves layers by a few percent at most; the deeper layers
(near the output) move most.

The reference copy costs one more copy of the parameters in device memory.

:func:`optimizer_membership` sorts the parameters by what the user meant: frozen, trained, or
inconsistently set (frozen but handed to an optimizer, trainable but in none). Together with
:meth:`DriftReport.unchanged` it tells whether the frozen stay frozen and the trained do change.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_actguard._packing import FlatReader, read_back

__all__ = ["DriftReport", "DriftTracker", "Membership", "drift_layers", "optimizer_membership"]

#: Elements of parameter differences materialised at once.
DEFAULT_CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class DriftReport:
    """The model's distance from its reference weights at one moment.

    Attributes:
        layers: relative drift per layer, ``||w - w0|| / ||w0||`` over its parameters; ``inf``
            for a layer that started at zero and moved, NaN when its weights hold a NaN.
        changes: ``||w - w0||`` per parameter (qualified name); exactly 0.0 for a parameter that
            has not changed at all.
    """

    layers: dict[str, float]
    changes: dict[str, float]

    def unchanged(self, names: set[str] | None = None) -> list[str]:
        """The parameters (among ``names``, if given) whose values are exactly the reference's."""
        return [name for name, change in self.changes.items() if change == 0.0 and (names is None or name in names)]


@dataclass(frozen=True)
class Membership:
    """The model's parameters (qualified names) by ``requires_grad`` and optimizer membership.

    Attributes:
        trained: trainable and in an optimizer: these should change.
        frozen: not trainable and in no optimizer: these should stay as they are.
        frozen_in_optimizer: in an optimizer with ``requires_grad`` off: they get no gradient,
            so the optimizer never moves them; a sign of a freezing mistake.
        trainable_outside: trainable but in no optimizer: they get gradients but never change.
    """

    trained: list[str]
    frozen: list[str]
    frozen_in_optimizer: list[str]
    trainable_outside: list[str]


def optimizer_membership(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> Membership:
    """Sort ``model``'s parameters by what the user meant with them (see :class:`Membership`).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> _ = model[0].requires_grad_(False)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> optimizer_membership(model, [optimizer]).frozen_in_optimizer
        ['0.weight', '0.bias']
    """
    held = {id(param) for optimizer in optimizers for group in optimizer.param_groups for param in group["params"]}
    by_kind: dict[tuple[bool, bool], list[str]] = defaultdict(list)  # (trainable, held) -> names
    for name, param in model.named_parameters():
        by_kind[param.requires_grad, id(param) in held].append(name)
    return Membership(
        trained=by_kind[True, True],
        frozen=by_kind[False, False],
        frozen_in_optimizer=by_kind[False, True],
        trainable_outside=by_kind[True, False],
    )


class DriftTracker:
    """Measures the drift of ``model``'s floating-point parameters from their values at construction.

    Args:
        model: the model; its parameters are copied now (trainable and frozen alike).
        reference: starting values by parameter name, instead of the current ones (a reference
            restored from a checkpoint); tensors are copied onto each parameter's device.
        chunk_elements: elements of differences computed at once.

    Raises:
        ValueError: ``reference`` lacks a parameter or has one of another shape.

    Example:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        >>> tracker = DriftTracker(model)
        >>> with torch.no_grad():
        ...     model.weight[0, 0] += 0.5
        >>> tracker.measure().layers
        {'(root)': 0.1}
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reference: Mapping[str, Tensor] | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        found = _floating_parameters(model)
        self.names: list[str] = [name for name, _, _ in found]
        self.layer_of: dict[str, str] = {name: layer for name, layer, _ in found}
        self._params: list[Tensor] = [param for _, _, param in found]
        self._reference = [
            self._reference_for(name, param, reference) for name, param in zip(self.names, self._params, strict=True)
        ]
        self._chunks = _chunks([param.numel() for param in self._params], chunk_elements)
        self._reference_norms = [norm for chunk in self._chunks for norm in _norms(chunk, self._reference)]

    @staticmethod
    def _reference_for(name: str, param: Tensor, reference: Mapping[str, Tensor] | None) -> Tensor:
        if reference is None:
            return param.detach().clone()
        if name not in reference or reference[name].shape != param.shape:
            found = "missing" if name not in reference else f"of shape {tuple(reference[name].shape)}"
            raise ValueError(f"`reference` must hold {name!r} of shape {tuple(param.shape)}, got {found}.")
        return reference[name].detach().to(device=param.device, dtype=param.dtype, copy=True)

    @property
    def layers(self) -> list[str]:
        """Layer names, each once, in registration order."""
        return list(dict.fromkeys(self.layer_of.values()))

    def reference_state(self) -> dict[str, Tensor]:
        """The reference values by parameter name, copied to the CPU (for a checkpoint)."""
        return {name: ref.detach().to("cpu", copy=True) for name, ref in zip(self.names, self._reference, strict=True)}

    def pack(self) -> list[Tensor]:
        """``[changes..., reference norms...]`` as one device tensor, in :attr:`names` order; no read-back."""
        if not self._params:
            return []
        with torch.no_grad():
            changes = [norm for chunk in self._chunks for norm in _changes(chunk, self._params, self._reference)]
        device = self._params[0].device
        return [torch.stack([norm.to(device, torch.float32) for norm in (*changes, *self._reference_norms)])]

    def unpack(self, take: FlatReader) -> DriftReport:
        """The report from the values of the last :meth:`pack`, read with ``take``."""
        changes = dict(zip(self.names, take(len(self.names)), strict=True))
        references = dict(zip(self.names, take(len(self.names)), strict=True))
        squared_change: dict[str, float] = {}
        squared_reference: dict[str, float] = {}
        for name, layer in self.layer_of.items():
            squared_change[layer] = squared_change.get(layer, 0.0) + changes[name] ** 2
            squared_reference[layer] = squared_reference.get(layer, 0.0) + references[name] ** 2
        layers = {layer: _ratio(squared_change[layer], squared_reference[layer]) for layer in squared_change}
        return DriftReport(layers=layers, changes=changes)

    def measure(self) -> DriftReport:
        """Measure now, with its own read-back (for use on its own)."""
        pieces = self.pack()
        if not pieces:
            return DriftReport({}, {})
        return self.unpack(read_back(pieces))


def drift_layers(model: nn.Module) -> list[str]:
    """The layers a :class:`DriftTracker` of ``model`` reports on, in registration order.

    Example:
        >>> drift_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
        ['0', '2']
    """
    return list(dict.fromkeys(layer for _, layer, _ in _floating_parameters(model)))


def _floating_parameters(model: nn.Module) -> list[tuple[str, str, Tensor]]:
    """``(parameter name, layer name, parameter)`` for each floating-point parameter, each once."""
    found: list[tuple[str, str, Tensor]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.is_floating_point():
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            found.append((name, module_name or "(root)", param))
    return found


def _ratio(change_squared: float, reference_squared: float) -> float:
    if math.isnan(change_squared):
        return math.nan
    if reference_squared == 0.0:
        return 0.0 if change_squared == 0.0 else math.inf
    return math.sqrt(change_squared / reference_squared)


def _chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Indices of consecutive parameters grouped so that each group holds about ``limit`` elements at most."""
    chunks: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if not chunks or total + size > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += size
    return chunks


def _norms(indices: list[int], tensors: list[Tensor]) -> list[Tensor]:
    return list(torch._foreach_norm([tensors[index] for index in indices], 2, dtype=torch.float32))


def _changes(indices: list[int], params: list[Tensor], reference: list[Tensor]) -> list[Tensor]:
    current = [params[index].detach() for index in indices]
    start = [reference[index] for index in indices]
    return list(torch._foreach_norm(torch._foreach_sub(current, start), 2, dtype=torch.float32))
