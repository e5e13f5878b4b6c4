"""FinetuneGuard in real fine-tuning runs: a pretrained digits MLP, a far too high learning rate, and the guard."""

import copy
import csv
from dataclasses import dataclass

import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_actguard import ActGuardWarning
from lightning_actguard.callbacks.finetune_guard import LAST_HEALTHY_CHECKPOINT, SNAPSHOT_FILE, FinetuneGuard
from lightning_actguard.rollback import RollbackPoint

FAR_TOO_HIGH = 5.0  # SGD on this MLP: held-out accuracy falls to chance within 150 steps


@dataclass(frozen=True)
class Digits:
    inputs: torch.Tensor
    targets: torch.Tensor
    held_out: torch.Tensor
    pretrain: torch.Tensor
    finetune: torch.Tensor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and does not slow to a crawl when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits: 400 held out, 600 to pretrain on, the other 797 to fine-tune on."""
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    held_out, pretrain, finetune = order[:400], order[400:1000], order[1000:]
    inputs = (inputs - inputs[pretrain].mean(0)) / (inputs[pretrain].std(0) + 0.1)
    return Digits(inputs, torch.tensor(data.target), held_out, pretrain, finetune)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def pretrained(digits):
    """The MLP's weights after 300 plain SGD steps on the pretraining part (about 96% held out)."""
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(300):
        batch = digits.pretrain[torch.randint(len(digits.pretrain), (32,), generator=generator)]
        loss = nn.functional.cross_entropy(net(digits.inputs[batch]), digits.targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: tensor.clone() for name, tensor in net.state_dict().items()}


def accuracy(net, digits):
    with torch.no_grad():
        predicted = net(digits.inputs[digits.held_out]).argmax(1)
    return (predicted == digits.targets[digits.held_out]).float().mean().item()


def loader(digits, part=None):
    part = digits.finetune if part is None else part
    dataset = TensorDataset(digits.inputs[part], digits.targets[part])
    return DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(2))


class Finetune(pl.LightningModule):
    """The pretrained MLP, fine-tuned with SGD or Adam, optionally under StepLR."""

    def __init__(self, weights, lr, optimizer="sgd", step_lr=False):
        super().__init__()
        self.net = mlp()
        self.net.load_state_dict(weights)
        self.lr, self.optimizer_name, self.step_lr = lr, optimizer, step_lr

    def forward(self, inputs):
        return self.net(inputs)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return nn.functional.cross_entropy(self(inputs), targets)

    def configure_optimizers(self):
        make = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.SGD
        optimizer = make(self.parameters(), lr=self.lr)
        if not self.step_lr:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def guard(**kwargs):
    """Exact per-step statistics (no sampling), windows of 5 steps, no table printed."""
    return FinetuneGuard(**{"every_n_steps": 5, "overhead_budget": None, "print_summary": False, **kwargs})


def pretrained_net(weights):
    net = mlp()
    net.load_state_dict(weights)
    return net


# ---------------------------------------------------------------------- the required runs


def test_a_far_too_high_learning_rate_wrecks_the_model_and_the_guard_keeps_it(tmp_path, digits, pretrained):
    plain = Finetune(pretrained, lr=FAR_TOO_HIGH)
    tiny_trainer(tmp_path / "plain", logger=False, max_steps=150).fit(plain, loader(digits))

    guarded, finetune_guard = Finetune(pretrained, lr=FAR_TOO_HIGH), guard()
    trainer = tiny_trainer(tmp_path / "guarded", logger=False, max_steps=150, callbacks=[finetune_guard])
    with pytest.warns(ActGuardWarning, match="Action: restored the weights, optimizer and scheduler state of step 0"):
        trainer.fit(guarded, loader(digits))

    before = accuracy(pretrained_net(pretrained), digits)
    assert before > 0.9
    assert accuracy(plain.net, digits) < 0.3
    assert accuracy(guarded.net, digits) >= before - 0.03
    actions = [event.action for event in finetune_guard.events]
    assert actions == ["rollback"] * finetune_guard.rollbacks
    assert finetune_guard.rollbacks >= 1
    # Each rollback halved the rate, and nothing raised it since.
    rollbacks = finetune_guard.rollbacks
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(FAR_TOO_HIGH * 0.5**rollbacks)


