"""Module surgery: replace a model's activation modules with others, and undo or redo it.

:func:`swap_activations` is what a user calls before training (``{nn.Sigmoid: nn.SELU}``) and
what the guards' ``"swap"`` action calls while training runs. Each replacement is recorded as a
:class:`Swap`; a :class:`SwapReport` can undo its swaps, and :func:`swap_records` /
:func:`reapply_swaps` turn them into plain data and back, so that a checkpoint taken after a
swap loads into a freshly built model.

Only modules registered as children can be replaced. An activation applied functionally
(``F.relu(x)`` inside a ``forward``) is not a module: see
:mod:`lightning_actguard.functional` to find and rewrite those.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_actguard.activations import TORCH_ACTIVATIONS

__all__ = [
    "Replacement",
    "Swap",
    "SwapReport",
    "init_for_activation",
    "reapply_swaps",
    "swap_activations",
    "swap_records",
]

#: What an activation is replaced with: a module class (called without arguments), an instance
#: (copied for every module it replaces) or a factory called with the module it replaces.
Replacement = type[nn.Module] | nn.Module | Callable[[nn.Module], nn.Module]
#: Which modules a mapping entry replaces: a module class (and its subclasses) or a regular
#: expression searched in the qualified names of modules without children.
Selector = type[nn.Module] | str
NameFilter = str | Collection[str]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_SCALAR = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Swap:
    """One module replaced, under every name it is registered with."""

    names: tuple[str, ...]
    old: nn.Module
    new: nn.Module

    @property
    def name(self) -> str:
        """The first qualified name of the replaced module, the one the monitors use."""
        return self.names[0]

    def describe(self) -> str:
        """``'net.1': Sigmoid() -> SELU()`` (and the other names of a reused module)."""
        others = f" (also {', '.join(repr(name) for name in self.names[1:])})" if len(self.names) > 1 else ""
        return f"{self.name!r}{others}: {self.old} -> {self.new}"


@dataclass(frozen=True)
class SwapReport:
    """What :func:`swap_activations` replaced; false when nothing matched."""

    swaps: tuple[Swap, ...]
    selectors: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.swaps)

    def __len__(self) -> int:
        return len(self.swaps)

    def __str__(self) -> str:
        if not self.swaps:
            return f"swap_activations replaced nothing: no module matched {', '.join(self.selectors) or 'the mapping'}"
        return "\n".join(["swap_activations replaced:", *(f"  {swap.describe()}" for swap in self.swaps)])

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of the replacements (a PReLU's slopes), which no optimizer knows yet."""
        return [param for swap in self.swaps for param in swap.new.parameters()]

    def undo(self, model: nn.Module) -> None:
        """Put every replaced module back where its replacement now is."""
        for swap in reversed(self.swaps):
            for name in swap.names:
                if _get(model, name) is swap.new:
                    _set(model, name, swap.old)


def swap_activations(
    model: nn.Module,
    mapping: Mapping[Selector, Replacement],
    *,
    include: NameFilter | None = None,
    exclude: NameFilter | None = None,
) -> SwapReport:
    """Replace ``model``'s activation modules in place, as ``mapping`` says.

    Each replacement is moved to the device and floating dtype of the module it replaces (or of
    the surrounding parameters, for a parameter-free activation), put in the same train/eval
    mode, and given the old module's ``inplace`` flag when both have one. A module registered
    under several names (one object reused) is replaced once, everywhere, so it stays shared.
    An instance given as a replacement is copied for each module it replaces, so no two layers
    share the parameters of a learnable replacement such as ``nn.PReLU``.

    Args:
        model: the model to change, in place.
        mapping: module class or name pattern -> replacement. A class also matches its
            subclasses (``nn.ReLU6`` is an ``nn.Hardtanh``), the most specific class wins; a
            pattern (``re.search``) matches qualified names of modules without children, and is
            tried only when no class matched. A pattern selects torch activations and modules
            without children or parameters, never a block or a layer with weights.
        include: only replace modules whose qualified name matches this pattern, or is in this
            collection of names.
        exclude: never replace modules whose qualified name matches this pattern or is in this
            collection.

    Returns:
        What was replaced; an empty report (false) when nothing matched. Modules the model
        refers to outside its registered children (a plain list, a closure) are not seen.

    Raises:
        TypeError: ``mapping`` is not a mapping, a key is neither a module class nor a string,
            a value is neither a module class, instance nor callable, or a factory returned
            something that is not a module.
        ValueError: ``mapping`` is empty, a key is ``nn.Module`` itself or a container class,
            maps a class to itself, or is an invalid regular expression.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.ReLU())
        >>> report = swap_activations(model, {nn.Sigmoid: nn.SELU, nn.ReLU: lambda old: nn.LeakyReLU(0.1)})
        >>> print(report)
        swap_activations replaced:
          '1': Sigmoid() -> SELU()
          '3': ReLU() -> LeakyReLU(negative_slope=0.1)
    """
    by_class, by_pattern = _validated(mapping)
    include_name, exclude_name = _name_filter("include", include), _name_filter("exclude", exclude)
    swaps = []
    for module, names in _modules_by_identity(model):
        if include_name is not None and not any(include_name(name) for name in names):
            continue
        if exclude_name is not None and any(exclude_name(name) for name in names):
            continue
        replacement = _replacement_for(module, names, by_class, by_pattern)
        if replacement is None:
            continue
        new = _build(replacement, module)
        _match_placement(new, module, _reference_tensor(model, module, names[0]))
        for name in names:
            _set(model, name, new)
        swaps.append(Swap(names, module, new))
    return SwapReport(tuple(swaps), tuple(_describe_selector(key) for key in mapping))


