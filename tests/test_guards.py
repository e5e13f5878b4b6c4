"""Guards in real training runs: they act on the run the trainer holds, and leave records of it."""

import csv
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import DigitsMLP, KnownDeadModel, digits_loaders, tiny_trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_actguard import ActGuardWarning, DeadReLUGuard, GradientMonitor, LossPlateauGuard
from lightning_actguard.events import EVENT_LOG_NAME


class DigitsWithCosine(DigitsMLP):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def cosine_lr(lr, steps, t_max=200):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def test_a_learning_rate_that_kills_relu_units_is_lowered_and_stays_lowered_under_cosine(tmp_path):
    guard = DeadReLUGuard(threshold=0.9, action="reduce_lr", every_n_steps=10, cooldown=1000)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[guard], max_steps=60)
    with pytest.warns(ActGuardWarning, match=r"DeadReLUGuard at step \d+: dead units above 90%"):
        trainer.fit(DigitsWithCosine(depth=4, lr=5.0), digits_loaders())

    assert [event.action for event in guard.events] == ["reduce_lr"]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * cosine_lr(5.0, 60))
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.5 * cosine_lr(5.0, 60))


def test_no_false_alarm_at_a_sane_learning_rate(tmp_path):
    dead, plateau = DeadReLUGuard(action="stop", every_n_steps=10), LossPlateauGuard(patience=30, action="stop")
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[dead, plateau], max_steps=60)
    trainer.fit(DigitsMLP(depth=4, lr=0.05), digits_loaders())  # any ActGuardWarning would fail the test

    assert (dead.events, plateau.events, trainer.global_step) == ([], [], 60)


def test_a_stalled_deep_sigmoid_mlp_is_diagnosed_with_vanished_gradients(tmp_path):
    guard = LossPlateauGuard(patience=40, min_delta=0.01, every_n_steps=10, action="warn")
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[guard], max_steps=80)
    with pytest.warns(ActGuardWarning, match="no improvement of the loss for"):
        trainer.fit(DigitsMLP(depth=16, activation=nn.Sigmoid, lr=0.1), digits_loaders())

    (event,) = guard.events
    assert event.evidence["steps_without_improvement"] >= 40
    assert "gradients have vanished: the first layer 'net.0' gets" in event.diagnosis


class LossTurnsNaN(KnownDeadModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step == 11 else loss


def test_a_nan_loss_triggers_at_the_end_of_its_window_and_stop_leaves_a_loadable_checkpoint(tmp_path):
    guard = LossPlateauGuard(action="stop", every_n_steps=5)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(
        tmp_path, logger=False, callbacks=[guard, checkpoints], max_steps=40, enable_checkpointing=True
    )
    with pytest.warns(ActGuardWarning, match=r"the loss was NaN or infinite at 4 step\(s\)"):
        trainer.fit(LossTurnsNaN())

    assert trainer.global_step == 15  # NaN from step 12 on (it reached the weights); its window closed at 15
    assert [(event.step, event.action, event.severity) for event in guard.events] == [(15, "stop", "stop")]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 15
    assert checkpoint["callbacks"][guard.state_key]["events"][0]["action"] == "stop"


def test_every_event_is_logged_written_and_summarised(tmp_path, known_dead_model, capsys):
    logger = TensorBoardLogger(tmp_path, name="run")
    guard = DeadReLUGuard(threshold=0.4, action="warn", every_n_steps=5)
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[guard], max_steps=10)
    with pytest.warns(ActGuardWarning, match=r"'features.1' 50%"):
        trainer.fit(known_dead_model)

    with open(f"{logger.log_dir}/{EVENT_LOG_NAME}") as file:
        (line,) = [json.loads(line) for line in file]
    assert (line["step"], line["guard"], line["action"], line["severity"]) == (5, "DeadReLUGuard", "warn", "warning")
    assert line["evidence"]["dead_frac"] == {"features.1": 0.5}
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("guard_event/DeadReLUGuard")] == [(4, 1.0)]
    (text,) = events.Tensors("guard_events/DeadReLUGuard/text_summary")
    assert "dead units above 40%" in text.tensor_proto.string_val[0].decode()
    assert "DeadReLUGuard: 1 event(s)" in capsys.readouterr().out


