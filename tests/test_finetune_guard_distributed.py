"""FinetuneGuard under DDP (two CPU processes): every rank rolls back at the same step, to the same state."""

import json

import pytorch_lightning as pl
import torch
from conftest import tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actguard.callbacks.finetune_guard import SNAPSHOT_FILE, FinetuneGuard


class SpikesOnRankOne(pl.LightningModule):
    """A small regression whose loss is 100 times larger on rank 1 only, at steps 16 to 19.

    Rank 0 alone sees nothing wrong; the window's loss averaged across ranks spikes.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        return loss * 100 if self.global_rank == 1 and 16 <= self.global_step <= 19 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(10 + self.global_rank)
        inputs = torch.randn(160, 3, generator=generator)
        return DataLoader(TensorDataset(inputs, inputs.sum(1, keepdim=True)), batch_size=8)


class RecordPerRank(pl.Callback):
    def __init__(self, guard, directory):
        self.guard, self.directory = guard, directory

    def on_train_end(self, trainer, pl_module):
        record = {
            "events": [(event.step, event.action, event.evidence["restored_step"]) for event in self.guard.events],
            "weights": [value for tensor in pl_module.state_dict().values() for value in tensor.flatten().tolist()],
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_every_rank_rolls_back_at_the_same_step_to_the_snapshot_rank_zero_wrote(tmp_path):
    guard = FinetuneGuard(every_n_steps=5, overhead_budget=None, snapshot_to="disk", print_summary=False)
    trainer = tiny_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_steps=20,
        use_distributed_sampler=False,
        logger=False,
        callbacks=[guard, RecordPerRank(guard, tmp_path)],
    )
    trainer.fit(SpikesOnRankOne())  # the guard's warnings are raised in the spawned processes

    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0] == records[1]
    assert records[0]["events"] == [[20, "rollback", 10]]  # the snapshot refreshed at step 10, on disk
    assert records[0]["lr"] == 0.005
    assert (tmp_path / SNAPSHOT_FILE).is_file()
