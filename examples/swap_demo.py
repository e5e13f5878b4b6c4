"""A deep sigmoid MLP that cannot learn, and LossPlateauGuard swapping its activations so that it does.

Twelve sigmoid layers under plain SGD: each sigmoid passes back at most a quarter of the
gradient it receives, so the first layers get almost nothing and the loss sits at ln(10) = 2.30.
The same run is made twice, from the same seed: once with the guard only warning, once with
``action="swap"``, which replaces every sigmoid the diagnosis names by SELU (the default, chosen
by the measurement in the README) and checks, some steps later, that the loss fell.

Run from the repository root (CPU, about half a minute):

    python examples/swap_demo.py
"""

import argparse

import pytorch_lightning as pl
import torch
from digits_demo import DigitsDataModule
from torch import nn

from lightning_actguard import LossPlateauGuard


class DeepSigmoidMLP(pl.LightningModule):
    """``depth`` hidden layers of 64 sigmoid units between the 64 pixels and the 10 classes."""

    def __init__(self, depth: int = 12, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(64, 64), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(64, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))
        self.log("val_acc", (self.net(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def train(action: str, args: argparse.Namespace) -> tuple[dict[str, float], LossPlateauGuard]:
    pl.seed_everything(args.seed, verbose=False)
    guard = LossPlateauGuard(patience=50, min_delta=0.01, every_n_steps=10, action=action, print_summary=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[guard],
        logger=False,
        default_root_dir=f"actguard_demo_logs/swap_demo/{action}",  # where the guard's event log goes
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
    )
    trainer.fit(DeepSigmoidMLP(depth=args.depth), datamodule=DigitsDataModule(seed=args.seed))
    return {name: float(value) for name, value in trainer.callback_metrics.items()}, guard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12, help="hidden sigmoid layers (default: 12)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of 23 steps (default: 15)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()

    results = {action: train(action, args) for action in ("warn", "swap")}
    print(f"\n{'guard action':<14}{'val loss':>10}{'val accuracy':>14}")
    for action, (metrics, _) in results.items():
        print(f"{action:<14}{metrics['val_loss']:>10.3f}{metrics['val_acc']:>14.3f}")
    print("\nWhat the swapping guard did:")
    for event in results["swap"][1].events:
        print(f"  step {event.step}: {event.condition}\n    -> {event.outcome}")


if __name__ == "__main__":
    main()
