"""What lightning-actguard costs: step time with its callbacks against a plain Lightning run.

Plain script, not a test. Runs of separate trainers differ by 10-20% on a shared machine, more
than the effect to be measured, so each configuration is measured inside one training run:
the run alternates blocks of one window (50 steps) with the callbacks in the trainer's callback
list and blocks without them, in the order plain, monitored, monitored, plain, ... (so a steady
drift of the machine's speed falls on both alike). The model, data, logger and trainer are the
same in both kinds of block; only the callbacks come and go. A block's time runs from the end
of the previous block's last batch to the end of its own, so the window-closing work (reading
back, logging, judging) is counted in full. The ratio is the total time of the monitored
blocks over that of the plain ones; the interval is two standard errors of the mean of the
per-pair ratios. "plain vs plain" alternates two identical kinds of block: it shows what the
method cannot tell apart.

    python benchmarks/overhead.py           # the table in the README (about 35 minutes here)
    python benchmarks/overhead.py --quick   # a short smoke run

The gradient monitor's optimizer hook stays installed in the plain blocks (a flag test per
step, about a microsecond); everything else the callbacks do is absent from them.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actguard import ActivationMonitor, DeadReLUGuard, GradientMonitor, LossPlateauGuard
from lightning_actguard.engine import DEFAULT_OVERHEAD_BUDGET, engine_for

WINDOW = 50


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        #: Seconds spent in backward passes (on a CPU; on a GPU they run asynchronously).
        self.backward_seconds = 0.0

    def backward(self, loss: torch.Tensor, *args: object, **kwargs: object) -> None:
        started = time.perf_counter()
        super().backward(loss, *args, **kwargs)
        self.backward_seconds += time.perf_counter() - started

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(self.net(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def mlp(depth: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


class Naive(pl.Callback):
    """What everyone writes first: per-layer statistics read back with .item() on every batch."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.handles: list = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in pl_module.named_modules()
            if isinstance(module, nn.ReLU)
        ]

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.values[f"mean/{name}"] = output.mean().item()
            self.values[f"std/{name}"] = output.std().item()
            self.values[f"zero/{name}"] = (output == 0).float().mean().item()

        return record

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        for handle in self.handles:
            handle.remove()


def everything(histograms: bool = False, budget: float | None = DEFAULT_OVERHEAD_BUDGET) -> list[pl.Callback]:
    every = 2 * WINDOW if histograms else None
    return [
        ActivationMonitor(histogram_every_n_steps=every, overhead_budget=budget, print_summary=False),
        GradientMonitor(histogram_every_n_steps=every, overhead_budget=budget, print_summary=False),
        DeadReLUGuard(print_summary=False),
        LossPlateauGuard(print_summary=False),
    ]


CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "plain vs plain": list,
    "naive .item() per layer": lambda: [Naive()],
    "everything, every batch (overhead_budget=None)": lambda: everything(budget=None),
    "ActivationMonitor": lambda: [ActivationMonitor(print_summary=False)],
    "GradientMonitor": lambda: [GradientMonitor(print_summary=False)],
    "everything (defaults)": everything,
    f"everything + histograms every {2 * WINDOW} steps": lambda: everything(histograms=True),
}


@dataclass
class Alternate(pl.Callback):
    """Takes ``callbacks`` out of the trainer's list and puts them back, a window at a time.

    Last in the callback list, so a block's time ends after every other callback's work on its
    last batch. The callbacks are in the list for the first ``warmup`` blocks (their set-up and
    first windows), then the blocks go plain, monitored, monitored, plain, ... until ``pairs``
    pairs are timed. The callbacks are back in the list when training ends.
    """

    callbacks: list[pl.Callback]
    warmup: int
    pairs: int
    plain: list[float] = field(default_factory=list)
    monitored: list[float] = field(default_factory=list)
    plain_backward: list[float] = field(default_factory=list)
    monitored_backward: list[float] = field(default_factory=list)
    estimates: list[float] = field(default_factory=list)
    state_bytes: int = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._everyone = list(trainer.callbacks)
        self._others = [callback for callback in self._everyone if not any(callback is c for c in self.callbacks)]
        self._block, self._monitoring, self._last, self._backward_before = 0, True, 0.0, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step % WINDOW:
            return
        _wait_for(pl_module)
        now = time.perf_counter()
        if self._block >= self.warmup:
            (self.monitored if self._monitoring else self.plain).append(now - self._last)
            backward = pl_module.backward_seconds - self._backward_before
            (self.monitored_backward if self._monitoring else self.plain_backward).append(backward)
            engine = engine_for(pl_module)
            latest = engine.latest if engine is not None else None
            if self._monitoring and latest is not None and latest.overhead is not None:
                self.estimates.append(latest.overhead)
        self._block += 1
        timed = self._block - self.warmup
        # plain, monitored, monitored, plain: blocks 4k and 4k+3 are plain.
        self._monitoring = timed < 0 or timed % 4 in (1, 2) or timed >= 2 * self.pairs
        if self._monitoring:
            trainer.callbacks = self._everyone
        else:
            trainer.callbacks = self._others
        if timed == 0:
            engine = engine_for(pl_module)
            self.state_bytes = engine.state_bytes() if engine is not None else 0
        self._backward_before = pl_module.backward_seconds
        self._last = time.perf_counter()


