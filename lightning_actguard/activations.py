"""Which modules count as activations, and what "off" and "saturated" mean for each.

Every statistic the monitors report is read against an :class:`ActivationSpec`: the *floor*
below which an output carries no signal, and for bounded activations the two *bounds* near
which the gradient vanishes. This module knows the specs of every element-wise activation in
``torch.nn`` and finds the activation layers of a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "TORCH_ACTIVATIONS",
    "ActivationLayer",
    "ActivationSpec",
    "LayerPredicate",
    "find_activation_layers",
    "spec_for",
]

LayerPredicate = Callable[[str, nn.Module], bool]
ExtraTypes = Sequence[type[nn.Module]] | Mapping[type[nn.Module], str]


@dataclass(frozen=True)
class ActivationSpec:
    """How to read the outputs of one activation.

    Attributes:
        kind: lowercase name of the activation (``"relu"``, ``"sigmoid"``, ...).
        floor: a unit *fires* when its output is above ``floor``; a unit that never fires in a
            window is dead. The lowest output for activations bounded below (ReLU's 0, tanh's -1,
            ``ELU``'s ``-alpha``); 0, "never positive", for the rest (LeakyReLU, GELU, SiLU...).
        hard_floor: True when outputs pile up exactly at ``floor`` (ReLU's zeros); the zero share
            then counts outputs at or below the floor. Otherwise it counts outputs exactly 0.
        bounds: ``(low, high)`` for activations bounded on both sides (sigmoid, tanh), whose
            gradient vanishes near either bound; ``None`` for the rest.
    """

    kind: str
    floor: float = 0.0
    hard_floor: bool = False
    bounds: tuple[float, float] | None = None


def _relu_like(kind: str) -> ActivationSpec:
    return ActivationSpec(kind, floor=0.0, hard_floor=True)


def _signed(kind: str) -> ActivationSpec:
    return ActivationSpec(kind)


_STATIC_SPECS: dict[type[nn.Module], ActivationSpec] = {
    nn.ReLU: _relu_like("relu"),
    nn.ReLU6: ActivationSpec("relu6", floor=0.0, hard_floor=True, bounds=(0.0, 6.0)),
    nn.Sigmoid: ActivationSpec("sigmoid", floor=0.0, hard_floor=True, bounds=(0.0, 1.0)),
    nn.Hardsigmoid: ActivationSpec("hardsigmoid", floor=0.0, hard_floor=True, bounds=(0.0, 1.0)),
    nn.Softplus: _relu_like("softplus"),
    # A tanh unit that never rises above -1 is stuck, one that is merely negative is not.
    nn.Tanh: ActivationSpec("tanh", floor=-1.0, bounds=(-1.0, 1.0)),
    nn.Softsign: ActivationSpec("softsign", floor=-1.0, bounds=(-1.0, 1.0)),
    nn.LeakyReLU: _signed("leakyrelu"),
    nn.PReLU: _signed("prelu"),
    nn.RReLU: _signed("rrelu"),
    nn.GELU: _signed("gelu"),
    nn.SiLU: _signed("silu"),
    nn.Mish: _signed("mish"),
    nn.Hardswish: _signed("hardswish"),
    nn.GLU: _signed("glu"),
    nn.Hardshrink: _signed("hardshrink"),
    nn.Softshrink: _signed("softshrink"),
    nn.Tanhshrink: _signed("tanhshrink"),
    # Always negative: "never positive" would call every unit dead, so no unit ever is.
    nn.LogSigmoid: ActivationSpec("logsigmoid", floor=float("-inf")),
}

#: ``torch.nn`` activation classes the monitors know. Softmax, Softmin, Softmax2d, LogSoftmax
#: (normalisers across a dimension) and MultiheadAttention are deliberately not among them.
TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    *_STATIC_SPECS,
    nn.Hardtanh,
    nn.Threshold,
    nn.ELU,
    nn.CELU,
    nn.SELU,
)

# SELU's fixed constants: its outputs never go below -scale * alpha.
_SELU_FLOOR = -1.0507009873554805 * 1.6732632423543772


def _spec_from_parameters(module: nn.Module) -> ActivationSpec | None:
    """Specs that depend on the module's own arguments (bounds, alpha)."""
    if isinstance(module, nn.ReLU6):  # a Hardtanh subclass with a static spec
        return None
    if isinstance(module, nn.Hardtanh):
        low, high = float(module.min_val), float(module.max_val)
        return ActivationSpec("hardtanh", floor=low, hard_floor=True, bounds=(low, high))
    if isinstance(module, nn.Threshold):
        return ActivationSpec("threshold", floor=float(module.value), hard_floor=True)
    if isinstance(module, (nn.ELU, nn.CELU)):
        return ActivationSpec(type(module).__name__.lower(), floor=-float(module.alpha), hard_floor=True)
    if isinstance(module, nn.SELU):
        return ActivationSpec("selu", floor=_SELU_FLOOR, hard_floor=True)
    return None


def _kind_registry() -> dict[str, ActivationSpec]:
    by_kind = {spec.kind: spec for spec in _STATIC_SPECS.values()}
    by_kind.update(
        {
            "hardtanh": ActivationSpec("hardtanh", floor=-1.0, hard_floor=True, bounds=(-1.0, 1.0)),
            "elu": ActivationSpec("elu", floor=-1.0, hard_floor=True),
            "celu": ActivationSpec("celu", floor=-1.0, hard_floor=True),
            "selu": ActivationSpec("selu", floor=_SELU_FLOOR, hard_floor=True),
        }
    )
    return by_kind


#: Specs by lowercase name, for custom classes that behave like a torch activation.
KNOWN_KINDS: dict[str, ActivationSpec] = _kind_registry()


def spec_for(module: nn.Module, like: str | None = None) -> ActivationSpec:
    """Return the spec that reads ``module``'s outputs.

    Args:
        module: an activation module.
        like: lowercase name of a torch activation that ``module`` behaves like (``"gelu"`` for
            Hugging Face's ``GELUActivation``). Used for classes torch does not know.

    Returns:
        The module's own spec for torch activations; the spec of ``like`` when given; otherwise
        a generic spec (fires when positive, no bounds).

    Raises:
        ValueError: ``like`` is not a known activation name.

    Example:
        >>> spec_for(nn.Hardtanh(-2.0, 2.0)).bounds
        (-2.0, 2.0)
    """
    from_parameters = _spec_from_parameters(module)
    if from_parameters is not None:
        return from_parameters
    for cls in type(module).__mro__:
        if cls in _STATIC_SPECS:
            return _STATIC_SPECS[cls]
    if like is not None:
        if like not in KNOWN_KINDS:
            raise ValueError(f"`like` must be one of {sorted(KNOWN_KINDS)}, got {like!r}.")
        return KNOWN_KINDS[like]
    return ActivationSpec(type(module).__name__.lower())


@dataclass(frozen=True)
class ActivationLayer:
    """An activation module found in a model, under its qualified name."""

    name: str
    module: nn.Module
    spec: ActivationSpec


def validate_extra_types(extra_types: ExtraTypes) -> dict[type[nn.Module], str | None]:
    """Normalise ``extra_types`` to ``{type: kind or None}``, raising on anything else.

    Raises:
        ValueError: an entry is not an ``nn.Module`` subclass, or names an unknown kind.
    """
    pairs: Iterable[tuple[object, object]]
    pairs = extra_types.items() if isinstance(extra_types, Mapping) else ((cls, None) for cls in extra_types)
    normalised: dict[type[nn.Module], str | None] = {}
    for cls, kind in pairs:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"`extra_types` must hold nn.Module subclasses, got {cls!r}.")
        if kind is not None and kind not in KNOWN_KINDS:
            raise ValueError(f"`extra_types` maps {cls.__name__} to {kind!r}; allowed names are {sorted(KNOWN_KINDS)}.")
        normalised[cls] = kind  # type: ignore[assignment]
    return normalised


def find_activation_layers(
    model: nn.Module,
    *,
    extra_types: ExtraTypes = (),
    name_pattern: str | None = None,
    predicate: LayerPredicate | None = None,
) -> list[ActivationLayer]:
    """List the activation layers of ``model`` in registration order.

    A module is selected when it is a torch activation (:data:`TORCH_ACTIVATIONS`), an instance
    of one of ``extra_types``, its qualified name matches ``name_pattern`` (``re.search``), or
    ``predicate(name, module)`` is true. A module object registered under several names is
    listed once, under the first.

    Args:
        model: the model to search.
        extra_types: custom activation classes, or a mapping from such a class to the name of
            the torch activation it behaves like (``{GELUActivation: "gelu"}``), which sets its
            floor and bounds.
        name_pattern: regular expression for qualified module names to include.
        predicate: ``(name, module) -> bool`` for anything the other two cannot express.

    Returns:
        The selected layers with their specs.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1), nn.Sigmoid())
        >>> [(layer.name, layer.spec.kind) for layer in find_activation_layers(model)]
        [('1', 'relu'), ('3', 'sigmoid')]
    """
    kinds = validate_extra_types(extra_types)
    pattern = re.compile(name_pattern) if name_pattern is not None else None
    found: list[ActivationLayer] = []
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen or module is model:
            continue
        extra = next((cls for cls in kinds if isinstance(module, cls)), None)
        selected = (
            isinstance(module, TORCH_ACTIVATIONS)
            or extra is not None
            or (pattern is not None and pattern.search(name) is not None)
            or (predicate is not None and predicate(name, module))
        )
        if selected:
            seen.add(id(module))
            found.append(ActivationLayer(name, module, spec_for(module, kinds.get(extra) if extra else None)))
    return found
