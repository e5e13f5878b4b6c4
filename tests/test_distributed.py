"""Two CPU processes (gloo) whose batches differ: the logged numbers must be the reduced ones."""

import csv
import json

import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_trainer
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actguard import ActivationMonitor, DeadReLUGuard, GradientMonitor, LossPlateauGuard


def rank_inputs(rank, samples=16):
    """Unit 0 never fires, unit 2 always does, unit 1 fires on rank 1 only.

    Rank 0 alone would see two dead units of three; across both ranks one is dead.
    """
    inputs = torch.ones(samples, 3)
    inputs[:, 0] = -1.0
    inputs[:, 1] = 1.0 if rank == 1 else -1.0
    return inputs


class ReluOnInputs(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.head = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.head(self.act(batch[0])).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(rank_inputs(self.global_rank)), batch_size=4)


class RecordPerRank(pl.Callback):
    def __init__(self, monitor, directory):
        self.monitor, self.directory = monitor, directory

    def on_train_end(self, trainer, pl_module):
        snapshot = self.monitor.snapshot
        layer = snapshot.activations["act"]
        record = {
            "dead_units": layer.dead_units.tolist(),
            "zero_frac": layer.zero_frac,
            "head_grad_norm": snapshot.gradients.layers["head"].norm,
        }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_statistics_are_reduced_across_ranks_before_logging(tmp_path):
    monitor, gradients = ActivationMonitor(print_summary=False), GradientMonitor()
    logger = CSVLogger(tmp_path, name="ddp")
    trainer = tiny_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_steps=4,
        log_every_n_steps=2,
        use_distributed_sampler=False,
        logger=logger,
        callbacks=[monitor, gradients, RecordPerRank(monitor, tmp_path)],
    )
    trainer.fit(ReluOnInputs())

    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0] == records[1]
    assert records[0]["dead_units"] == [True, False, False]
    assert records[0]["zero_frac"] == pytest.approx(1 / 3 + 1 / 6)  # unit 0 everywhere, unit 1 on one rank of two
    # The head's gradient is the sum of relu(x) over a batch of 4 (and 4 for the bias): (0, 0, 4, 4) on
    # rank 0, (0, 4, 4, 4) on rank 1. DDP averages them to (0, 2, 4, 4), of norm 6.
    assert records[0]["head_grad_norm"] == pytest.approx(6.0)
    with open(tmp_path / "ddp" / "version_0" / "metrics.csv") as file:
        logged = [float(row["act_dead_frac/act"]) for row in csv.DictReader(file) if row.get("act_dead_frac/act")]
    assert logged == pytest.approx([1 / 3, 1 / 3])


class RankDependentLoss(ReluOnInputs):
    """Rank 1's loss jumps tenfold after the first window; rank 0's stays at 1.

    Across both ranks the mean loss goes from 1 to 5.5, over three times its best: divergence.
    Rank 0 alone sees nothing. Its ReLU sees two dead units of three (unit 1 fires on rank 1 only),
    above a threshold of 0.5 on its own, but across ranks only one of three is dead.
    """

    def training_step(self, batch, batch_idx):
        self.act(batch[0])
        jump = 10.0 if self.global_rank == 1 and self.global_step >= 2 else 1.0
        return sum(parameter.sum() for parameter in self.head.parameters()) * 0 + jump


class RecordLearningRate(pl.Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        swapper = next(callback for callback in trainer.callbacks if "swap" in getattr(callback, "actions", ()))
        record = {
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "global_step": trainer.global_step,
            "activation": type(pl_module.act).__name__,
            "swapped_at": [event.step for event in swapper.events if event.action == "swap"],
        }
        (self.directory / f"lr{trainer.global_rank}.json").write_text(json.dumps(record))


def test_guards_decide_on_statistics_reduced_across_ranks(tmp_path):
    plateau = LossPlateauGuard(action="reduce_lr", smoothing=0.0, every_n_steps=2, cooldown=100, print_summary=False)
    dead = DeadReLUGuard(threshold=0.5, action="stop", every_n_steps=2, print_summary=False)
    # Unit 0 is dead on both ranks: 1/3 dead across ranks, above 0.3, so both swap ReLU -> ELU.
    swap = DeadReLUGuard(threshold=0.3, hysteresis=0.0, action="swap", every_n_steps=2, print_summary=False)
    trainer = tiny_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_steps=4,
        use_distributed_sampler=False,
        logger=False,
        callbacks=[plateau, dead, swap, RecordLearningRate(tmp_path)],
    )
    trainer.fit(RankDependentLoss())  # the guards' warnings are raised in the spawned processes

    # Both ranks lowered the rate at step 4 (divergence of the mean loss), and neither stopped although
    # rank 0's own dead fraction (2/3) is above the dead-unit guard's threshold.
    records = [json.loads((tmp_path / f"lr{rank}.json").read_text()) for rank in (0, 1)]
    expected = {"lr": 0.005, "global_step": 4, "activation": "ELU", "swapped_at": [2]}
    assert records[0] == records[1] == expected
