"""One measuring engine per model, shared by every callback that needs its numbers.

Several callbacks (monitors, guards) may ask for the same statistics. They all :func:`acquire`
the model's :class:`Engine`, so the model carries one set of hooks and each window is read back
once: activation and gradient buffers go into one flat tensor, one reduction across processes,
one copy to the host. The hooks go when the last callback calls :meth:`Engine.release`. The
engine also decides when a window closes: at every optimizer step that is a multiple of
``every_n_steps``.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Hashable, Iterable
from dataclasses import astuple, dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from lightning_actguard._packing import FlatReader, ReduceSum, host_to_device, read_back
from lightning_actguard.activations import ActivationLayer
from lightning_actguard.collector import ActivationCollector
from lightning_actguard.functional import FunctionalActivation, FunctionalActivationProbe
from lightning_actguard.gradients import GradientCollector, GradientThresholds
from lightning_actguard.losses import LossTracker
from lightning_actguard.snapshot import WindowSnapshot

__all__ = ["ActivationSettings", "Engine", "GradientSettings", "OverheadEstimate", "acquire", "engine_for"]

#: Share of the training time the consumers may take in all before the engine measures fewer batches.
#: Half of 2%: the other half is left for what the engine's timers cannot see (Lightning calling
#: the callbacks' hooks, about 2 microseconds per callback and hook).
DEFAULT_OVERHEAD_BUDGET = 0.01
_MAX_SAMPLE_EVERY = 1000

_ENGINES: weakref.WeakKeyDictionary[nn.Module, Engine] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ActivationSettings:
    """What every consumer of a model's activation statistics must agree on."""

    unit_dim: int | str = "auto"
    saturation_eps: float = 0.01
    max_calls_per_module: int = 8


@dataclass(frozen=True)
class GradientSettings:
    """What every consumer of a model's gradient statistics must agree on."""

    thresholds: GradientThresholds = field(default_factory=GradientThresholds)
    update_ratio: bool = True