# ---------------------------------------------------------------------- validation


def _validated(
    mapping: Mapping[Selector, Replacement],
) -> tuple[dict[type[nn.Module], Replacement], list[tuple[re.Pattern[str], Replacement]]]:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"`mapping` must map module classes or name patterns to replacements, got {mapping!r}.")
    if not mapping:
        raise ValueError("`mapping` is empty: give at least one `{nn.Sigmoid: nn.SELU}`-style entry.")
    by_class: dict[type[nn.Module], Replacement] = {}
    by_pattern: list[tuple[re.Pattern[str], Replacement]] = []
    for key, value in mapping.items():
        _check_replacement(key, value)
        if isinstance(key, str):
            try:
                by_pattern.append((re.compile(key), value))
            except re.error as error:
                raise ValueError(f"`mapping` key {key!r} is not a valid regular expression: {error}.") from None
        elif isinstance(key, type) and issubclass(key, nn.Module):
            if key is nn.Module or issubclass(key, _CONTAINERS):
                raise ValueError(
                    f"`mapping` key {key.__name__} would replace whole blocks of the model; keys must be activation "
                    "classes or name patterns."
                )
            if value is key:
                raise ValueError(f"`mapping` maps {key.__name__} to itself: nothing would change.")
            by_class[key] = value
        else:
            raise TypeError(f"`mapping` keys must be nn.Module subclasses or name patterns (str), got {key!r}.")
    return by_class, by_pattern


def _check_replacement(key: object, value: object) -> None:
    if isinstance(value, nn.Module) or (isinstance(value, type) and issubclass(value, nn.Module)):
        return
    if isinstance(value, type) or not callable(value):
        raise TypeError(
            f"`mapping[{_describe_selector(key)}]` must be an nn.Module subclass, an nn.Module instance or a factory "
            f"`old_module -> nn.Module`, got {value!r}."
        )


def _name_filter(argument: str, names: NameFilter | None) -> Callable[[str], bool] | None:
    if names is None:
        return None
    if isinstance(names, str):
        try:
            pattern = re.compile(names)
        except re.error as error:
            raise ValueError(f"`{argument}` {names!r} is not a valid regular expression: {error}.") from None
        return lambda name: pattern.search(name) is not None
    if not isinstance(names, Iterable):
        raise TypeError(f"`{argument}` must be a name pattern or a collection of qualified names, got {names!r}.")
    allowed = frozenset(names)
    return allowed.__contains__


def _describe_selector(key: object) -> str:
    return key.__name__ if isinstance(key, type) else repr(key)


# ---------------------------------------------------------------------- finding and placing


