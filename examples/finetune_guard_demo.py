"""FinetuneGuard on a real (tiny) fine-tuning run: the same far too high learning rate, with and without it.

A small ReLU network is pretrained on 600 of scikit-learn's 8x8 digits, then fine-tuned on 797
others with plain SGD. At lr=5 the fine-tuning wrecks it: held-out accuracy falls to chance. With
FinetuneGuard the run rolls back to the pretrained weights each time a window's loss spikes,
halving the learning rate, until a rate that does no harm is found; the model ends at least as
good as it started. The 400 held-out digits are never trained on.

Run from the repository root (CPU, a few seconds; the dataset ships with scikit-learn):

    python examples/finetune_guard_demo.py              # lr=5: far too high
    python examples/finetune_guard_demo.py --lr 0.05    # a sane rate: the guard never acts
"""

import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actguard import FinetuneGuard


def split_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Pixels standardised with the pretraining part's statistics, and the index of each part."""
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    parts = {"held_out": order[:400], "pretrain": order[400:1000], "finetune": order[1000:]}
    pretrain = inputs[parts["pretrain"]]
    inputs = (inputs - pretrain.mean(0)) / (pretrain.std(0) + 0.1)
    return inputs, torch.tensor(digits.target), parts


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def pretrain(inputs: torch.Tensor, targets: torch.Tensor, part: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Stands for the pretrained checkpoint a real fine-tuning run would load: 300 SGD steps."""
    torch.manual_seed(seed)
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(300):
        batch = part[torch.randint(len(part), (32,))]
        loss = nn.functional.cross_entropy(net(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.state_dict()


class Finetune(pl.LightningModule):
    """The pretrained network, fine-tuned with SGD."""

    def __init__(self, weights: dict[str, torch.Tensor], lr: float) -> None:
        super().__init__()
        self.net = mlp()
        self.net.load_state_dict(weights)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def accuracy(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(inputs).argmax(1) == targets).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lr", type=float, default=5.0, help="fine-tuning SGD learning rate (default: 5, far too high)"
    )
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps (default: 150)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--logdir", default="finetune_guard_demo_logs", help="log directory (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a network this small runs fastest on one thread

    inputs, targets, parts = split_digits(args.seed)
    weights = pretrain(inputs, targets, parts["pretrain"], args.seed)
    held_out = inputs[parts["held_out"]], targets[parts["held_out"]]
    finetune_set = TensorDataset(inputs[parts["finetune"]], targets[parts["finetune"]])

    def fine_tune(guard: FinetuneGuard | None) -> Finetune:
        pl.seed_everything(args.seed, verbose=False)
        model = Finetune(weights, args.lr)
        trainer = pl.Trainer(
            max_steps=args.steps,
            callbacks=[guard] if guard else [],
            logger=TensorBoardLogger(args.logdir, name="guarded") if guard else False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=5,
        )
        trainer.fit(model, DataLoader(finetune_set, batch_size=32, shuffle=True))
        return model

    plain = fine_tune(None)
    # Windows of 5 steps: on this small run the guard judges often; real runs use the default (50).
    guard = FinetuneGuard(every_n_steps=5)
    guarded = fine_tune(guard)

    pretrained_net = mlp()
    pretrained_net.load_state_dict(weights)
    rows = [
        ("pretrained model", accuracy(pretrained_net, *held_out)),
        (f"fine-tuned at lr={args.lr:g}, no guard", accuracy(plain.net, *held_out)),
        (f"fine-tuned at lr={args.lr:g}, FinetuneGuard", accuracy(guarded.net, *held_out)),
    ]
    print(f"\nHeld-out accuracy ({len(held_out[1])} digits never trained on)")
    for name, value in rows:
        print(f"  {name:<42} {value:6.1%}")
    final_lr = guarded.trainer.optimizers[0].param_groups[0]["lr"]
    print(f"\nFinetuneGuard: {guard.rollbacks} rollback(s), learning rate now {final_lr:g}; events in {args.logdir}")


if __name__ == "__main__":
    main()
