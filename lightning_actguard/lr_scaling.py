"""Lower the learning rate of a running optimizer so that its LR schedulers keep the lower rate.

Plain PyTorch. Writing a smaller ``param_group["lr"]`` is not enough to lower the learning rate of
a run: an LR scheduler overwrites ``param_group["lr"]`` on its next step, with a value it computes
either from the current rate or from numbers it stored when it was built (its ``base_lrs``, a peak
rate, a floor). :func:`scale_learning_rates` multiplies the rate of every param group and, with
the same per-group factor, every such stored number, so that each later scheduler step gives
``new / old`` times the rate it would have given without the change. What the schedulers report
(``get_last_lr()``, which learning-rate monitors and loggers read) is scaled as well, and so is
everything a checkpoint saves: a run resumed from a checkpoint written afterwards keeps the lower
rate.

Besides ``lr``, each param group's ``initial_lr`` (the start of most schedules, written by the
schedulers) is scaled. Per scheduler type, these are scaled too:

* ``StepLR``, ``MultiStepLR``, ``ExponentialLR``, ``MultiplicativeLR``, ``LinearLR``,
  ``ConstantLR``, ``PolynomialLR``: these multiply the current rate at each step, so the lower
  rate carries on by itself; their ``base_lrs`` are scaled for the steps that start over from them
  (a ``SequentialLR`` switching to the next scheduler, ``step(epoch)``).
* ``LambdaLR``: ``base_lrs`` (each rate is ``base_lr * lr_lambda(step)``).
* ``CosineAnnealingLR``, ``CosineAnnealingWarmRestarts``: ``base_lrs`` (the top of the cosine) and
  ``eta_min`` (its bottom).
* ``OneCycleLR``: ``base_lrs`` and the param group keys ``max_lr`` and ``min_lr`` (the peak and
  the end of the cycle; ``initial_lr`` is its start).
* ``CyclicLR``: ``base_lrs`` and ``max_lrs`` (the bottom and the top of each cycle).
* ``ReduceLROnPlateau``: ``min_lrs`` (the floor of each group; left as it was, it would stop the
  next reductions at the old floor), ``eps`` (the smallest change it makes) and ``default_min_lr``
  (the floor it gives every group once a param group is added).
* ``SWALR`` (``torch.optim.swa_utils``): ``base_lrs`` and the param group key ``swa_lr``.
* ``SequentialLR``, ``ChainedScheduler``: the schedulers inside them, each as above.

Limitations:

* ``eta_min`` (cosine schedulers) and ``eps`` and ``default_min_lr`` (``ReduceLROnPlateau``) are one
  number for all param groups of the optimizer. They are scaled only when every group of that
  optimizer got the same factor, which is the case unless ``min_lr`` held some groups back. If the
  factors differ, they are left as they are: a cosine schedule then still falls (or climbs back)
  to the old ``eta_min`` at the bottom of each cosine, so near the bottom the reduction shrinks
  toward none, and ``ReduceLROnPlateau`` may skip or make a last tiny reduction that the
  unreduced schedule would not have, when the change is about ``eps``; once a param group is
  added, its floors go back to the old ``default_min_lr``.
* A scheduler type not listed above gets its ``base_lrs`` and its last reported rates scaled,
  which keeps the lower rate for schedulers that compute the rate from ``base_lrs`` or from the
  current rate. Anything else it stored is left alone, without an error. A subclass of a listed
  type is scaled as that type, which is right only if it computes the rate the same way.
  :func:`unsupported_schedulers` names both kinds, so that the caller can say so.
* Schedulers built after the call start from their own arguments (a ``OneCycleLR`` built later
  uses the ``max_lr`` it is given), and schedulers of optimizers that were not passed in are left
  alone.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import lr_scheduler
from torch.optim.swa_utils import SWALR

__all__ = ["LrChange", "scale_learning_rates", "unsupported_schedulers"]


@dataclass(frozen=True)
class LrChange:
    """One param group's learning rate before and after a reduction.

    Attributes:
        optimizer: index of the optimizer in the list given to :func:`scale_learning_rates`.
        group: index of the param group in that optimizer's ``param_groups``.
        old: the group's learning rate before the call.
        new: the group's learning rate after the call; equal to ``old`` for a group that was
            already at or below ``min_lr``.
    """

    optimizer: int
    group: int
    old: float
    new: float


def scale_learning_rates(
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[object],
    factor: float,
    min_lr: float = 0.0,
) -> list[LrChange]:
    """Multiply the learning rates by ``factor`` in a way that the schedulers keep.

    Every param group of every optimizer gets ``lr * factor``, but not less than ``min_lr``: a group
    whose rate would fall below ``min_lr`` gets exactly ``min_lr``, and a group already at or below
    ``min_lr`` is left as it is. A group's own factor is then ``new / old``; the numbers each
    scheduler of that optimizer computes the group's rate from are multiplied by it (see the module
    docstring), so that every later scheduler step gives ``new / old`` times the rate it would have
    given without the call.

    An optimizer listed twice, or driven by several schedulers, is scaled once; a scheduler listed
    twice, or also inside a ``SequentialLR`` or ``ChainedScheduler`` that is listed, is scaled once.
    Schedulers of optimizers not in ``optimizers`` are left alone. A scheduler type this module does
    not know does not raise: it is scaled as well as can be (see :func:`unsupported_schedulers`).

    Args:
        optimizers: the optimizers whose learning rates to lower.
        schedulers: the LR schedulers driving them (any object; those without an ``optimizer``
            attribute are skipped).
        factor: what to multiply the learning rates by: 0.5 halves them. Any positive finite
            number; above 1 raises them.
        min_lr: the lowest learning rate a group is brought down to.

    Returns:
        One entry per param group of each optimizer, in order, with its rate before and after
        (equal when the group was at or below ``min_lr``).

    Raises:
        ValueError: ``factor`` is not a positive finite number, or ``min_lr`` is negative or not
            finite.

    Example:
        A StepLR halves the rate every 2 steps; after the call it keeps halving the halved rate:

        >>> param = torch.nn.Parameter(torch.zeros(1))
        >>> optimizer = torch.optim.SGD([param], lr=0.1)
        >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        >>> scale_learning_rates([optimizer], [scheduler], factor=0.5)
        [LrChange(optimizer=0, group=0, old=0.1, new=0.05)]
        >>> for _ in range(2):
        ...     optimizer.step()
        ...     scheduler.step()
        >>> scheduler.get_last_lr()  # 0.05 without the call
        [0.025]
    """
    factor = _checked("factor", factor, "a positive finite number", lambda value: value > 0)
    min_lr = _checked("min_lr", min_lr, "a finite number >= 0", lambda value: value >= 0)
    changes, factor_of_group = _plan(optimizers, factor, min_lr)
    found = list(_flatten(schedulers))
    extra_keys = _group_keys(found)
    for change_group, change in _changed_groups(optimizers, changes):
        group_factor = factor_of_group[id(change_group)]
        _put(change_group, "lr", change.new)
        for key in ("initial_lr", *extra_keys.get(id(change_group), ())):
            if _is_number(change_group.get(key)):
                _put(change_group, key, float(change_group[key]) * group_factor)
    for scheduler in found:
        groups = getattr(getattr(scheduler, "optimizer", None), "param_groups", None)
        if not isinstance(groups, list) or not any(id(group) in factor_of_group for group in groups):
            continue
        factors = [factor_of_group.get(id(group), 1.0) for group in groups]
        _handler(scheduler)(scheduler, factors, factors[0] if len(set(factors)) == 1 else None)
    return changes


def unsupported_schedulers(schedulers: Sequence[object]) -> list[str]:
    """The names of the scheduler types :func:`scale_learning_rates` scales only partly.

    These are the types not listed in the module docstring, subclasses of listed types included
    (their formula may differ from their parent's): for them only ``base_lrs`` and the last
    reported rates are scaled, so the lower rate may not last. Schedulers inside a
    ``SequentialLR`` or ``ChainedScheduler`` are looked at too.

    Args:
        schedulers: the schedulers that would be given to :func:`scale_learning_rates`.

    Returns:
        The type names, each once, in the order they are first met; empty when every scheduler is
        covered.

    Example:
        >>> class Custom(torch.optim.lr_scheduler.StepLR):
        ...     pass
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> unsupported_schedulers([torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9), Custom(optimizer, 2)])
        ['Custom']
    """
    names = [type(scheduler).__name__ for scheduler in _flatten(schedulers) if type(scheduler) not in _HANDLERS]
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------- param groups


def _checked(name: str, value: object, allowed: str, accept: Callable[[float], bool]) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and accept(number):
            return number
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _plan(
    optimizers: Sequence[torch.optim.Optimizer], factor: float, min_lr: float
) -> tuple[list[LrChange], dict[int, float]]:
    """Each group's change and factor, keyed by the group's ``id``, before anything is written."""
    changes: list[LrChange] = []
    factor_of_group: dict[int, float] = {}
    for index, optimizer in enumerate(optimizers):
        for group_index, group in enumerate(optimizer.param_groups):
            if id(group) in factor_of_group:  # the same optimizer (or a wrapper sharing its groups) again
                continue
            old = float(group["lr"])
            if old <= min_lr:
                new, group_factor = old, 1.0
            elif old * factor < min_lr:
                new, group_factor = min_lr, min_lr / old
            else:
                new, group_factor = old * factor, factor
            factor_of_group[id(group)] = group_factor
            changes.append(LrChange(optimizer=index, group=group_index, old=old, new=new))
    return changes, factor_of_group


def _changed_groups(
    optimizers: Sequence[torch.optim.Optimizer], changes: list[LrChange]
) -> Iterator[tuple[dict[str, Any], LrChange]]:
    for change in changes:
        yield optimizers[change.optimizer].param_groups[change.group], change


def _group_keys(schedulers: list[object]) -> dict[int, tuple[str, ...]]:
    """The extra param group keys to scale, by group ``id``, for schedulers that keep rates there."""
    keys: dict[int, tuple[str, ...]] = {}
    for scheduler in schedulers:
        scheduler_keys = _SCHEDULER_GROUP_KEYS.get(_known_base(scheduler), ())
        for group in getattr(getattr(scheduler, "optimizer", None), "param_groups", None) or ():
            keys[id(group)] = tuple(dict.fromkeys((*keys.get(id(group), ()), *scheduler_keys)))
    return keys


def _is_number(value: object) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
        isinstance(value, Tensor) and value.numel() == 1
    )


def _put(group: dict[str, Any], key: str, value: float) -> None:
    """Write a group value, in place when it is a tensor (an optimizer may hold on to that tensor)."""
    if isinstance(group[key], Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


# ---------------------------------------------------------------------- schedulers


def _flatten(schedulers: Sequence[object]) -> Iterator[object]:
    """Each scheduler once, containers first and then the schedulers inside them."""
    seen: set[int] = set()
    pending = list(schedulers)[::-1]
    while pending:
        scheduler = pending.pop()
        if id(scheduler) in seen:
            continue
        seen.add(id(scheduler))
        yield scheduler
        if isinstance(scheduler, _CONTAINERS):
            pending.extend(list(getattr(scheduler, "_schedulers", ()))[::-1])


def _scale_list(owner: object, name: str, factors: list[float]) -> None:
    """Replace a per-group list attribute by a scaled copy (lists may be shared between schedulers)."""
    values = getattr(owner, name, None)
    if isinstance(values, list) and len(values) == len(factors) and all(_is_number(value) for value in values):
        setattr(owner, name, [value * factor for value, factor in zip(values, factors, strict=True)])


def _scale_shared(owner: object, name: str, uniform: float | None) -> None:
    """Scale a number shared by all param groups, when all of them got the same factor."""
    value = getattr(owner, name, None)
    if uniform is not None and _is_number(value):
        setattr(owner, name, value * uniform)


def _scale_common(scheduler: object, factors: list[float], uniform: float | None) -> None:
    _scale_list(scheduler, "base_lrs", factors)
    _scale_list(scheduler, "_last_lr", factors)


def _scale_cosine(scheduler: object, factors: list[float], uniform: float | None) -> None:
    _scale_common(scheduler, factors, uniform)
    _scale_shared(scheduler, "eta_min", uniform)


def _scale_cyclic(scheduler: object, factors: list[float], uniform: float | None) -> None:
    _scale_common(scheduler, factors, uniform)
    _scale_list(scheduler, "max_lrs", factors)


def _scale_plateau(scheduler: object, factors: list[float], uniform: float | None) -> None:
    _scale_list(scheduler, "_last_lr", factors)
    _scale_list(scheduler, "min_lrs", factors)
    _scale_shared(scheduler, "eps", uniform)
    _scale_shared(scheduler, "default_min_lr", uniform)


_Handler = Callable[[object, list[float], "float | None"], None]

_HANDLERS: dict[type, _Handler] = {
    lr_scheduler.LambdaLR: _scale_common,
    lr_scheduler.MultiplicativeLR: _scale_common,
    lr_scheduler.StepLR: _scale_common,
    lr_scheduler.MultiStepLR: _scale_common,
    lr_scheduler.ExponentialLR: _scale_common,
    lr_scheduler.LinearLR: _scale_common,
    lr_scheduler.ConstantLR: _scale_common,
    lr_scheduler.PolynomialLR: _scale_common,
    lr_scheduler.OneCycleLR: _scale_common,
    SWALR: _scale_common,
    lr_scheduler.SequentialLR: _scale_common,
    lr_scheduler.ChainedScheduler: _scale_common,
    lr_scheduler.CosineAnnealingLR: _scale_cosine,
    lr_scheduler.CosineAnnealingWarmRestarts: _scale_cosine,
    lr_scheduler.CyclicLR: _scale_cyclic,
    lr_scheduler.ReduceLROnPlateau: _scale_plateau,
}
_SCHEDULER_GROUP_KEYS: dict[type, tuple[str, ...]] = {
    lr_scheduler.OneCycleLR: ("max_lr", "min_lr"),
    SWALR: ("swa_lr",),
}
_CONTAINERS = (lr_scheduler.SequentialLR, lr_scheduler.ChainedScheduler)


def _known_base(scheduler: object) -> type | None:
    """The nearest covered type among the scheduler's classes, or None."""
    return next((cls for cls in type(scheduler).__mro__ if cls in _HANDLERS), None)


def _handler(scheduler: object) -> _Handler:
    base = _known_base(scheduler)
    return _scale_common if base is None else _HANDLERS[base]
