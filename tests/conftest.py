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


class KnownGradientModel(pl.LightningModule):
    """Two linear layers with known weights and loss ``sum(model(x))``.

    With x = c * (1, 1): the gradient of layer "net.1" is (c, 2c, 1) (norm^2 = 5c^2 + 1), that of
    layer "net.0" is ([[3c, 3c], [4c, 4c]], (3, 4)) (norm^2 = 50c^2 + 25). SGD with lr=0 keeps the
    weights, so every step's gradients are known.
    """

    def __init__(self, scales=(1.0,), lr=0.0, batch_size=1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        with torch.no_grad():
            self.net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
            self.net[0].bias.zero_()
            self.net[1].weight.copy_(torch.tensor([[3.0, 4.0]]))
            self.net[1].bias.fill_(0.5)
        self.scales, self.lr, self.batch_size = scales, lr, batch_size

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        inputs = torch.tensor(self.scales, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
        return DataLoader(TensorDataset(inputs), batch_size=self.batch_size)


def digits_loaders(batch_size=64):
    """scikit-learn's digits (shipped with the package), standardised, as a shuffled loader."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16
    inputs = (inputs - inputs.mean(0)) / (inputs.std(0) + 1e-6)
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(inputs, torch.tensor(digits.target))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


class DigitsMLP(pl.LightningModule):
    """An MLP of ``depth`` linear layers (64 wide) with ``activation`` between them."""

    def __init__(self, depth=3, activation=nn.ReLU, lr=0.1):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(64, 64), activation()]
        for _ in range(depth - 2):
            layers += [nn.Linear(64, 64), activation()]
        self.net = nn.Sequential(*layers, nn.Linear(64, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self.net(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