def test_a_sane_learning_rate_triggers_nothing_and_the_snapshot_follows_the_run(
    tmp_path, digits, pretrained, monkeypatch
):
    captured = []
    capture = RollbackPoint.capture

    def record(self, step, *args):
        captured.append(step)
        return capture(self, step, *args)

    monkeypatch.setattr(RollbackPoint, "capture", record)
    finetune_guard = guard()
    model = Finetune(pretrained, lr=0.05)
    trainer = tiny_trainer(tmp_path, logger=False, max_steps=100, callbacks=[finetune_guard])
    trainer.fit(model, loader(digits))  # an ActGuardWarning would fail the test

    assert (finetune_guard.events, finetune_guard.rollbacks) == ([], 0)
    # Refreshed after every two healthy windows (10 steps), before the next batch's update.
    assert captured == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert accuracy(model.net, digits) >= accuracy(pretrained_net(pretrained), digits) - 0.02


class RecordStates(pl.Callback):
    """Keeps a copy of the training state at every batch's start, before its forward pass and update."""

    def __init__(self):
        self.states = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.states[trainer.global_step] = copy.deepcopy(
            (pl_module.state_dict(), trainer.optimizers[0].state_dict(), scheduler.state_dict())
        )


class RateJumpsAtStep42(Finetune):
    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 42:  # a schedule gone wrong: 300 times the rate, mid-window
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] *= 300


def test_a_rollback_restores_weights_optimizer_and_scheduler_state_exactly(tmp_path, digits, pretrained):
    finetune_guard, record = guard(), RecordStates()
    model = RateJumpsAtStep42(pretrained, lr=1e-3, optimizer="adam", step_lr=True)
    trainer = tiny_trainer(tmp_path, logger=False, max_steps=45, callbacks=[finetune_guard, record])
    with pytest.warns(ActGuardWarning, match="the loss spiked"):
        trainer.fit(model, loader(digits))

    (event,) = finetune_guard.events
    assert (event.step, event.action, event.evidence["restored_step"]) == (45, "rollback", 40)
    weights, optimizer_state, scheduler_state = record.states[40]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name])
    optimizer = trainer.optimizers[0]
    saved = optimizer_state["state"]
    assert [saved[index]["step"] for index in saved] == [torch.tensor(40.0)] * len(saved)
    for index, param in enumerate(model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[param][key], saved[index][key])
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert (scheduler.last_epoch, scheduler._step_count) == (40, scheduler_state["_step_count"])
    assert scheduler.base_lrs == [0.5 * rate for rate in scheduler_state["base_lrs"]]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * optimizer_state["param_groups"][0]["lr"])


KILLED = [3, 10, 20, 33, 50]


class KillsUnitsAtStep7(Finetune):
    """At step 7 five units of the first ReLU die: zero incoming weights, bias -100. SGD never brings them back."""

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 7:
            with torch.no_grad():
                self.net[0].weight[KILLED] = 0.0
                self.net[0].bias[KILLED] = -100.0


def test_units_that_die_are_revived_and_fire_again(tmp_path, digits, pretrained):
    finetune_guard = guard(revive=True)
    model = KillsUnitsAtStep7(pretrained, lr=0.05)
    trainer = tiny_trainer(tmp_path, logger=False, max_steps=20, callbacks=[finetune_guard])
    with pytest.warns(ActGuardWarning, match=r"re-initialised the incoming weights and bias of units"):
        trainer.fit(model, loader(digits))

    assert finetune_guard.baseline.alive_units["net.1"][KILLED].all()
    (event,) = finetune_guard.events
    # Window 10 still saw them fire (steps 5 and 6); window 15 found them dead: 5 of 64, under the margin.
    assert (event.step, event.action, event.evidence["layer"], event.evidence["units"]) == (
        15,
        "revive",
        "net.0",
        KILLED,
    )
    assert finetune_guard.revivals == len(KILLED)
    last_window = finetune_guard.snapshot.activations["net.1"]
    assert last_window.dead_units[KILLED].tolist() == [False] * len(KILLED)
    assert (model.net[0].bias[KILLED] > -1).all()


# ---------------------------------------------------------------------- stopping, checkpoints


