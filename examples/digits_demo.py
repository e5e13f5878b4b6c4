"""ActivationMonitor on a real (tiny) training run: an MLP learning scikit-learn's 8x8 digits.

The model mixes ReLU layers with one Tanh layer. ActivationMonitor measures every activation
on every training batch, logs per-layer statistics (dead units, zero and saturated shares,
input and output mean/std, histograms) to TensorBoard and prints a per-layer table when
training ends; GradientMonitor does the same for each layer's gradient norm and update ratio.
DeadReLUGuard and LossPlateauGuard watch the same numbers and warn, with a diagnosis, when
most units of a layer die or the loss stalls or diverges.

Run from the repository root (CPU, well under a minute; the dataset ships with scikit-learn):

    python examples/digits_demo.py               # a healthy run
    python examples/digits_demo.py --unhealthy   # raw 0..16 pixels and a far too high learning rate

The unhealthy run shows what the table is for: the Tanh layer saturates and ReLU units die.
"""

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actguard import ActivationMonitor, DeadReLUGuard, GradientMonitor, LossPlateauGuard

UNHEALTHY_LR = 0.05  # far too high for Adam on this problem


class DigitsDataModule(pl.LightningDataModule):
    """The 1797 digits split 1437/360 (stratified); pixels scaled to [0, 1] and standardised."""

    def __init__(self, seed: int = 0, normalise: bool = True, batch_size: int = 64) -> None:
        super().__init__()
        self.seed, self.normalise, self.batch_size = seed, normalise, batch_size

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x_train, x_val, y_train, y_val = train_test_split(
            digits.data, digits.target, test_size=360, stratify=digits.target, random_state=self.seed
        )
        x_train = torch.tensor(x_train, dtype=torch.float32)
        x_val = torch.tensor(x_val, dtype=torch.float32)
        if self.normalise:  # otherwise the raw 0..16 pixel values go straight in
            x_train, x_val = x_train / 16, x_val / 16
            mean, std = x_train.mean(0), x_train.std(0)
            std[std == 0] = 1.0  # a few border pixels are always blank
            x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
        self.train_set = TensorDataset(x_train, torch.tensor(y_train))
        self.val_set = TensorDataset(x_val, torch.tensor(y_val))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=0)


class DigitsMLP(pl.LightningModule):
    """64 -> 128 (Tanh) -> 128 (ReLU) -> 64 (ReLU) -> 10."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, 128),
            nn.Tanh(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(dim=1) == y).float().mean()
        self.log("val_acc", accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument(
        "--logdir", default="actguard_demo_logs", help="TensorBoard log directory (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the split and the model (default: 0)")
    parser.add_argument(
        "--unhealthy",
        action="store_true",
        help=f"deliberately break training: feed raw 0..16 pixels (no scaling or standardisation) and use "
        f"lr={UNHEALTHY_LR}, far too high for Adam (overrides --lr); expect a saturated Tanh and dead ReLU units",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    pl.seed_everything(args.seed)
    lr = UNHEALTHY_LR if args.unhealthy else args.lr
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        log_every_n_steps=10,  # 23 steps an epoch: several monitor windows even in a short run
        callbacks=[
            ActivationMonitor(histogram_every_n_steps=50),
            GradientMonitor(histogram_every_n_steps=50),
            # Warn only, so the demo shows what the guards see without changing the run.
            DeadReLUGuard(action="warn"),
            LossPlateauGuard(patience=100, action="warn"),
        ],
        logger=TensorBoardLogger(args.logdir, name="digits"),
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(DigitsMLP(lr=lr), datamodule=DigitsDataModule(seed=args.seed, normalise=not args.unhealthy))
    print(f"Final validation accuracy: {trainer.callback_metrics['val_acc']:.3f}")
    print(f"Look at the logs with: tensorboard --logdir {Path(args.logdir).resolve()}")


if __name__ == "__main__":
    main()
