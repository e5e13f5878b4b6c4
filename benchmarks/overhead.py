"""What lightning-actguard costs: mean step time with its callbacks over a plain Lightning run.

Plain script, not a test. Each configuration trains the same model from the same seed in the
same process, logging to TensorBoard; the configurations are interleaved in rounds so that a
slow moment of the machine is shared among them, and each round starts one configuration later
so that none is always first. A run's time is the total over its measured
steps (after a warm-up), so the expensive window-closing steps are counted in full. The ratio is
of the mean step times over all rounds, against the plain run; the range is that of the
per-round ratios, and the "plain (again)" row shows how far two identical runs differ. The
engine's estimate is the mean of what the engine itself reckons its callbacks cost
(``act_overhead``), over the timed windows.

    python benchmarks/overhead.py            # the table in the README
    python benchmarks/overhead.py --quick    # a short smoke run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actguard import ActivationMonitor, DeadReLUGuard, GradientMonitor, LossPlateauGuard
from lightning_actguard.engine import DEFAULT_OVERHEAD_BUDGET, engine_for


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

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
    """What everyone writes first: per-layer statistics read back with .item() every step."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.values: dict[str, float] = {}
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in pl_module.named_modules()
            if isinstance(module, nn.ReLU)
        ]

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if module.training:
                self.values[f"mean/{name}"] = output.mean().item()
                self.values[f"std/{name}"] = output.std().item()
                self.values[f"zero/{name}"] = (output == 0).float().mean().item()

        return record

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.state_bytes = 0
        self.estimates: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == self.warmup and not hasattr(self, "start"):
            _wait_for(pl_module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        engine = engine_for(pl_module)
        latest = engine.latest if engine is not None else None
        if latest is not None and latest.step == trainer.global_step > self.warmup and latest.overhead is not None:
            self.estimates.append(latest.overhead)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _wait_for(pl_module)
        self.seconds_per_step = (time.perf_counter() - self.start) / (trainer.global_step - self.warmup)
        engine = engine_for(pl_module)
        self.state_bytes = engine.state_bytes() if engine is not None else 0


def _wait_for(pl_module: pl.LightningModule) -> None:
    """On a GPU, let the queued work finish before reading the clock."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize()


def everything(histograms: bool = False, budget: float | None = DEFAULT_OVERHEAD_BUDGET) -> list[pl.Callback]:
    every = 100 if histograms else None
    return [
        ActivationMonitor(histogram_every_n_steps=every, overhead_budget=budget, print_summary=False),
        GradientMonitor(histogram_every_n_steps=every, overhead_budget=budget, print_summary=False),
        DeadReLUGuard(print_summary=False),
        LossPlateauGuard(print_summary=False),
    ]


CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "plain": list,
    "plain (again)": list,
    "naive .item() per layer": lambda: [Naive()],
    "everything, every batch (overhead_budget=None)": lambda: everything(budget=None),
    "ActivationMonitor": lambda: [ActivationMonitor(print_summary=False)],
    "GradientMonitor": lambda: [GradientMonitor(print_summary=False)],
    "everything (defaults)": everything,
    "everything + histograms every 100 steps": lambda: everything(histograms=True),
}


def run(
    make_net: Callable[[], nn.Module],
    data: TensorDataset,
    batch: int,
    callbacks: list,
    steps: int,
    warmup: int,
    device: str = "cpu",
) -> StepTimer:
    torch.manual_seed(0)
    timer = StepTimer(warmup)
    logs = tempfile.TemporaryDirectory()
    trainer = pl.Trainer(
        max_steps=warmup + steps,
        callbacks=[*callbacks, timer],
        logger=TensorBoardLogger(logs.name, name="overhead"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        accelerator=device,
        devices=1,
    )
    trainer.fit(Classifier(make_net()), DataLoader(data, batch_size=batch, shuffle=False))
    logs.cleanup()
    return timer


def measure(name, make_net, shape, batch, configs, rounds, steps, warmup, device="cpu") -> list[tuple]:
    data = TensorDataset(torch.randn(batch * 8, *shape), torch.randint(0, 10, (batch * 8,)))
    runs: dict[str, list[StepTimer]] = {config: [] for config in configs}
    for round_ in range(rounds):
        # Each round starts one configuration later: the order within a round moves the times by
        # several percent here (a run right after another of the same model is faster), so every
        # configuration takes every place in turn.
        shift = round_ % len(configs)
        for config in configs[shift:] + configs[:shift]:
            runs[config].append(run(make_net, data, batch, CONFIGS[config](), steps, warmup, device))
    plain = [timer.seconds_per_step for timer in runs["plain"]]
    rows = []
    for config, timers in runs.items():
        seconds = [timer.seconds_per_step for timer in timers]
        ratios = [mine / theirs for mine, theirs in zip(seconds, plain, strict=True)]
        estimates = [estimate for timer in timers for estimate in timer.estimates]
        rows.append(
            (
                name,
                config,
                1000 * statistics.fmean(seconds),
                statistics.fmean(seconds) / statistics.fmean(plain),
                (min(ratios), max(ratios)),
                statistics.fmean(estimates) if estimates else None,
                timers[-1].state_bytes,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=150, help="measured steps per run (the CNN: half)")
    parser.add_argument(
        "--warmup", type=int, default=60, help="steps before timing: the first 50-step window measures every batch"
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 50 steps, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 50
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rounds, steps, warmup = args.rounds, args.steps, args.warmup
    rows = []
    rows += measure("MLP 8x512, batch 256", lambda: mlp(8, 512), (512,), 256, list(CONFIGS), rounds, steps, warmup)
    cnn_configs = [
        "plain",
        "plain (again)",
        "naive .item() per layer",
        "everything, every batch (overhead_budget=None)",
        "everything (defaults)",
        "everything + histograms every 100 steps",
    ]
    rows += measure("CNN 4 conv, batch 128", cnn, (3, 32, 32), 128, cnn_configs, rounds, steps // 2, warmup)
    for depth in (8, 32, 128):
        rows += measure(
            f"MLP {depth}x128, batch 256",
            lambda depth=depth: mlp(depth, 128),
            (128,),
            256,
            ["plain", "everything (defaults)", "everything, every batch (overhead_budget=None)"],
            rounds,
            steps,
            warmup,
        )
    threads = torch.get_num_threads()
    print(f"\ntorch {torch.__version__}, Lightning {pl.__version__}, {threads} threads, {rounds} rounds")
    print(
        "| model | configuration | mean step (ms) | ratio to plain | per-round range | engine's estimate "
        "| engine state (bytes) |"
    )
    print("|---|---|---|---|---|---|---|")
    for model, config, milliseconds, ratio, (low, high), estimate, state in rows:
        reckoned = f"{estimate:.1%}" if estimate is not None else ""
        print(
            f"| {model} | {config} | {milliseconds:.2f} | {ratio:.3f} | {low:.3f}-{high:.3f} | {reckoned} | {state:,} |"
        )


if __name__ == "__main__":
    main()
