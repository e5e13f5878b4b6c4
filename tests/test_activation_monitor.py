import copy
import csv
import pickle

import pytest
import pytorch_lightning as pl
import torch
from conftest import KnownDeadModel, tiny_trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from lightning_actguard import ActGuardWarning, ActivationMonitor, _compat
from lightning_actguard.activations import find_activation_layers
from lightning_actguard.engine import acquire, engine_for


def read_events(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events, tag):
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_event_files_hold_the_known_statistics(tmp_path, known_dead_model):
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[ActivationMonitor(print_summary=False)])
    trainer.fit(known_dead_model)

    events = read_events(logger.log_dir)
    # Windows close at optimizer steps 5, 10, 15, 20; Lightning logs those batches at steps 4, 9, 14, 19.
    assert scalars(events, "act_dead_frac/features.1") == [(4, 0.5), (9, 0.5), (14, 0.5), (19, 0.5)]
    assert [value for _, value in scalars(events, "act_zero_frac/features.1")] == [0.5] * 4
    assert [value for _, value in scalars(events, "act_out_mean/features.1")] == [0.5] * 4
    assert [value for _, value in scalars(events, "act_saturated_frac/squash")] == [1.0] * 4
    assert "act_saturated_frac/features.1" not in events.Tags()["scalars"]
    assert [value for _, value in scalars(events, "act_nonfinite/squash")] == [0.0] * 4


@pytest.mark.parametrize("one_event", [True, False])
def test_tensorboard_scalars_carry_the_loggers_prefix_whichever_way_they_are_written(
    tmp_path, known_dead_model, monkeypatch, one_event
):
    if not one_event:  # as with a writer that cannot take a window's scalars in one event (tensorboardX)
        monkeypatch.setattr(_compat, "tensorboard_event_writer", lambda logger: None)
    logger = TensorBoardLogger(tmp_path, name="run", prefix="exp")
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[ActivationMonitor(print_summary=False)])
    trainer.fit(known_dead_model)

    events = read_events(logger.log_dir)
    assert scalars(events, "exp-act_dead_frac/features.1") == [(4, 0.5), (9, 0.5), (14, 0.5), (19, 0.5)]
    assert "act_dead_frac/features.1" not in events.Tags()["scalars"]


def test_tensorboard_gets_one_chart_per_statistic_with_every_layer(tmp_path, known_dead_model):
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[ActivationMonitor(log_key_prefix="monitor_")])
    trainer.fit(known_dead_model)

    events = read_events(logger.log_dir)
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["dead unit fraction"] == [r"^monitor_act_dead_frac/"]
    assert charts["saturated share"] == [r"^monitor_act_saturated_frac/"]
    assert charts["zero share"] == [r"^monitor_act_zero_frac/"]
    assert "monitor_act_dead_frac/features.1" in events.Tags()["scalars"]


def test_histograms_are_written_at_their_own_interval(tmp_path, known_dead_model):
    logger = TensorBoardLogger(tmp_path, name="run")
    monitor = ActivationMonitor(histogram_every_n_steps=10, print_summary=False)
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[monitor])
    trainer.fit(known_dead_model)

    events = read_events(logger.log_dir)
    histograms = events.Histograms("act_out_hist/features.1")
    assert [event.step for event in histograms] == [9, 19]
    # One batch of 8 samples x 6 units: half the outputs are 0, half are 1.
    value = histograms[0].histogram_value
    assert (value.num, value.sum) == (48, 24)
    assert dict(zip(value.bucket_limit, value.bucket, strict=True)) == {0.0: 24, 1.0: 24} | {
        limit: 0 for limit in value.bucket_limit if limit not in (0.0, 1.0)
    }


