"""One collector per model, shared by every callback that needs activation statistics.

Several callbacks (a monitor, guards) may ask for the same numbers. They all
:func:`acquire` the model's :class:`ActivationEngine`, so the model carries one set of hooks
and each window is read back once; the hooks go when the last of them calls
:meth:`ActivationEngine.release`. The engine also decides when a window closes: at every
optimizer step that is a multiple of ``every_n_steps``.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from dataclasses import dataclass

from torch import nn

from lightning_actguard.activations import ExtraTypes, LayerPredicate, find_activation_layers
from lightning_actguard.collector import ActivationCollector, ReduceSum
from lightning_actguard.snapshot import ActivationSnapshot

__all__ = ["ActivationEngine", "CollectorSettings", "acquire", "engine_for"]

_ENGINES: weakref.WeakKeyDictionary[nn.Module, ActivationEngine] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CollectorSettings:
    """What every consumer of one model's engine must agree on."""

    every_n_steps: int
    unit_dim: int | str = "auto"
    saturation_eps: float = 0.01
    max_calls_per_module: int = 8


class ActivationEngine:
    """The hooks, windows and latest snapshot of one model. Create it with :func:`acquire`."""

    def __init__(self, model: nn.Module, settings: CollectorSettings, reduce_sum: ReduceSum | None) -> None:
        self._model = weakref.ref(model)
        self.settings = settings
        self.reduce_sum = reduce_sum
        self.collector = ActivationCollector(
            unit_dim=settings.unit_dim,
            saturation_eps=settings.saturation_eps,
            max_calls_per_module=settings.max_calls_per_module,
        )
        self.latest: ActivationSnapshot | None = None
        self.histogram_every_n_windows: int | None = None
        self._consumers: dict[int, str] = {}
        self._batch: Hashable | None = None
        self._ended: Hashable | None = None
        self._ended_with: ActivationSnapshot | None = None
        self._last_closed_step = -1
        self._windows = 0

    @property
    def consumers(self) -> list[str]:
        """Names of the callbacks sharing this engine."""
        return list(self._consumers.values())

    def release(self, consumer: object) -> None:
        """Drop ``consumer``; the last one out removes the hooks. Safe to call twice."""
        self._consumers.pop(id(consumer), None)
        if not self._consumers:
            self.collector.detach()
            model = self._model()
            if model is not None and _ENGINES.get(model) is self:
                del _ENGINES[model]

    def start_batch(self, batch: Hashable) -> None:
        """Start counting training batch ``batch``; repeated calls for the same batch are ignored."""
        if batch == self._batch:
            return
        self._batch = batch
        every = self.histogram_every_n_windows
        self.collector.start_batch(histograms=every is not None and (self._windows + 1) % every == 0)

    def end_batch(self, batch: Hashable, step: int) -> ActivationSnapshot | None:
        """Finish ``batch`` at optimizer step ``step``.

        Returns:
            The snapshot of the window this batch closed, to every caller for that batch; else
            ``None``.
        """
        if batch == self._ended:
            return self._ended_with
        self.collector.end_batch()
        self._ended, self._ended_with = batch, None
        if step != self._last_closed_step and step > 0 and step % self.settings.every_n_steps == 0:
            self._ended_with = self.close_window(step)
        return self._ended_with

    def close_window(self, step: int) -> ActivationSnapshot | None:
        """Read the current window now (for instance at the end of training), if it holds batches."""
        batches = self.collector.batches
        if batches == 0 and self.reduce_sum is None:
            return None
        self._last_closed_step = step
        self._windows += 1
        self.latest = ActivationSnapshot(
            step=step,
            batches=batches,
            layers={layer.name: layer for layer in self.collector.read(self.reduce_sum)},
        )
        return self.latest


def acquire(
    model: nn.Module,
    consumer: object,
    settings: CollectorSettings,
    *,
    reduce_sum: ReduceSum | None = None,
    extra_types: ExtraTypes = (),
    name_pattern: str | None = None,
    predicate: LayerPredicate | None = None,
) -> ActivationEngine:
    """Join (or create) ``model``'s engine and hook the layers ``consumer`` selects.

    The layers hooked are the union of what every consumer selects.

    Raises:
        ValueError: ``settings`` differ from those of a consumer already attached.
    """
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = ActivationEngine(model, settings, reduce_sum)
    elif engine.settings != settings:
        raise ValueError(
            f"{type(consumer).__name__} asks for {settings}, but {', '.join(engine.consumers)} already "
            f"collects activations of this model with {engine.settings}. Give them the same settings."
        )
    engine._consumers[id(consumer)] = type(consumer).__name__
    engine.collector.attach(
        find_activation_layers(model, extra_types=extra_types, name_pattern=name_pattern, predicate=predicate)
    )
    return engine


def engine_for(model: nn.Module) -> ActivationEngine | None:
    """The engine attached to ``model``, if any."""
    return _ENGINES.get(model)