def test_rollbacks_without_recovery_stop_with_the_last_healthy_weights_in_place_and_on_disk(
    tmp_path, digits, pretrained
):
    finetune_guard = guard(max_rollbacks=2)
    model = Finetune(pretrained, lr=0.5, optimizer="adam")  # far too high for Adam
    trainer = tiny_trainer(tmp_path, logger=False, max_steps=100, callbacks=[finetune_guard])
    with pytest.warns(ActGuardWarning) as record:
        trainer.fit(model, loader(digits))

    assert "2 rollback(s) without recovery: restored the last healthy state (step 0)" in str(record[-1].message)

    assert [(event.step, event.action) for event in finetune_guard.events] == [
        (5, "rollback"),
        (10, "rollback"),
        (15, "stop"),
    ]
    assert trainer.global_step == 15
    for name, tensor in model.net.state_dict().items():
        assert torch.equal(tensor, pretrained[name])
    checkpoint = torch.load(tmp_path / LAST_HEALTHY_CHECKPOINT, weights_only=False)
    for name, tensor in pretrained.items():
        assert torch.equal(checkpoint["state_dict"][f"net.{name}"], tensor)
    assert checkpoint["callbacks"][finetune_guard.state_key]["events"][-1]["action"] == "stop"
    assert checkpoint["optimizer_states"][0]["state"] == {}  # Adam before its first step
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.5 * 0.5**2)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_guard_state_survives_a_checkpoint_and_drift_is_still_measured_from_the_pretrained_weights(
    tmp_path, digits, pretrained
):
    first = guard()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    trainer = tiny_trainer(
        tmp_path / "a", logger=False, max_steps=20, callbacks=[first, checkpoints], enable_checkpointing=True
    )
    with pytest.warns(ActGuardWarning):
        trainer.fit(Finetune(pretrained, lr=FAR_TOO_HIGH), loader(digits))
    (path,) = (tmp_path / "ckpt").glob("*step=20.ckpt")

    resumed = guard()
    model = Finetune(pretrained, lr=FAR_TOO_HIGH)
    with torch.no_grad():  # the resumed weights come from the checkpoint, not from here
        model.net[0].weight.add_(1.0)
    trainer = tiny_trainer(tmp_path / "b", logger=False, max_steps=30, callbacks=[resumed])
    trainer.fit(model, loader(digits), ckpt_path=path)

    assert resumed.events == first.events
    assert resumed.rollbacks == first.rollbacks >= 1
    assert resumed.baseline.dead_frac == first.baseline.dead_frac
    assert resumed.baseline.loss == first.baseline.loss
    for layer in ("net.0", "net.2", "net.4"):
        now = torch.cat([model.net.get_submodule(layer[4:]).get_parameter(p).flatten() for p in ("weight", "bias")])
        start = torch.cat([pretrained[f"{layer[4:]}.{p}"].flatten() for p in ("weight", "bias")])
        assert resumed.drift.layers[layer] == pytest.approx(((now - start).norm() / start.norm()).item(), rel=1e-5)


def test_a_snapshot_on_disk_gives_the_same_run_as_one_in_memory(tmp_path, digits, pretrained):
    runs = {}
    for where in ("memory", "disk"):
        finetune_guard = guard(snapshot_to=where)
        model = Finetune(pretrained, lr=FAR_TOO_HIGH)
        trainer = tiny_trainer(tmp_path / where, logger=False, max_steps=40, callbacks=[finetune_guard])
        with pytest.warns(ActGuardWarning):
            trainer.fit(model, loader(digits))
        runs[where] = ([(event.step, event.outcome) for event in finetune_guard.events], model.net.state_dict())

    assert runs["disk"][0] == runs["memory"][0]
    for name, tensor in runs["memory"][1].items():
        assert torch.equal(runs["disk"][1][name], tensor)
    assert (tmp_path / "disk" / SNAPSHOT_FILE).is_file()
    assert not (tmp_path / "memory" / SNAPSHOT_FILE).exists()


# ---------------------------------------------------------------------- canary, drift, parameters