class WithScheduler(KnownDeadModel):
    """KnownDeadModel (half its units dead) with an SGD optimizer and one of the common schedulers."""

    def __init__(self, scheduler_name):
        super().__init__()
        self.scheduler_name = scheduler_name

    def training_step(self, batch, batch_idx):
        self.log("constant", 1.0)  # ReduceLROnPlateau then reduces on a fixed rhythm, whatever the lr does
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.head.parameters(), lr=0.1)
        make = {
            "StepLR": lambda: torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7),
            "CosineAnnealingLR": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30),
            "OneCycleLR": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=40),
            "LambdaLR": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step)),
            "LinearLR": lambda: torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0, end_factor=0.1, total_iters=20
            ),
            "ReduceLROnPlateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=1, factor=0.8),
        }
        config = {"scheduler": make[self.scheduler_name](), "interval": "step", "monitor": "constant"}
        return {"optimizer": optimizer, "lr_scheduler": config}


def logged_learning_rates(tmp_path, scheduler_name, guard):
    logger = CSVLogger(tmp_path, name=scheduler_name + ("-guarded" if guard else ""))
    callbacks = [LearningRateMonitor(logging_interval="step"), *([guard] if guard else [])]
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=callbacks, max_steps=25, log_every_n_steps=1)
    trainer.fit(WithScheduler(scheduler_name))
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rates = {int(row["step"]): float(row["lr-SGD"]) for row in csv.DictReader(file) if row.get("lr-SGD")}
    return rates, trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize(
    "scheduler_name", ["StepLR", "CosineAnnealingLR", "OneCycleLR", "LambdaLR", "LinearLR", "ReduceLROnPlateau"]
)
def test_a_lowered_rate_stays_lowered_under_the_scheduler_and_learning_rate_monitor_shows_it(tmp_path, scheduler_name):
    reference, reference_final = logged_learning_rates(tmp_path, scheduler_name, guard=None)
    guard = DeadReLUGuard(threshold=0.4, action="reduce_lr", every_n_steps=5, cooldown=10**6)
    with pytest.warns(ActGuardWarning, match="Action: lowered the learning rate"):
        guarded, guarded_final = logged_learning_rates(tmp_path, scheduler_name, guard)

    # The guard acts at the end of step 5; LearningRateMonitor logs the rate each batch starts with.
    assert [guarded[step] for step in range(5)] == [reference[step] for step in range(5)]
    assert [guarded[step] for step in range(5, 25)] == pytest.approx([0.5 * reference[step] for step in range(5, 25)])
    assert guarded_final == pytest.approx(0.5 * reference_final)


class RecordEvents(pl.Callback):
    def __init__(self, guard):
        self.guard = guard

    def on_train_end(self, trainer, pl_module):
        self.events = [(event.step, event.action) for event in self.guard.events]


def ladder_guard():
    return DeadReLUGuard(threshold=0.4, action=("warn", "reduce_lr", "stop"), every_n_steps=5, cooldown=5)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resuming_from_a_mid_run_checkpoint_continues_the_ladder(tmp_path, known_dead_model):
    uninterrupted = ladder_guard()
    with pytest.warns(ActGuardWarning):
        tiny_trainer(tmp_path / "a", logger=False, callbacks=[uninterrupted], max_steps=40).fit(known_dead_model)
    assert [(event.step, event.action) for event in uninterrupted.events] == [
        (5, "warn"),
        (10, "reduce_lr"),
        (15, "stop"),
    ]

    first = ladder_guard()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    trainer = tiny_trainer(
        tmp_path / "b", logger=False, callbacks=[first, checkpoints], max_steps=10, enable_checkpointing=True
    )
    with pytest.warns(ActGuardWarning):
        trainer.fit(KnownDeadModel())
    (path,) = (tmp_path / "ckpt").glob("*step=10.ckpt")

    resumed = ladder_guard()
    trainer = tiny_trainer(tmp_path / "c", logger=False, callbacks=[resumed], max_steps=40)
    with pytest.warns(ActGuardWarning, match="Action: stopped training at step 15"):
        trainer.fit(KnownDeadModel(), ckpt_path=path)
    assert [(event.step, event.action) for event in resumed.events] == [
        (5, "warn"),
        (10, "reduce_lr"),
        (15, "stop"),
    ]
    assert trainer.global_step == 15
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.005)


def test_a_guard_and_a_monitor_share_the_engine_and_a_missing_metric_is_named_once(tmp_path, known_dead_model):
    guard = LossPlateauGuard(monitor="val_loss_typo", every_n_steps=5)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[GradientMonitor(every_n_steps=5), guard], max_steps=15)
    with pytest.warns(ActGuardWarning, match=r"watches 'val_loss_typo', which was never logged in training") as record:
        trainer.fit(known_dead_model)
    assert len([warning for warning in record if warning.category is ActGuardWarning]) == 1
