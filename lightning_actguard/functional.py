"""Activations applied as functions inside a ``forward``: find them, and rewrite them into modules.

``F.relu(x)``, ``torch.sigmoid(x)`` or ``x.tanh()`` inside a ``forward`` is no module, so module
hooks never see it: the monitors do not measure it and :func:`~lightning_actguard.swap.swap_activations`
cannot replace it. This module offers two remedies.

* :func:`find_functional_activations` runs one forward and lists every such call under the
  qualified name of the module whose ``forward`` made it. :class:`FunctionalActivationProbe` does
  the same around any forward (one training batch, say), for callbacks to arm and disarm.
* :func:`rewrite_functional_activations` traces the model with ``torch.fx`` and returns a new ``GraphModule`` in
  which each such call is a real activation module (``nn.ReLU``, ``nn.LeakyReLU(0.2)``, ...), which
  hooks and module surgery can see.

Names used throughout:

* The *module* of a call is the qualified name (as in ``model.named_modules()``) of the innermost
  module whose ``forward`` was running when the call was made. Calls made by the model's own
  ``forward`` belong to the root, named ``""`` and shown as ``(root)``.
* The *function* is the name the call was made through, as torch reports it: ``"F.relu"``,
  ``"torch.sigmoid"``, ``"Tensor.tanh"``; a trailing ``_`` marks an in-place form. ``F.sigmoid`` and
  ``F.tanh`` call the tensor methods, so they are reported as ``"Tensor.sigmoid"`` and ``"Tensor.tanh"``;
  ``F.relu_`` is ``torch.relu_`` and reported as such.
* The *kind* is the activation's name in :data:`~lightning_actguard.activations.KNOWN_KINDS`
  (``"relu"``, ``"leakyrelu"``, ``"gelu"``, ...), the same names the monitors use.

.. warning::
    A call inside one of torch's own non-activation modules (``nn.TransformerEncoderLayer`` calls
    ``F.relu``) is found but not rewritten: ``torch.fx`` keeps torch's modules whole. Build such
    layers with an activation module where they accept one. ``F.threshold`` is not looked for: its
    spec depends on its arguments and the monitors have no name for it.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_actguard._warnings import ActGuardWarning
from lightning_actguard.activations import TORCH_ACTIVATIONS, ExtraTypes, validate_extra_types

__all__ = [
    "ROOT_DISPLAY_NAME",
    "FunctionalActivation",
    "FunctionalActivationProbe",
    "FunctionalRewrite",
    "find_functional_activations",
    "rewrite_functional_activations",
]

#: How the root module (qualified name ``""``) is shown in messages.
ROOT_DISPLAY_NAME = "(root)"

#: A replacement in ``rewrite_functional_activations(mapping=...)``: a module class or a factory
#: (both called without arguments for every call site), or an instance (copied for every call site).
FunctionalReplacement = type[nn.Module] | nn.Module | Callable[[], nn.Module]


@dataclass(frozen=True)
class _Function:
    """One way of calling an activation as a function."""

    name: str
    kind: str
    # The function's arguments after the input, in positional order; those the activation
    # module's constructor takes too are carried over by the rewrite.
    options: tuple[str, ...] = ()

    @property
    def in_place(self) -> bool:
        return self.name.endswith("_")


_F = nn.functional
# Callable as torch reports it to a TorchFunctionMode (and as torch.fx records it) -> readable name,
# kind, arguments. Where two names are one object (F.relu_ is torch.relu_) the first listed wins.
_FUNCTION_TABLE: tuple[tuple[Callable[..., Any], str, str, tuple[str, ...]], ...] = (
    (_F.relu, "F.relu", "relu", ("inplace",)),
    (torch.relu, "torch.relu", "relu", ()),
    (torch.relu_, "torch.relu_", "relu", ()),
    (torch.Tensor.relu, "Tensor.relu", "relu", ()),
    (torch.Tensor.relu_, "Tensor.relu_", "relu", ()),
    (_F.relu6, "F.relu6", "relu6", ("inplace",)),
    (torch.sigmoid, "torch.sigmoid", "sigmoid", ()),
    (torch.sigmoid_, "torch.sigmoid_", "sigmoid", ()),
    (torch.special.expit, "torch.special.expit", "sigmoid", ()),
    (torch.Tensor.sigmoid, "Tensor.sigmoid", "sigmoid", ()),
    (torch.Tensor.sigmoid_, "Tensor.sigmoid_", "sigmoid", ()),
    (torch.tanh, "torch.tanh", "tanh", ()),
    (torch.tanh_, "torch.tanh_", "tanh", ()),
    (torch.Tensor.tanh, "Tensor.tanh", "tanh", ()),
    (torch.Tensor.tanh_, "Tensor.tanh_", "tanh", ()),
    (_F.hardsigmoid, "F.hardsigmoid", "hardsigmoid", ("inplace",)),
    (_F.softplus, "F.softplus", "softplus", ("beta", "threshold")),
    (_F.softsign, "F.softsign", "softsign", ()),
    (_F.leaky_relu, "F.leaky_relu", "leakyrelu", ("negative_slope", "inplace")),
    (_F.leaky_relu_, "F.leaky_relu_", "leakyrelu", ("negative_slope",)),
    (_F.prelu, "F.prelu", "prelu", ("weight",)),
    (torch.Tensor.prelu, "Tensor.prelu", "prelu", ("weight",)),
    (_F.rrelu, "F.rrelu", "rrelu", ("lower", "upper", "training", "inplace")),
    (torch.rrelu, "torch.rrelu", "rrelu", ("lower", "upper", "training")),
    (torch.rrelu_, "torch.rrelu_", "rrelu", ("lower", "upper", "training")),
    (_F.gelu, "F.gelu", "gelu", ("approximate",)),
    (_F.silu, "F.silu", "silu", ("inplace",)),
    (_F.mish, "F.mish", "mish", ("inplace",)),
    (_F.hardswish, "F.hardswish", "hardswish", ("inplace",)),
    (_F.glu, "F.glu", "glu", ("dim",)),
    (_F.hardshrink, "F.hardshrink", "hardshrink", ("lambd",)),
    (torch.Tensor.hardshrink, "Tensor.hardshrink", "hardshrink", ("lambd",)),
    (_F.softshrink, "F.softshrink", "softshrink", ("lambd",)),
    (_F.tanhshrink, "F.tanhshrink", "tanhshrink", ()),
    (_F.logsigmoid, "F.logsigmoid", "logsigmoid", ()),
    (_F.hardtanh, "F.hardtanh", "hardtanh", ("min_val", "max_val", "inplace")),
    (_F.hardtanh_, "F.hardtanh_", "hardtanh", ("min_val", "max_val")),
    (_F.elu, "F.elu", "elu", ("alpha", "inplace")),
    (_F.elu_, "F.elu_", "elu", ("alpha",)),
    (_F.celu, "F.celu", "celu", ("alpha", "inplace")),
    (torch.celu, "torch.celu", "celu", ("alpha",)),
    (torch.celu_, "torch.celu_", "celu", ("alpha",)),
    (_F.selu, "F.selu", "selu", ("inplace",)),
    (torch.selu, "torch.selu", "selu", ()),
    (torch.selu_, "torch.selu_", "selu", ()),
)


def _function_lookup() -> dict[Callable[..., Any], _Function]:
    lookup: dict[Callable[..., Any], _Function] = {}
    for function, name, kind, options in _FUNCTION_TABLE:
        lookup.setdefault(function, _Function(name, kind, options))
    return lookup


_FUNCTIONS = _function_lookup()

#: The torch module that computes each kind, for advice; the rewrite builds it from the call's arguments.
_MODULE_FOR_KIND: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "hardsigmoid": nn.Hardsigmoid,
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "leakyrelu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "rrelu": nn.RReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "glu": nn.GLU,
    "hardshrink": nn.Hardshrink,
    "softshrink": nn.Softshrink,
    "tanhshrink": nn.Tanhshrink,
    "logsigmoid": nn.LogSigmoid,
    "hardtanh": nn.Hardtanh,
    "elu": nn.ELU,
    "celu": nn.CELU,
    "selu": nn.SELU,
}

# Kinds whose module does not compute what the function computed: nn.PReLU owns the weight that
# F.prelu is handed, nn.RReLU draws random slopes in training where F.rrelu by default does not.
_NO_EQUIVALENT_MODULE = {
    "prelu": "nn.PReLU owns its slope, F.prelu is handed one",
    "rrelu": "nn.RReLU draws random slopes in training mode, F.rrelu only when told to",
}


def _display(module: str) -> str:
    return repr(module) if module else ROOT_DISPLAY_NAME


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")


# ---------------------------------------------------------------------- detection


@dataclass(frozen=True)
class FunctionalActivation:
    """An activation that a module's ``forward`` applies as a function.

    Attributes:
        module: qualified name of the module whose ``forward`` made the calls; ``""`` for the
            model's own ``forward`` (shown as ``(root)``).
        function: the function called, such as ``"F.relu"``, ``"torch.sigmoid"``, ``"Tensor.tanh"``.
        kind: the activation's name in :data:`~lightning_actguard.activations.KNOWN_KINDS`.
        calls: how many times that module called that function while probed (during the one forward of
            :func:`find_functional_activations`).
    """

    module: str
    function: str
    kind: str
    calls: int

    def describe(self) -> str:
        """One line saying where the activation is, why it matters and what to do about it."""
        plural = "" if self.calls == 1 else "s"
        return (
            f"{_display(self.module)} applies {self.kind} functionally ({self.function}, {self.calls} call{plural}): "
            "not monitored and not swappable; rewrite it with rewrite_functional_activations() or use "
            f"nn.{_MODULE_FOR_KIND[self.kind].__name__}"
        )


class _RecordingMode(TorchFunctionMode):
    """Reports every torch function call to ``on_call``, then runs it unchanged."""

    def __init__(self, on_call: Callable[[Callable[..., Any]], None]) -> None:
        super().__init__()
        self._on_call = on_call

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        self._on_call(func)
        return func(*args, **(kwargs or {}))


class FunctionalActivationProbe:
    """Records the functional activations of ``model`` during the forwards run while it is started.

    :meth:`start` registers a forward pre-hook and a forward hook on every submodule; the hooks
    keep the stack of running modules and, while the outermost of them runs, keep a
    ``TorchFunctionMode`` entered that counts activation calls. Code run between forwards (the
    loss, the optimizer step) is therefore not looked at, and neither is a call made while the
    innermost running module is an activation module (``nn.ReLU`` calls ``F.relu``): hooks see
    those already. The forward hooks run even when a forward raises, so the stack and the mode
    are unwound either way. Use it as a context manager, or call :meth:`stop` in a ``finally``.

    Args:
        model: the model to watch. A module registered under several names is reported under
            the first, as in ``model.named_modules()``.
        extra_types: custom activation classes the monitors are told about (as in
            :func:`~lightning_actguard.activations.find_activation_layers`); calls inside them are
            visible to hooks and not reported.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``extra_types`` holds something that is not an ``nn.Module`` subclass.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear = nn.Linear(3, 3)
        ...
        ...     def forward(self, x):
        ...         return torch.sigmoid(self.linear(x))
        >>> model = Net()
        >>> with FunctionalActivationProbe(model) as probe:
        ...     _ = model(torch.randn(2, 3))
        >>> [finding.describe() for finding in probe.results()]  # doctest: +NORMALIZE_WHITESPACE
        ['(root) applies sigmoid functionally (torch.sigmoid, 1 call): not monitored and not swappable;
          rewrite it with rewrite_functional_activations() or use nn.Sigmoid']
    """

    def __init__(self, model: nn.Module, *, extra_types: ExtraTypes = ()) -> None:
        _check_model(model)
        self._model = model
        self._visible_types = (*TORCH_ACTIVATIONS, *validate_extra_types(extra_types))
        self._handles: list[RemovableHandle] = []
        self._running: list[tuple[nn.Module, str]] = []
        self._mode: _RecordingMode | None = None
        self._counts: dict[tuple[str, _Function], int] = {}

    @property
    def started(self) -> bool:
        """Whether the hooks are registered, between :meth:`start` and :meth:`stop`."""
        return bool(self._handles)

    def start(self) -> None:
        """Register the hooks and forget earlier results.

        Raises:
            RuntimeError: the probe is already started.
        """
        if self.started:
            raise RuntimeError("FunctionalActivationProbe.start() called twice: call stop() before starting again.")
        self._counts.clear()
        for name, module in self._model.named_modules():
            self._handles.append(module.register_forward_pre_hook(partial(self._module_starts, name)))
            self._handles.append(module.register_forward_hook(self._module_ends, always_call=True))

    def stop(self) -> list[FunctionalActivation]:
        """Remove every hook, leave the mode if a forward was cut short, and return :meth:`results`.

        Safe to call at any time and more than once.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._running.clear()
        self._leave_mode()
        return self.results()

    def results(self) -> list[FunctionalActivation]:
        """What was recorded since :meth:`start`: one entry per (module, function), in order of first call."""
        return [
            FunctionalActivation(module, function.name, function.kind, calls)
            for (module, function), calls in self._counts.items()
        ]

    def __enter__(self) -> FunctionalActivationProbe:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _module_starts(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self._running:
            self._mode = _RecordingMode(self._record)
            self._mode.__enter__()
        self._running.append((module, name))

    def _module_ends(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # Another pre-hook raising before ours would call this without a matching start.
        if self._running and self._running[-1][0] is module:
            self._running.pop()
        if not self._running:
            self._leave_mode()

    def _leave_mode(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def _record(self, func: Callable[..., Any]) -> None:
        function = _FUNCTIONS.get(func)
        if function is None or not self._running:
            return
        module, name = self._running[-1]
        if isinstance(module, self._visible_types):
            return
        key = (name, function)
        self._counts[key] = self._counts.get(key, 0) + 1


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Put back buffers a forward updates in place (BatchNorm's running statistics in training mode)."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def find_functional_activations(model: nn.Module, *args: Any, **kwargs: Any) -> list[FunctionalActivation]:
    """Run ``model(*args, **kwargs)`` once and list the activations its modules apply as functions.

    The forward runs under ``torch.no_grad()`` in the model's current train/eval mode, which is
    left as it is, so branches taken only in training are probed when the model is in training
    mode. Buffers the forward updates in place (BatchNorm's running statistics) are restored
    afterwards. See :class:`FunctionalActivationProbe` for what is and is not reported.

    Args:
        model: the model to probe.
        *args: positional inputs of the forward, such as one example batch.
        **kwargs: keyword inputs of the forward.

    Returns:
        One entry per (module, function), in order of first call; empty when every activation is
        a module. Calls in the model's own ``forward`` have ``module == ""``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear = nn.Linear(4, 4)
        ...
        ...     def forward(self, x):
        ...         return nn.functional.relu(self.linear(x)).relu()
        >>> model = nn.Sequential(Block(), nn.ReLU())
        >>> for finding in find_functional_activations(model, torch.randn(2, 4)):
        ...     print(finding.module, finding.function, finding.kind, finding.calls)
        0 F.relu relu 1
        0 Tensor.relu relu 1
    """
    probe = FunctionalActivationProbe(model)
    with _buffers_restored(model), torch.no_grad(), probe:
        model(*args, **kwargs)
    return probe.results()


# ---------------------------------------------------------------------- rewriting with torch.fx


@dataclass(frozen=True)
class FunctionalRewrite:
    """One functional activation call replaced by a module call.

    Attributes:
        module: qualified name of the module whose ``forward`` made the call (``""``: the root).
        function: the function that was called, such as ``"F.leaky_relu"``.
        kind: the activation's name in :data:`~lightning_actguard.activations.KNOWN_KINDS`.
        new_name: name of the new submodule in the returned ``GraphModule``.
        new_module: the new submodule, called where the function was.
    """

    module: str
    function: str
    kind: str
    new_name: str
    new_module: nn.Module

    def describe(self) -> str:
        """``'encoder.block1': F.leaky_relu -> encoder_block1_leakyrelu = LeakyReLU(negative_slope=0.2)``."""
        return f"{_display(self.module)}: {self.function} -> {self.new_name} = {self.new_module}"


def rewrite_functional_activations(
    model: nn.Module, mapping: Mapping[str, FunctionalReplacement] | None = None
) -> tuple[fx.GraphModule, list[FunctionalRewrite]]:
    """Trace ``model`` with ``torch.fx`` and make every functional activation a real module.

    Each call of a known activation function (``call_function`` or ``call_method`` node) becomes
    a call of a new submodule of the returned ``GraphModule`` computing the same thing: the call's
    arguments that the module takes are carried over (``F.leaky_relu(x, 0.2)`` becomes
    ``nn.LeakyReLU(negative_slope=0.2)``, ``F.gelu(x, approximate="tanh")`` becomes
    ``nn.GELU(approximate="tanh")``, an in-place form gets ``inplace=True``). Hooks, the monitors
    and :func:`~lightning_actguard.swap.swap_activations` then see them.

    A new submodule is named after the module that made the call and its own class, lowercased,
    with dots as underscores: ``F.relu`` in ``encoder.block1`` becomes ``encoder_block1_relu``,
    ``torch.sigmoid`` in the model's own ``forward`` becomes ``sigmoid``. Further calls of the same
    name get ``_1``, ``_2``, ... in call order; a name the ``GraphModule`` already has is never reused.

    ``model`` itself is not changed. The result shares its parameters and buffers (the same
    tensor objects), so training one trains the other; it is in ``model``'s train/eval mode.

    A call is left as it was, with an :class:`~lightning_actguard.ActGuardWarning`, when no module
    can replace it faithfully: ``F.prelu`` and ``F.rrelu`` without a ``mapping`` entry, a call
    whose arguments are computed in ``forward`` rather than constants, and an in-place call
    whose input is read again elsewhere while its replacement would not act in place.

    Args:
        model: the model to rewrite. It must be traceable by ``torch.fx.symbolic_trace``.
        mapping: activation kind -> what to put in its place instead of the same activation
            (``{"sigmoid": nn.SELU}``): a module class or a factory, called without arguments
            for every call site, or an instance, copied for every call site. The call's own
            arguments are not passed on; a replacement with an ``inplace`` attribute is set in
            place when the call was. Kinds not in ``mapping`` keep their activation.

    Returns:
        The rewritten ``GraphModule`` and one :class:`FunctionalRewrite` per replaced call, in
        graph order. Parameters of replacements (a ``nn.PReLU`` from ``mapping``) are new: add
        them to the optimizer.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; a ``mapping`` value is neither a module
            class, an instance nor a callable, or a factory returned something other than a module.
        ValueError: a ``mapping`` key is not an activation kind this module knows.
        RuntimeError: ``torch.fx`` cannot trace ``model`` (data-dependent control flow such as
            ``if x.sum() > 0:``, Python calls on tensor values); the message gives torch's reason.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear = nn.Linear(4, 4)
        ...
        ...     def forward(self, x):
        ...         return nn.functional.leaky_relu(self.linear(x), 0.2)
        >>> rewritten, rewrites = rewrite_functional_activations(Net())
        >>> [rewrite.describe() for rewrite in rewrites]
        ['(root): F.leaky_relu -> leakyrelu = LeakyReLU(negative_slope=0.2)']
    """
    _check_model(model)
    replacements = _validated_mapping(mapping)
    graph_module = _traced(model)
    reference = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    rewrites = []
    for node in list(graph_module.graph.nodes):
        function = _function_of(node)
        if function is not None:
            rewrite = _rewrite_node(graph_module, node, function, replacements.get(function.kind))
            if rewrite is not None:
                if reference is not None:
                    rewrite.new_module.to(device=reference.device, dtype=reference.dtype)
                rewrites.append(rewrite)
    graph_module.graph.lint()
    graph_module.recompile()
    _copy_training_mode(model, graph_module)
    return graph_module, rewrites


def _validated_mapping(mapping: Mapping[str, FunctionalReplacement] | None) -> dict[str, FunctionalReplacement]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"`mapping` must map activation kinds to replacements, got {type(mapping).__name__}.")
    for kind, replacement in mapping.items():
        if kind not in _MODULE_FOR_KIND:
            raise ValueError(f"`mapping` keys must be one of {sorted(_MODULE_FOR_KIND)}, got {kind!r}.")
        if not (isinstance(replacement, nn.Module) or callable(replacement)):
            raise TypeError(
                f"`mapping[{kind!r}]` must be an nn.Module subclass, an nn.Module instance or a factory "
                f"`() -> nn.Module`, got {replacement!r}."
            )
    return dict(mapping)


def _traced(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as error:
        raise RuntimeError(
            f"torch.fx could not trace {type(model).__name__}, so its functional activations cannot be rewritten "
            f"automatically ({type(error).__name__}: {error}). Tracing fails on data-dependent control flow such as "
            "`if x.sum() > 0:`. Replace the functional calls by modules by hand instead (`self.act = nn.ReLU()` in "
            "__init__, `self.act(x)` in forward); find_functional_activations(model, batch) lists where they are."
        ) from error


def _function_of(node: fx.Node) -> _Function | None:
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    if node.op == "call_method" and isinstance(node.target, str):
        return _FUNCTIONS.get(getattr(torch.Tensor, node.target, None))  # type: ignore[arg-type]
    return None


def _caller_of(node: fx.Node) -> str:
    """Qualified name of the innermost module that made the call; ``""`` for the root's forward."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    innermost = next(reversed(stack.values()))
    return str(innermost[0])


def _call_parts(node: fx.Node, function: _Function) -> tuple[Any, dict[str, Any]]:
    """The call's input and its other arguments by name."""
    arguments = dict(zip(function.options, node.args[1:], strict=False))
    arguments.update({key: value for key, value in node.kwargs.items() if key not in ("input", "self")})
    source = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return source, arguments


def _rewrite_node(
    graph_module: fx.GraphModule, node: fx.Node, function: _Function, replacement: FunctionalReplacement | None
) -> FunctionalRewrite | None:
    caller = _caller_of(node)
    source, arguments = _call_parts(node, function)
    new_module, reason = _replacement_module(node, function, source, arguments, replacement)
    if new_module is None:
        warnings.warn(
            f"rewrite_functional_activations left {function.name} in {_display(caller)} (graph node "
            f"{node.name!r}) as a function: {reason}. It stays invisible to hooks.",
            ActGuardWarning,
            stacklevel=3,
        )
        return None
    new_name = _free_name(graph_module, caller, new_module)
    graph_module.add_submodule(new_name, new_module)
    with graph_module.graph.inserting_before(node):
        module_call = graph_module.graph.call_module(new_name, args=(source,))
    node.replace_all_uses_with(module_call)
    graph_module.graph.erase_node(node)
    return FunctionalRewrite(caller, function.name, function.kind, new_name, new_module)


def _replacement_module(
    node: fx.Node,
    function: _Function,
    source: Any,
    arguments: Mapping[str, Any],
    replacement: FunctionalReplacement | None,
) -> tuple[nn.Module | None, str | None]:
    """The module to call instead of ``node``, or ``None`` and why there is none."""
    in_place = function.in_place or arguments.get("inplace") is True
    if replacement is None:
        new_module, reason = _same_activation(function, arguments)
        if new_module is None:
            return None, reason
    else:
        new_module = _built(replacement, function.kind, in_place)
    # An in-place call also changes its input; a replacement that does not would change what
    # the input's other readers see.
    readers = getattr(source, "users", {})
    if in_place and not getattr(new_module, "inplace", False) and any(user is not node for user in readers):
        return None, "it works in place on a tensor that forward reads again, and its replacement would not"
    return new_module, None


def _same_activation(function: _Function, arguments: Mapping[str, Any]) -> tuple[nn.Module | None, str | None]:
    """The torch module computing what the call computed, or ``None`` and why there is none."""
    if function.kind in _NO_EQUIVALENT_MODULE:
        why = _NO_EQUIVALENT_MODULE[function.kind]
        return None, f"{why}; give mapping={{{function.kind!r}: ...}} to put another activation there"
    computed = sorted(name for name, value in arguments.items() if isinstance(value, fx.Node))
    if computed:
        return None, f"its argument {', '.join(computed)} is computed in forward, not a constant"
    module_class = _MODULE_FOR_KIND[function.kind]
    accepted = _constructor_options(module_class)
    options = {name: value for name, value in arguments.items() if name in accepted}
    if function.in_place and "inplace" in accepted:
        options["inplace"] = True
    return module_class(**options), None


def _constructor_options(module_class: type[nn.Module]) -> set[str]:
    return set(inspect.signature(module_class).parameters)


def _built(replacement: FunctionalReplacement, kind: str, in_place: bool) -> nn.Module:
    new_module = copy.deepcopy(replacement) if isinstance(replacement, nn.Module) else replacement()
    if not isinstance(new_module, nn.Module):
        raise TypeError(f"The factory `mapping[{kind!r}]` returned {new_module!r}, not an nn.Module.")
    if in_place and hasattr(new_module, "inplace"):
        new_module.inplace = True
    return new_module


def _free_name(graph_module: fx.GraphModule, caller: str, new_module: nn.Module) -> str:
    activation = type(new_module).__name__.lower()
    base = f"{caller.replace('.', '_')}_{activation}" if caller else activation
    name, suffix = base, 0
    while hasattr(graph_module, name):
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def _copy_training_mode(model: nn.Module, graph_module: fx.GraphModule) -> None:
    """Give the modules the trace created (the root, containers, replacements) ``model``'s mode."""
    shared = {id(module) for module in model.modules()}
    for module in graph_module.modules():
        if id(module) not in shared:
            module.training = model.training