def test_csv_logger_gets_plain_scalars(tmp_path, known_dead_model):
    logger = CSVLogger(tmp_path, name="run")
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[ActivationMonitor(print_summary=False)])
    trainer.fit(known_dead_model)

    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["act_dead_frac/features.1"]]
    assert [(int(row["step"]), float(row["act_dead_frac/features.1"])) for row in rows] == [
        (4, 0.5),
        (9, 0.5),
        (14, 0.5),
        (19, 0.5),
    ]
    assert {float(row["act_saturated_frac/squash"]) for row in rows} == {1.0}


def test_without_a_logger_statistics_are_still_collected(tmp_path, known_dead_model):
    monitor = ActivationMonitor(every_n_steps=4, print_summary=False)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[monitor], max_steps=12)
    trainer.fit(known_dead_model)

    snapshot = monitor.snapshot
    assert (snapshot.step, snapshot.batches) == (12, 4)
    assert snapshot.activations["features.1"].dead_units.tolist() == [False, True] * 3


def test_bf16_mixed_precision(tmp_path, known_dead_model):
    monitor = ActivationMonitor(print_summary=False)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[monitor], precision="bf16-mixed", max_steps=5)
    trainer.fit(known_dead_model)

    layer = monitor.snapshot.activations["features.1"]
    assert (layer.dead_frac, layer.zero_frac, layer.out_mean) == (0.5, 0.5, 0.5)
    assert monitor.snapshot.activations["squash"].saturated_frac == 1.0


class TrainsOnNegativesValidatesOnPositives(pl.LightningModule):
    """A ReLU straight on the inputs: dead on every training batch, alive on every other batch."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.act(x))

    def training_step(self, batch, batch_idx):
        return self(-batch[0].abs()).sum()

    def validation_step(self, batch, batch_idx):
        self(batch[0].abs())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 3)), batch_size=4)

    val_dataloader = train_dataloader


def test_only_training_batches_enter_the_window(tmp_path):
    monitor = ActivationMonitor(print_summary=False)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[monitor], max_steps=10, val_check_interval=3)
    trainer.fit(TrainsOnNegativesValidatesOnPositives())
    trainer.validate(trainer.lightning_module, verbose=False)

    assert monitor.snapshot.activations["act"].dead_frac == 1.0
    assert monitor.snapshot.batches == 5


def test_windows_count_optimizer_steps_under_gradient_accumulation(tmp_path, known_dead_model):
    monitor = ActivationMonitor(every_n_steps=2, print_summary=False)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[monitor], max_steps=4, accumulate_grad_batches=2)
    trainer.fit(known_dead_model)

    assert (monitor.snapshot.step, monitor.snapshot.batches) == (4, 4)  # 2 steps of 2 batches


class CountHooks(pl.Callback):
    """Hooks on the ReLU during each batch's backward (after its forward) and after each batch."""

    def __init__(self):
        self.during, self.after = [], []

    def on_before_backward(self, trainer, pl_module, loss):
        self.during.append(len(pl_module.features[1]._forward_hooks))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append(len(pl_module.features[1]._forward_hooks))


def test_callbacks_share_one_set_of_hooks_only_during_batches_and_remove_it_after_fit(tmp_path, known_dead_model):
    first, second, counter = (
        ActivationMonitor(print_summary=False, overhead_budget=None),
        ActivationMonitor(log_key_prefix="b_"),
        CountHooks(),
    )
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[first, second, counter])
    trainer.fit(known_dead_model)

    assert counter.during == [1] * 20
    assert counter.after == [0] * 20
    assert first.snapshot is second.snapshot
    assert engine_for(known_dead_model) is None
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in known_dead_model.modules())
    pickle.loads(pickle.dumps(known_dead_model))
    copy.deepcopy(known_dead_model)


def test_hooks_are_removed_after_an_exception_in_training_step(tmp_path):
    model = KnownDeadModel(fail_at_step=3)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[ActivationMonitor(print_summary=False)])
    with pytest.raises(RuntimeError, match="failure inside training_step"):
        trainer.fit(model)

    assert engine_for(model) is None
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())
    pickle.loads(pickle.dumps(model))


