import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class KnownDeadModel(pl.LightningModule):
    """A model whose activation statistics are known in advance.

    ``features``: a frozen Linear with zero weights and biases alternating +1/-1, then a ReLU, so
    exactly half of its 6 units are dead and its outputs are 1, 0, 1, 0, ... ``squash``: a Tanh
    fed ``100 * sign(x)``, so every output is saturated.
    """

    def __init__(self, fail_at_step: int | None = None):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].bias.copy_(torch.tensor([1.0, -1.0] * 3))
        self.features.requires_grad_(False)
        self.squash = nn.Tanh()
        self.head = nn.Linear(6 + 4, 1)
        self.fail_at_step = fail_at_step

    def forward(self, x):
        return self.head(torch.cat((self.features(x), self.squash(100 * x.sign())), dim=1))

    def training_step(self, batch, batch_idx):
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError("failure inside training_step")
        (x,) = batch
        return self(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_loss", self(x).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=8)


@pytest.fixture
def known_dead_model():
    torch.manual_seed(0)
    return KnownDeadModel()


def tiny_trainer(tmp_path, **kwargs):
    defaults = {
        "default_root_dir": tmp_path,
        "max_steps": 20,
        "log_every_n_steps": 5,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