class Engine:
    """The hooks, windows and latest snapshot of one model. Create it with :func:`acquire`."""

    def __init__(self, model: nn.Module, every_n_steps: int, reduce_sum: ReduceSum | None, world_size: int) -> None:
        self._model = weakref.ref(model)
        self.every_n_steps = every_n_steps
        self.window_explicit = True
        self.reduce_sum = reduce_sum
        self.world_size = world_size
        self.activations: ActivationCollector | None = None
        self.gradients: GradientCollector | None = None
        self.losses: dict[str, LossTracker] = {}
        self.latest: WindowSnapshot | None = None
        self.histogram_every_n_steps: int | None = None
        self._settings: dict[str, tuple[object, str, bool]] = {}
        self._losses_added: Hashable | None = None
        self._consumers: dict[int, str] = {}
        self._batch: Hashable | None = None
        self._ended: Hashable | None = None
        self._ended_with: WindowSnapshot | None = None
        self._last_optimizer_step: Hashable | None = None
        self._last_closed_step = -1
        self._windows = 0
        self._batches = 0
        self._histogram_window = False
        self.overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET
        self.sample_every = 1
        #: Estimated share of the step time the consumers took in the last window read back.
        self.overhead: float | None = None
        #: What the consumers cost, as last estimated; ``None`` before the first window.
        self.estimate: OverheadEstimate | None = None
        #: Even one measured batch per window costs more than the budget.
        self.over_budget = False
        self.over_budget_reported = False
        self._measuring = True
        self._measured_batches = 0
        self._timing = _BatchTimes()
        self._observed_cost: float | None = None
        self._opening_cost: float | None = None
        self._fixed_cost = 0.0
        self._batch_started: float | None = None
        self._charged = 0.0
        self._interrupted = False
        self._closed = False
        #: Activations applied functionally (``F.relu`` in a ``forward``), found on the first
        #: measured batch; ``None`` until then. Hooks cannot see them.
        self.functional: list[FunctionalActivation] | None = None
        self.functional_reported = False
        self._probe: FunctionalActivationProbe | None = None

    @property
    def consumers(self) -> list[str]:
        """Names of the callbacks sharing this engine."""
        return list(self._consumers.values())

    def _agree(self, kind: str, settings: object, consumer: object, *, explicit: bool = True) -> bool:
        """Record ``settings`` for ``kind``; return True when they replace settings nobody chose.

        Raises:
            ValueError: two consumers chose different settings.
        """
        name = type(consumer).__name__
        agreed = self._settings.get(kind)
        if agreed is None or (explicit and not agreed[2]):
            self._settings[kind] = (settings, name, explicit)
            return agreed is not None and agreed[0] != settings
        if explicit and agreed[0] != settings:
            raise ValueError(
                f"{name} asks for {settings}, but {agreed[1]} already measures this model "
                f"with {agreed[0]}. Give them the same settings."
            )
        return False

    def use_activations(
        self, consumer: object, settings: ActivationSettings | None, layers: Iterable[ActivationLayer]
    ) -> None:
        """Measure ``layers`` too (the union of every consumer's layers is measured).

        ``settings=None`` takes whatever another consumer chose, or the defaults.
        """
        replaced = self._agree("activations", settings or ActivationSettings(), consumer, explicit=settings is not None)
        chosen: ActivationSettings = self._settings["activations"][0]  # type: ignore[assignment]
        if self.activations is None or replaced:
            previous = self.activations
            self.activations = ActivationCollector(
                unit_dim=chosen.unit_dim,
                saturation_eps=chosen.saturation_eps,
                max_calls_per_module=chosen.max_calls_per_module,
            )
            if previous is not None:
                self.activations.attach(previous.layers)
                previous.detach()
        self.activations.attach(layers)

    def use_gradients(
        self, consumer: object, settings: GradientSettings | None = None, *, sharded: bool = False
    ) -> None:
        """Measure gradients of the model's trainable parameters at every optimizer step.

        ``settings=None`` takes whatever another consumer chose, or the defaults.
        """
        replaced = self._agree("gradients", settings or GradientSettings(), consumer, explicit=settings is not None)
        chosen: GradientSettings = self._settings["gradients"][0]  # type: ignore[assignment]
        model = self._model()
        if (self.gradients is None or replaced) and model is not None:
            if self.gradients is not None:
                self.gradients.detach()
            self.gradients = GradientCollector(
                model, thresholds=chosen.thresholds, update_ratio=chosen.update_ratio, sharded=sharded
            )

    def use_overhead_budget(self, consumer: object, budget: float | None) -> None:
        """Measure activations and gradients on fewer batches when they cost more than ``budget``.

        ``budget`` is a share of the training step time (0.02: 2%); ``None`` measures every batch.
        A value equal to :data:`DEFAULT_OVERHEAD_BUDGET` gives way to any other consumer's choice.
        """
        self._agree("overhead budget", budget, consumer, explicit=budget != DEFAULT_OVERHEAD_BUDGET)
        self.overhead_budget = self._settings["overhead budget"][0]  # type: ignore[assignment]

    def use_loss(self, metric: str | None = None) -> None:
        """Track the training loss (``None``: what ``training_step`` returns) or a logged metric."""
        self.losses.setdefault(metric or "", LossTracker())

    def wants_losses(self, batch: Hashable) -> bool:
        """Whether the losses of ``batch`` are still to be added (a cheap check before collecting them)."""
        return bool(self.losses) and batch != self._losses_added

    def add_losses(self, batch: Hashable, values: dict[str, Tensor]) -> None:
        """Add this batch's loss values, once per batch however many callers pass them."""
        if batch == self._losses_added:
            return
        self._losses_added = batch
        for metric, value in values.items():
            if metric in self.losses:
                self.losses[metric].add(value)

    def use_histograms(self, consumer: object, every_n_steps: int) -> None:
        """Bucket activations and gradients in windows that close at a multiple of ``every_n_steps``.

        The histograms are taken on the first batch (and first optimizer step) of such a window.
        """
        self._agree("histograms", every_n_steps, consumer)
        self.histogram_every_n_steps = every_n_steps

    def state_bytes(self) -> int:
        """Bytes of device memory the engine's buffers hold: a few numbers per layer and one per unit."""
        sources = [self.activations, self.gradients, *self.losses.values()]
        return sum(piece.numel() * piece.element_size() for source in sources if source for piece in source.pack())

    def release(self, consumer: object) -> None:
        """Drop ``consumer``; the last one out removes every hook. Safe to call twice."""
        self._consumers.pop(id(consumer), None)
        if self._consumers:
            return
        self._stop_probe()
        if self.activations is not None:
            self.activations.detach()
        if self.gradients is not None:
            self.gradients.detach()
        model = self._model()
        if model is not None and _ENGINES.get(model) is self:
            del _ENGINES[model]

    # ------------------------------------------------------------------ the training loop

    def start_batch(self, batch: Hashable, step: int | None = None) -> None:
        """Start counting training batch ``batch``; repeated calls for the same batch are ignored.

        ``step`` is the number of optimizer steps taken before this batch; it places the window
        among the histogram windows (which close at multiples of the histogram interval).
        """
        if batch == self._batch:
            return
        self._batch = batch
        now = time.perf_counter()
        if self._batch_started is not None:
            self._count_interval(now - self._batch_started)
        self._batch_started, self._charged, self._interrupted, self._closed = now, 0.0, False, False
        # The first batch of every window is measured, then every `sample_every`-th.
        self._measuring = self._batches % self.sample_every == 0
        self._measured_batches += self._measuring
        self._batches += 1
        every = self.histogram_every_n_steps
        if every is not None:
            windows_before = self._windows if step is None else step // self.every_n_steps
            self._histogram_window = (windows_before + 1) * self.every_n_steps % every == 0
        if self.activations is not None:
            self.activations.start_batch(histograms=self._histogram_window, measure=self._measuring)
            if self.functional is None and self._measuring:
                self._start_probe()

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` a consumer spent on the current batch (its hooks, logging, judging)."""
        self._charged += seconds

    def interrupt(self) -> None:
        """Leave the current batch's interval out of the timings (validation or an epoch's end runs in it)."""
        self._interrupted = True

    def _count_interval(self, seconds: float) -> None:
        """File the time from the start of the batch that just ended to the start of this one."""
        timing = self._timing
        if self._closed:  # what the consumers took on it is the window's reading, logging and judging
            timing.window_end += self._charged
        elif self._interrupted:
            return
        elif self._batches == 1:  # the window's first batch
            if self._windows:  # the run's very first one also sets things up
                timing.opening += seconds
                timing.opening_count += 1
        elif self._measuring:
            timing.measured += seconds
            timing.measured_count += 1
        else:
            timing.unmeasured += seconds
            timing.unmeasured_count += 1
            timing.unmeasured_charged += self._charged

    def _start_probe(self) -> None:
        """Look for functional activations during this batch's forward (once per run)."""
        model = self._model()
        if model is None or self.activations is None:
            return
        hooked = tuple({type(layer.module) for layer in self.activations.layers})
        self._probe = FunctionalActivationProbe(model, extra_types=hooked)
        self._probe.start()

    def _stop_probe(self) -> None:
        if self._probe is not None:
            self.functional = self._probe.stop()
            self._probe = None

    def pause(self) -> None:
        """Stop counting forwards until :meth:`resume` (backward recomputations)."""
        if not self._measuring:
            return
        self._stop_probe()
        if self.activations is not None:
            self.activations.pause()

    def resume(self) -> None:
        """Count forwards again."""
        if self._measuring and self.activations is not None:
            self.activations.resume()

    @property
    def measures_gradients(self) -> bool:
        """Whether the current batch's optimizer steps are measured."""
        return self._measuring and self.gradients is not None

    def before_optimizer_step(
        self, step: Hashable, optimizer: torch.optim.Optimizer, grad_scale: Tensor | None, scaler: bool
    ) -> None:
        """Measure the gradients ``optimizer`` is about to apply, once per ``step`` and optimizer."""
        key = (step, id(optimizer))
        if self.gradients is None or key == self._last_optimizer_step or not self._measuring:
            return
        self._last_optimizer_step = key
        self.gradients.before_step(optimizer, grad_scale=grad_scale, scaler=scaler, histograms=self._histogram_window)

    def end_batch(self, batch: Hashable, step: int) -> WindowSnapshot | None:
        """Finish ``batch`` at optimizer step ``step``.

        Returns:
            The snapshot of the window this batch closed, to every caller for that batch; else
            ``None``.
        """
        if batch == self._ended:
            return self._ended_with
        self._stop_probe()
        if self.activations is not None:
            self.activations.end_batch()
        self._ended, self._ended_with = batch, None
        if step != self._last_closed_step and step > 0 and step % self.every_n_steps == 0:
            self._ended_with = self.close_window(step)
            self._closed = True
        return self._ended_with

    def flush(self, step: int) -> WindowSnapshot | None:
        """Close a partly filled window at the end of training, once however many callers ask.

        Returns:
            The snapshot of the partial window, or ``None`` when no batch was counted since the
            last window closed.
        """
        if ("flush", step) == self._ended:
            return self._ended_with
        self._ended, self._ended_with = ("flush", step), None
        if self._batches:
            self._ended_with = self.close_window(step)
        return self._ended_with

    def close_window(self, step: int) -> WindowSnapshot:
        """Read the current window now: one reduction, one copy to the host, for everything measured."""
        return self._read_window(step)

    def _cost(self) -> list[float]:
        """This window's timings, summed across processes with the statistics.

        The measuring work timed inside the hooks, the :class:`_BatchTimes`, and the counts of
        measured and all batches.
        """
        collectors = [source for source in (self.activations, self.gradients) if source is not None]
        work = sum(source.seconds for source in collectors)
        for source in collectors:
            source.seconds = 0.0
        timing, self._timing = self._timing, _BatchTimes()
        return [work, *timing.values(), float(self._measured_batches), float(self._batches)]

    def _choose_sampling(self, cost: list[float]) -> None:
        """Estimate what the consumers cost, and space the measured batches to stay within the budget.

        See :class:`OverheadEstimate` for the model. ``c`` is how much longer measured batches
        took than unmeasured ones, averaged with the previous windows' figure, which also counts
        what no timer inside a hook sees (PyTorch's slower path for a module with hooks), and at
        least the time spent in the hooks; before any batch went unmeasured, only the latter.
        ``f`` is the consumers' own time on unmeasured batches. ``W`` is their time on the batch
        that closed the previous window, plus what the window's first batch (which also starts
        the update-ratio measurement) takes beyond another measured one. The spacing is the
        smallest that keeps the cost within ``overhead_budget`` of the training time. The numbers
        are summed across processes first, so every process picks the same spacing.
        """
        work, *times, measured, batches = cost
        timing = _BatchTimes(*times)
        self._measured_batches = 0
        if not measured or not batches:
            return
        if timing.unmeasured_count:
            self._fixed_cost = timing.unmeasured_charged / timing.unmeasured_count
        if timing.opening_count and timing.measured_count:
            opening = timing.opening / timing.opening_count - timing.measured / timing.measured_count
            if self._opening_cost is not None:
                opening = (opening + self._opening_cost) / 2
            self._opening_cost = opening
        else:  # no other measured batch to compare it with: it stands for them all
            self._opening_cost = None
            timing.measured += timing.opening
            timing.measured_count += timing.opening_count
        per_measured = work / measured
        if timing.unmeasured_count and timing.measured_count:
            unmeasured = timing.unmeasured / timing.unmeasured_count
            observed = timing.measured / timing.measured_count - unmeasured
            if self._observed_cost is not None:
                observed = (observed + self._observed_cost) / 2
            self._observed_cost = observed
            per_measured = max(per_measured, observed)
            plain = unmeasured - self._fixed_cost
        elif timing.measured_count:
            plain = timing.measured / timing.measured_count - per_measured - self._fixed_cost
        else:
            return
        if plain <= 0:
            return
        ranks = self.world_size
        window_end = timing.window_end / ranks + max(self._opening_cost or 0.0, 0.0)
        estimate = OverheadEstimate(per_measured, self._fixed_cost, window_end, plain)
        self.estimate = estimate
        self.overhead = estimate.share(measured / ranks, batches / ranks)
        if self.overhead_budget is None:
            self.sample_every = 1
            return
        batches /= ranks
        affordable = estimate.affordable(self.overhead_budget, batches)
        self.over_budget = affordable < 1
        # The first batch of a window is always measured, so `k` apart measures ceil(B / k).
        wanted = math.ceil(batches / max(math.floor(affordable + 1e-9), 1))
        self.sample_every = min(max(wanted, 1), _MAX_SAMPLE_EVERY)

    def _read_window(self, step: int) -> WindowSnapshot:
        sources: list[tuple[str, _Source]] = [("activations", self.activations), ("gradients", self.gradients)]  # type: ignore[list-item]
        sources += [(f"loss:{metric}", tracker) for metric, tracker in self.losses.items()]
        sources = [(name, source) for name, source in sources if source is not None]
        packed = [(name, source, source.pack()) for name, source in sources]
        pieces = [piece for _, _, group in packed for piece in group]
        results: dict[str, object] = {}
        cost = self._cost()
        measured_batches = self._measured_batches
        if pieces:
            take = read_back([*pieces, host_to_device(cost, pieces[0].device)], self.reduce_sum)
            for name, source, group in packed:
                if group:
                    results[name] = source.unpack(take, self.world_size) if name == "gradients" else source.unpack(take)
            cost = take(len(cost))
        for _, source in sources:
            source.reset()
        self._choose_sampling(cost)
        self.latest = WindowSnapshot(
            step=step,
            batches=self._batches,
            measured_batches=measured_batches,
            overhead=self.overhead,
            activations={layer.name: layer for layer in results.get("activations", [])},  # type: ignore[attr-defined]
            gradients=results.get("gradients"),  # type: ignore[arg-type]
            losses={name[len("loss:") :]: value for name, value in results.items() if name.startswith("loss:")},  # type: ignore[misc]
        )
        self._last_closed_step = step
        self._windows += 1
        self._batches = 0
        return self.latest


@dataclass(frozen=True)
class OverheadEstimate:
    """What the callbacks sharing an engine cost, per process, in seconds.

    Over a window of ``B`` batches of which ``M`` are measured, they take
    ``M * measured_batch + B * every_batch + window_end`` against ``B * plain_batch`` of training.

    Attributes:
        measured_batch: what a measured batch costs more than another (``c``).
        every_batch: what the callbacks spend on every batch, measured or not (``f``).
        window_end: what reading, logging and judging a window costs (``W``).
        plain_batch: a training batch without any of it (``p``).
    """

    measured_batch: float
    every_batch: float
    window_end: float
    plain_batch: float

    def share(self, measured: float, batches: float) -> float:
        """The cost of a window with ``measured`` of ``batches`` measured, as a share of its training time."""
        cost = measured * self.measured_batch + batches * self.every_batch + self.window_end
        return cost / (batches * self.plain_batch)

    def affordable(self, budget: float, batches: float) -> float:
        """How many of ``batches`` may be measured within ``budget`` (a share of the training time)."""
        spare = budget * batches * self.plain_batch - batches * self.every_batch - self.window_end
        return spare / self.measured_batch if self.measured_batch > 0 else batches


@dataclass
class _BatchTimes:
    """Seconds and counts of one window's batch intervals (start to next start), by kind.

    The window's first batch (always measured, and the one that starts the update-ratio
    measurement) is the *opening*; the batch that closed the previous window is only counted
    by what the callbacks were charged on it (reading, logging, judging).
    """

    measured: float = 0.0
    measured_count: float = 0.0
    unmeasured: float = 0.0
    unmeasured_count: float = 0.0
    unmeasured_charged: float = 0.0
    opening: float = 0.0
    opening_count: float = 0.0
    window_end: float = 0.0

    def values(self) -> list[float]:
        return list(astuple(self))


class _Source(Protocol):
    def pack(self) -> list[Tensor]: ...
    def unpack(self, take: FlatReader, *args: int) -> object: ...
    def reset(self) -> None: ...


def acquire(
    model: nn.Module,
    consumer: object,
    *,
    every_n_steps: int,
    explicit: bool = True,
    reduce_sum: ReduceSum | None = None,
    world_size: int = 1,
) -> Engine:
    """Join (or create) ``model``'s engine as ``consumer``, before training starts.

    Args:
        model: the model to measure.
        consumer: the callback joining.
        every_n_steps: the window length the consumer wants.
        explicit: the consumer chose ``every_n_steps`` itself; a window that was only a default
            gives way to an explicit one.
        reduce_sum: sums a tensor across processes; ``None`` for a single process.
        world_size: number of processes.

    Raises:
        ValueError: two consumers chose different windows explicitly.
    """
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = Engine(model, every_n_steps, reduce_sum, world_size)
        engine.window_explicit = explicit
    elif engine.every_n_steps != every_n_steps and explicit:
        if engine.window_explicit:
            raise ValueError(
                f"{type(consumer).__name__} asks for windows of {every_n_steps} steps, but "
                f"{', '.join(engine.consumers)} already measures this model every {engine.every_n_steps} steps. "
                "Give them the same `every_n_steps`."
            )
        engine.every_n_steps, engine.window_explicit = every_n_steps, True
    engine._consumers[id(consumer)] = type(consumer).__name__
    return engine


def engine_for(model: nn.Module) -> Engine | None:
    """The engine attached to ``model``, if any."""
    return _ENGINES.get(model)
