"""The package reads values back to the host only when a window closes, a bounded number of times.

On a GPU every ``.item()``, ``.tolist()``, ``.cpu()`` or truth test of a tensor stalls the
device until its queue drains. A TorchFunctionMode records every such call made from the
package's own code, step by step, in a real training run with every callback attached.
"""

import os
import sys
import warnings
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from conftest import DigitsMLP, digits_loaders, tiny_trainer
from pytorch_lightning.loggers import TensorBoardLogger
from torch.overrides import TorchFunctionMode

import lightning_actguard
from lightning_actguard import ActivationMonitor, DeadReLUGuard, GradientMonitor, LossPlateauGuard

PACKAGE_DIR = os.path.dirname(lightning_actguard.__file__)
READ_BACKS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}


class RecordReadBacks(TorchFunctionMode):
    """Counts read-backs whose caller chain passes through the package."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READ_BACKS:
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_filename.startswith(PACKAGE_DIR):
                    self.calls[func.__name__] += 1
                    break
                frame = frame.f_back
        return func(*args, **(kwargs or {}))


class StartRecording(pl.Callback):
    """First in the callback list: its hooks run before the package's."""

    def __init__(self):
        self.per_step = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode = RecordReadBacks()
        self.mode.__enter__()


class StopRecording(pl.Callback):
    """Last in the callback list: its hooks run after the package's."""

    def __init__(self, start):
        self.start = start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.start.mode.__exit__(None, None, None)
        self.start.per_step.append((trainer.global_step, sum(self.start.mode.calls.values())))


def read_backs_per_step(tmp_path, depth, logger):
    start = StartRecording()
    callbacks = [
        start,
        ActivationMonitor(histogram_every_n_steps=10, print_summary=False),
        GradientMonitor(histogram_every_n_steps=10, print_summary=False),
        DeadReLUGuard(print_summary=False),
        LossPlateauGuard(patience=5, print_summary=False),
        StopRecording(start),
    ]
    if logger:
        logger = TensorBoardLogger(tmp_path / f"depth{depth}")
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=callbacks, max_steps=20, log_every_n_steps=5)
    trainer.fit(DigitsMLP(depth=depth, lr=0.05), digits_loaders())
    return dict(start.per_step)


@pytest.mark.filterwarnings("ignore::lightning_actguard.ActGuardWarning")
@pytest.mark.parametrize("logger", [False, True], ids=["no logger", "tensorboard with histograms"])
def test_no_read_back_off_the_window_ends_and_a_bounded_number_on_them(tmp_path, logger):
    shallow = read_backs_per_step(tmp_path, depth=3, logger=logger)
    deep = read_backs_per_step(tmp_path, depth=12, logger=logger)

    window_ends = {5, 10, 15, 20}
    assert {step: count for step, count in shallow.items() if step not in window_ends} == dict.fromkeys(
        set(shallow) - window_ends, 0
    )
    assert {step: count for step, count in deep.items() if step not in window_ends} == dict.fromkeys(
        set(deep) - window_ends, 0
    )
    # One copy of the whole window to the host and one conversion to Python numbers, whatever the depth.
    assert [shallow[step] for step in sorted(window_ends)] == [2, 2, 2, 2]
    assert [deep[step] for step in sorted(window_ends)] == [2, 2, 2, 2]


class StartFailingOnCudaSync(pl.Callback):
    """First in the callback list: from its hook on, a CUDA host synchronisation raises.

    Not on the first step (CUDA's libraries set themselves up) nor on the steps that close a
    window (they read it back by design). The batch is already on the device here.
    """

    def __init__(self, every_n_steps):
        self.every_n_steps = every_n_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        closes_window = (trainer.global_step + 1) % self.every_n_steps == 0
        torch.cuda.set_sync_debug_mode(0 if closes_window or trainer.global_step == 0 else "error")


class StopFailingOnCudaSync(pl.Callback):
    """Last in the callback list: its hooks run after the package's."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.py runs it)")
def test_no_cuda_sync_off_the_window_ends(tmp_path):
    callbacks = [
        StartFailingOnCudaSync(every_n_steps=5),
        ActivationMonitor(histogram_every_n_steps=10, print_summary=False),
        GradientMonitor(histogram_every_n_steps=10, print_summary=False),
        DeadReLUGuard(print_summary=False),
        LossPlateauGuard(patience=5, print_summary=False),
        StopFailingOnCudaSync(),
    ]
    trainer = tiny_trainer(
        tmp_path, logger=TensorBoardLogger(tmp_path), callbacks=callbacks, accelerator="cuda", max_steps=20
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(DigitsMLP(depth=12, lr=0.05), digits_loaders())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.global_step == 20
    # The package turns a failure inside its hooks into a warning, so a sync error would surface here.
    assert [str(w.message) for w in caught if "failed" in str(w.message) or "synchroniz" in str(w.message)] == []