def test_forgetting_the_original_task_trips_the_canary_and_drift_is_logged(tmp_path, digits, pretrained):
    new_classes = digits.finetune[digits.targets[digits.finetune] >= 5]  # fine-tuned on 5-9 only
    old_classes = digits.held_out[digits.targets[digits.held_out] < 5][:64]
    canary = (digits.inputs[old_classes], digits.targets[old_classes])
    finetune_guard = guard(canary=canary, canary_margin=0.3)
    logger = CSVLogger(tmp_path, name="canary")
    trainer = tiny_trainer(tmp_path, logger=logger, max_steps=20, callbacks=[finetune_guard], log_every_n_steps=5)
    with pytest.warns(ActGuardWarning, match="the model is forgetting the original task"):
        trainer.fit(Finetune(pretrained, lr=0.3), loader(digits, new_classes))

    event = next(event for event in finetune_guard.events if "canary" in event.evidence)
    baseline = nn.functional.cross_entropy(pretrained_net(pretrained)(canary[0]), canary[1]).item()
    assert finetune_guard.baseline.canary_loss == pytest.approx(baseline, rel=1e-5)
    assert event.evidence["canary"]["canary_loss"] > baseline + 0.3
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("finetune_canary_loss")]
    assert len(rows) == 4  # one per window
    assert all(float(row["finetune_drift/net.0"]) > 0 for row in rows)


def test_a_layer_is_kept_within_its_drift_budget(tmp_path, digits, pretrained):
    finetune_guard = guard(drift_budget={"net.4": 0.02})
    model = Finetune(pretrained, lr=0.1)
    trainer = tiny_trainer(tmp_path, logger=False, max_steps=40, callbacks=[finetune_guard])
    with pytest.warns(
        ActGuardWarning, match=r"layers drifted from the pretrained weights beyond their budget: 'net.4'"
    ):
        trainer.fit(model, loader(digits))

    assert finetune_guard.rollbacks >= 1
    assert all(event.action == "rollback" and set(event.evidence) >= {"drift"} for event in finetune_guard.events)
    now = torch.cat([model.net[4].weight.flatten(), model.net[4].bias.flatten()])
    start = torch.cat([pretrained["4.weight"].flatten(), pretrained["4.bias"].flatten()])
    assert 0 < (now - start).norm() / start.norm() <= 0.02  # the last window's end was judged: 40 steps


class MuddledFreezing(Finetune):
    """Frozen first layer handed to the optimizer; an unused layer; a parameter left out; a frozen one changed."""

    def __init__(self, weights, lr):
        super().__init__(weights, lr)
        self.net[0].requires_grad_(False)
        self.unused = nn.Linear(2, 2)
        self.left_out = nn.Parameter(torch.zeros(3))
        self.frozen_scale = nn.Parameter(torch.ones(1), requires_grad=False)

    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            with torch.no_grad():
                self.frozen_scale.add_(1.0)
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        handed = [param for name, param in self.named_parameters() if name not in ("left_out", "frozen_scale")]
        return torch.optim.SGD(handed, lr=self.lr)


def test_freezing_mistakes_are_each_reported_once(tmp_path, digits, pretrained):
    finetune_guard = guard()
    trainer = tiny_trainer(tmp_path, logger=False, max_steps=15, callbacks=[finetune_guard])
    with pytest.warns(ActGuardWarning) as record:
        trainer.fit(MuddledFreezing(pretrained, lr=0.05), loader(digits))

    found = [(event.step, event.evidence["finding"], event.evidence["parameters"]) for event in finetune_guard.events]
    assert found == [
        (0, "frozen_in_optimizer", ["net.0.weight", "net.0.bias"]),
        (0, "trainable_outside_optimizer", ["left_out"]),
        (5, "frozen_changed", ["frozen_scale"]),
        (5, "never_updated", ["unused.bias", "unused.weight"]),
    ]
    assert all(event.severity == "warning" for event in finetune_guard.events)
    assert len([warning for warning in record if warning.category is ActGuardWarning]) == 4


# ---------------------------------------------------------------------- the starting learning rate