def _wait_for(pl_module: pl.LightningModule) -> None:
    """On a GPU, let the queued work finish before reading the clock."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Ratio:
    """A ratio of totals, and two standard errors of the mean of its per-pair values."""

    value: float
    spread: float

    @classmethod
    def of(cls, mine: list[float], theirs: list[float]) -> Ratio:
        pairs = [a / b for a, b in zip(mine, theirs, strict=True)]
        spread = 2 * statistics.stdev(pairs) / math.sqrt(len(pairs)) if len(pairs) > 1 else math.nan
        return cls(sum(mine) / sum(theirs), spread)

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.spread:.3f}"


@dataclass(frozen=True)
class Row:
    model: str
    config: str
    plain_ms: float
    monitored_ms: float
    ratio: Ratio
    corrected: Ratio | None
    estimate: float | None
    state_bytes: int


def measure(
    name: str,
    make_net: Callable[[], nn.Module],
    shape: tuple[int, ...],
    batch: int,
    config: str,
    pairs: int,
    warmup: int = 3,
    device: str = "cpu",
) -> Row:
    """Train one model for ``warmup + 2 * pairs`` windows, alternating plain and monitored blocks."""
    data = TensorDataset(torch.randn(batch * 8, *shape), torch.randint(0, 10, (batch * 8,)))
    callbacks = CONFIGS[config]()
    alternate = Alternate(callbacks, warmup, pairs)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_steps=(warmup + 2 * pairs) * WINDOW,
            callbacks=[*callbacks, alternate],
            logger=TensorBoardLogger(logs, name="overhead"),
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            log_every_n_steps=WINDOW,
            accelerator=device,
            devices=1,
        )
        trainer.fit(Classifier(make_net()), DataLoader(data, batch_size=batch, shuffle=False))
    plain, monitored = alternate.plain, alternate.monitored
    corrected = None
    if device == "cpu":
        # The backward pass is the same in both kinds of block (the callbacks do nothing during
        # it), so its time in a block says how fast the machine ran then.
        # The ratio of totals, scaled by the ratio of backward totals; its spread, from the
        # per-block times each divided by its own backward time.
        speed = sum(alternate.plain_backward) / sum(alternate.monitored_backward)
        per_block = Ratio.of(
            [t / b for t, b in zip(monitored, alternate.monitored_backward, strict=True)],
            [t / b for t, b in zip(plain, alternate.plain_backward, strict=True)],
        )
        corrected = Ratio(sum(monitored) / sum(plain) * speed, per_block.spread)
    return Row(
        model=name,
        config=config,
        plain_ms=1000 * sum(plain) / (len(plain) * WINDOW),
        monitored_ms=1000 * sum(monitored) / (len(monitored) * WINDOW),
        ratio=Ratio.of(monitored, plain),
        corrected=corrected,
        estimate=statistics.fmean(alternate.estimates) if alternate.estimates else None,
        state_bytes=alternate.state_bytes,
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "MLP 8x512, batch 256": (lambda: mlp(8, 512), (512,), 256),
    "CNN 4 conv, batch 128": (cnn, (3, 32, 32), 128),
    "MLP 8x128, batch 256": (lambda: mlp(8, 128), (128,), 256),
    "MLP 32x128, batch 256": (lambda: mlp(32, 128), (128,), 256),
    "MLP 128x128, batch 256": (lambda: mlp(128, 128), (128,), 256),
}

DEPTH_CONFIGS = ["everything (defaults)", "everything, every batch (overhead_budget=None)"]
PLAN: dict[str, list[str]] = {
    "MLP 8x512, batch 256": list(CONFIGS),
    "CNN 4 conv, batch 128": [
        "plain vs plain",
        "naive .item() per layer",
        "everything, every batch (overhead_budget=None)",
        "everything (defaults)",
        f"everything + histograms every {2 * WINDOW} steps",
    ],
    "MLP 8x128, batch 256": DEPTH_CONFIGS,
    "MLP 32x128, batch 256": DEPTH_CONFIGS,
    "MLP 128x128, batch 256": DEPTH_CONFIGS,
}


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n{title}")
    print(
        "| model | configuration | plain step (ms) | monitored step (ms) | ratio to plain "
        "| ratio, speed-corrected | engine's estimate | engine state (bytes) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        reckoned = f"{row.estimate:.1%}" if row.estimate is not None else ""
        print(
            f"| {row.model} | {row.config} | {row.plain_ms:.2f} | {row.monitored_ms:.2f} | {row.ratio} "
            f"| {row.corrected or ''} | {reckoned} | {row.state_bytes:,} |"
        )


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16, help="timed plain/monitored pairs of blocks per run")
    parser.add_argument("--cnn-pairs", type=int, default=8, help="the same for the CNN, whose steps are slower")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="2 pairs per run, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.pairs = args.cnn_pairs = 2
    quiet()
    rows = []
    for model in args.models:
        make_net, shape, batch = MODELS[model]
        pairs = args.cnn_pairs if model.startswith("CNN") else args.pairs
        for config in PLAN[model]:
            rows.append(measure(model, make_net, shape, batch, config, pairs))
            print(rows[-1], flush=True)
    threads = torch.get_num_threads()
    print_table(rows, f"torch {torch.__version__}, Lightning {pl.__version__}, {threads} threads, CPU")


if __name__ == "__main__":
    main()