def _modules_by_identity(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """Every submodule once, with all the names it is registered under, in registration order."""
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if module is model:
            continue
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    return [(modules[key], tuple(found)) for key, found in names.items()]


def _replacement_for(
    module: nn.Module,
    names: tuple[str, ...],
    by_class: Mapping[type[nn.Module], Replacement],
    by_pattern: Iterable[tuple[re.Pattern[str], Replacement]],
) -> Replacement | None:
    for cls in type(module).__mro__:
        if cls in by_class:
            return by_class[cls]
    if not _pattern_can_select(module):
        return None
    for pattern, replacement in by_pattern:
        if any(pattern.search(name) for name in names):
            return replacement
    return None


def _pattern_can_select(module: nn.Module) -> bool:
    """Whether a name pattern may select ``module``: never a block or a weight layer whose name matches."""
    if isinstance(module, TORCH_ACTIVATIONS):
        return True
    return next(module.children(), None) is None and next(module.parameters(), None) is None


def _build(replacement: Replacement, old: nn.Module) -> nn.Module:
    if isinstance(replacement, nn.Module):
        new = copy.deepcopy(replacement)
    elif isinstance(replacement, type):
        new = replacement()
    else:
        new = replacement(old)
        if not isinstance(new, nn.Module):
            raise TypeError(f"The factory replacing {old} returned {new!r}, not an nn.Module.")
    if new is old:
        raise ValueError(f"The replacement of {old} is the module itself: nothing would change.")
    if hasattr(old, "inplace") and hasattr(new, "inplace"):
        new.inplace = old.inplace
    return new


def _reference_tensor(model: nn.Module, module: nn.Module, name: str) -> torch.Tensor | None:
    """A tensor whose device and dtype the replacement should take: the module's, else its parent's."""
    parent = model.get_submodule(name.rpartition(".")[0])
    for source in (module, parent, model):
        for tensor in (*source.parameters(), *source.buffers()):
            if tensor.is_floating_point():
                return tensor
    return None


def _match_placement(new: nn.Module, old: nn.Module, reference: torch.Tensor | None) -> None:
    if reference is not None:
        new.to(device=reference.device, dtype=reference.dtype)
    new.train(old.training)


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    model.get_submodule(parent_name).register_module(child, module)


# ---------------------------------------------------------------------- records for checkpoints


def swap_records(swaps: Iterable[Swap]) -> list[dict[str, Any]]:
    """Swaps as plain data (names, class paths, constructor arguments) for a checkpoint.

    A replacement is described by its class and the constructor arguments it keeps as
    attributes of the same name (``negative_slope``, ``alpha``, ``inplace``, ``num_parameters``,
    ...), which covers every activation in ``torch.nn``. Learned parameters are not part of the
    record: they are in the model's ``state_dict``.
    """
    return [
        {
            "names": list(swap.names),
            "old": _class_path(type(swap.old)),
            "new": _class_path(type(swap.new)),
            "arguments": _constructor_arguments(swap.new),
        }
        for swap in swaps
    ]


def reapply_swaps(model: nn.Module, records: Iterable[Mapping[str, Any]]) -> SwapReport:
    """Apply recorded swaps to a freshly built ``model``, before its weights are loaded.

    Names that already hold the recorded replacement class are left alone, so applying the
    same records twice changes nothing.

    Raises:
        ValueError: a recorded name is not in ``model``, holds neither the old nor the new
            class, or the replacement cannot be rebuilt from its record.
    """
    swaps = []
    for record in records:
        names = tuple(record["names"])
        old = _submodule(model, names[0])
        if _class_path(type(old)) == record["new"]:
            continue
        if _class_path(type(old)) != record["old"]:
            raise ValueError(
                f"Cannot redo the swap of {names[0]!r}: the record expects a {record['old']} there, the model has "
                f"{type(old).__name__}."
            )
        new = _rebuild(record)
        _match_placement(new, old, _reference_tensor(model, old, names[0]))
        for name in names:
            _set(model, name, new)
        swaps.append(Swap(names, old, new))
    return SwapReport(tuple(swaps))


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"Cannot redo a recorded swap: the model has no module named {name!r}.") from None


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _constructor_arguments(module: nn.Module) -> dict[str, Any]:
    try:
        parameters = inspect.signature(type(module).__init__).parameters
    except (TypeError, ValueError):
        return {}
    arguments = {}
    for name, parameter in parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(module, name, inspect.Parameter.empty)
        if isinstance(value, _SCALAR):
            arguments[name] = value
    return arguments


def _rebuild(record: Mapping[str, Any]) -> nn.Module:
    path = record["new"]
    module_path, _, qualname = path.rpartition(".")
    try:
        cls: Any = importlib.import_module(module_path)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**record["arguments"])
    except Exception as error:
        raise ValueError(
            f"Cannot rebuild the replacement {path} of {record['names'][0]!r} from its record "
            f"{dict(record['arguments'])} ({type(error).__name__}: {error})."
        ) from None


# ---------------------------------------------------------------------- initialisation to suit an activation


def init_for_activation(layer: nn.Module, activation: nn.Module) -> str | None:
    """Re-initialise the weight layer feeding ``activation`` the way that activation is meant to start.

    SELU's self-normalisation assumes LeCun-normal weights (variance ``1 / fan_in``); the ReLU
    family (ReLU, LeakyReLU, PReLU, ELU, CELU, GELU, SiLU, Mish) wants Kaiming-normal weights
    (variance ``2 / fan_in``, adjusted for a leaky slope). Biases are zeroed. This overwrites
    learned weights, which is why the guards only do it when asked.

    Args:
        layer: a module with a ``weight`` of two or more dimensions (``nn.Linear``, ``nn.ConvNd``).
        activation: the activation it feeds.

    Returns:
        The name of the scheme applied (``"lecun_normal"``, ``"kaiming_normal"``), or ``None``
        when the activation has no preferred initialisation and nothing was changed.
    """
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    if not isinstance(activation, (nn.SELU, *_KAIMING_FAMILY)):
        return None
    with torch.no_grad():
        if isinstance(activation, nn.SELU):
            scheme = "lecun_normal"
            nn.init.normal_(weight, 0.0, nn.init._calculate_fan_in_and_fan_out(weight)[0] ** -0.5)
        else:
            scheme = "kaiming_normal"
            slope = float(getattr(activation, "negative_slope", 0.0))
            nn.init.kaiming_normal_(weight, a=slope, nonlinearity="leaky_relu")
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()
    return scheme


_KAIMING_FAMILY = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish)