def test_a_starting_rate_above_the_cap_is_refused_or_clamped(tmp_path, digits, pretrained):
    with pytest.raises(ValueError, match=r"starting learning rate is above lr_cap=0.1 \(optimizer 0 group 0: 5\)"):
        tiny_trainer(tmp_path, logger=False, max_steps=5, callbacks=[guard(lr_cap=0.1)]).fit(
            Finetune(pretrained, lr=FAR_TOO_HIGH), loader(digits)
        )

    clamping = guard(lr_cap=0.1, lr_cap_action="clamp")
    trainer = tiny_trainer(tmp_path, logger=False, max_steps=5, callbacks=[clamping])
    with pytest.warns(ActGuardWarning, match=r"scaled every learning rate by 0.02, schedulers included: 5 -> 0.1"):
        trainer.fit(Finetune(pretrained, lr=FAR_TOO_HIGH, step_lr=True), loader(digits))

    assert [event.action for event in clamping.events] == ["clamp_lr"]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [pytest.approx(0.1)]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)  # StepLR's first decay is at step 7


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"factor": 1.0}, r"`factor` must be in \(0, 1\), got 1.0"),
        ({"min_lr": -1e-3}, "`min_lr` must be a non-negative number, got -0.001"),
        ({"max_rollbacks": -1}, "`max_rollbacks` must be a non-negative int, got -1"),
        ({"snapshot_to": "gpu"}, r"`snapshot_to` must be one of \('memory', 'disk'\), got 'gpu'"),
        ({"lr_cap": 0}, "`lr_cap` must be a positive number or None, got 0"),
        ({"lr_cap_action": "warn"}, r"`lr_cap_action` must be one of \('refuse', 'clamp'\), got 'warn'"),
        ({"drift_budget": {"net.0": -1}}, "`drift_budget` must be a positive number or a mapping"),
        ({"drift_budget": 0.1, "track_drift": False}, "`drift_budget` needs `track_drift=True`"),
        ({"canary": torch.zeros(3)}, r"`canary` must be a pair \(inputs, targets\)"),
        ({"canary_loss": lambda model, batch: 0.0}, "`canary_loss` was given without a `canary` batch"),
        ({"revive": "yes"}, "`revive` must be a bool or a mapping"),
        ({"dead_margin": 2.0}, r"`dead_margin` must be in \(0, 1\] or None, got 2.0"),
        ({"snapshot_every_n_steps": 0}, "`snapshot_every_n_steps` must be a positive int or None, got 0"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(arguments, message):
    with pytest.raises(ValueError, match=message):
        FinetuneGuard(**arguments)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"snapshot_every_n_steps": 7}, r"`snapshot_every_n_steps` must be a multiple of the window \(5 steps\)"),
        ({"revive": {"net.9": "net.0"}}, r"`revive` names activation layers the model does not have: \['net.9'\]"),
        ({"revive": {"net.1": "net.1"}}, "`revive` maps 'net.1' to 'net.1', which is not a Linear"),
        (
            {"drift_budget": {"net.1": 0.1}},
            r"`drift_budget` names layers that own no floating-point parameters: \['net.1'\]",
        ),
    ],
)
def test_arguments_that_do_not_fit_the_model_are_refused_before_training(tmp_path, pretrained, arguments, message):
    trainer = tiny_trainer(tmp_path, logger=False, max_steps=5, callbacks=[guard(**arguments)])
    model = Finetune(pretrained, lr=0.05)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, DataLoader(TensorDataset(torch.randn(8, 64), torch.zeros(8, dtype=torch.long))))
    assert not model.net[1]._forward_hooks  # hooks removed


# ---------------------------------------------------------------------- cost


def test_numbers_are_read_back_only_at_window_ends_and_snapshot_refreshes(tmp_path, digits, pretrained):
    from test_host_syncs import StartRecording, StopRecording

    start = StartRecording()
    callbacks = [start, guard(), StopRecording(start)]
    tiny_trainer(tmp_path, logger=False, max_steps=25, callbacks=callbacks).fit(
        Finetune(pretrained, lr=0.05), loader(digits)
    )

    read_backs = {step: count for step, count in start.per_step if count}
    # Each read is one copy to the host and one conversion to numbers. Step 1: the baseline. Window ends
    # (5, 10, ...): the engine's window and the guard's drift. 11 and 21: the loss check of a snapshot refresh,
    # taken before the update of the batch that follows the second healthy window.
    assert read_backs == {1: 2, 5: 4, 10: 4, 11: 2, 15: 4, 20: 4, 21: 2, 25: 4}