def test_prints_a_per_layer_summary_at_the_end(tmp_path, known_dead_model, capsys):
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[ActivationMonitor()], max_steps=7)
    trainer.fit(known_dead_model)

    printed = capsys.readouterr().out
    assert "Activations over the last 2 training batches, to optimizer step 7" in printed
    assert "features.1" in printed
    assert "50.0%" in printed


def test_a_model_without_activations_gets_one_clear_warning(tmp_path):
    class LinearOnly(KnownDeadModel):
        def __init__(self):
            super().__init__()
            self.features, self.squash = nn.Linear(4, 6), nn.Identity()

    with pytest.warns(ActGuardWarning, match=r"no activation layers in LinearOnly.*extra_types=") as record:
        tiny_trainer(tmp_path, logger=False, callbacks=[ActivationMonitor()], max_steps=2).fit(LinearOnly())
    assert len([warning for warning in record if warning.category is ActGuardWarning]) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "`every_n_steps` must be a positive int or None, got 0"),
        ({"every_n_steps": 2.5}, "`every_n_steps` must be a positive int or None, got 2.5"),
        ({"histogram_every_n_steps": -1}, "`histogram_every_n_steps` must be a positive int or None, got -1"),
        ({"max_calls_per_module": True}, "`max_calls_per_module` must be a positive int, got True"),
        ({"saturation_eps": 0.5}, r"`saturation_eps` must be in \(0, 0.5\), got 0.5"),
        ({"unit_dim": "channels"}, "`unit_dim` must be 'auto' or an int, got 'channels'"),
        ({"name_pattern": "(relu"}, r"`name_pattern` must be a regular expression, got '\(relu'"),
        ({"predicate": "relu"}, "`predicate` must be callable"),
        ({"extra_types": [42]}, "`extra_types` must hold nn.Module subclasses, got 42"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActivationMonitor(**kwargs)


def test_histogram_interval_must_be_a_multiple_of_the_window(tmp_path, known_dead_model):
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[ActivationMonitor(histogram_every_n_steps=7)])
    with pytest.raises(ValueError, match=r"multiple of the logging window \(5 steps\), got 7"):
        trainer.fit(known_dead_model)
    assert engine_for(known_dead_model) is None


class HalfFunctional(KnownDeadModel):
    """KnownDeadModel whose head input also goes through F.gelu inside ``forward``: invisible to hooks."""

    def forward(self, x):
        return super().forward(nn.functional.gelu(x))


def test_functional_activations_are_named_once_and_leave_no_hooks_behind(tmp_path):
    model = HalfFunctional()
    monitor = ActivationMonitor(overhead_budget=None, print_summary=False)
    with pytest.warns(ActGuardWarning, match=r"1 activation\(s\) are applied functionally: \(root\) applies gelu") as w:
        tiny_trainer(tmp_path, logger=False, callbacks=[monitor], max_steps=10).fit(model)
    assert sum("applied functionally" in str(warning.message) for warning in w) == 1
    assert set(monitor.snapshot.activations) == {"features.1", "squash"}
    assert all(not module._forward_pre_hooks for module in model.modules())


def test_histogram_windows_follow_the_optimizer_step_not_the_count_of_windows_seen():
    # A run resumed at step 30 has seen no window yet; its first closes at 40, a histogram window.
    model, consumer = nn.Sequential(nn.Linear(3, 4), nn.ReLU()), object()
    engine = acquire(model, consumer, every_n_steps=10)
    engine.use_activations(consumer, None, find_activation_layers(model))
    engine.use_histograms(consumer, 20)
    try:
        closed = []
        for step in (30, 39, 40, 49):
            engine.start_batch(step, step=step)
            model(torch.randn(8, 3))
            snapshot = engine.end_batch(step, step + 1)
            if snapshot is not None:
                closed.append((snapshot.step, snapshot.activations["1"].histogram is not None))
        assert closed == [(40, True), (50, False)]
    finally:
        engine.release(consumer)
