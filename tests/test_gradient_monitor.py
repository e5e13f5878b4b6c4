import math

import pytest
import torch
from conftest import DigitsMLP, KnownGradientModel, digits_loaders, tiny_trainer
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_actguard import ActGuardWarning, ActivationMonitor, GradientMonitor
from lightning_actguard.engine import engine_for


def test_tensorboard_holds_hand_computed_norms(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    monitor = GradientMonitor(every_n_steps=2)
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[monitor], max_steps=4)
    trainer.fit(KnownGradientModel(scales=(1.0,) * 4))

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    steps_and_values = [(event.step, event.value) for event in events.Scalars("grad_norm/net.1")]
    assert steps_and_values == [(1, pytest.approx(math.sqrt(6))), (3, pytest.approx(math.sqrt(6)))]
    assert [event.value for event in events.Scalars("grad_norm_total")] == [pytest.approx(math.sqrt(75 + 6))] * 2
    assert [event.value for event in events.Scalars("grad_depth_ratio")] == [pytest.approx(math.sqrt(75 / 6))] * 2
    assert [event.value for event in events.Scalars("grad_vanishing")] == [0.0, 0.0]
    assert [event.value for event in events.Scalars("grad_update_ratio/net.1")] == [0.0, 0.0]  # lr = 0
    assert "custom_scalars__config__" in events.Tags()["tensors"]


def test_prints_a_per_layer_gradient_table_at_the_end(tmp_path, capsys):
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[GradientMonitor(every_n_steps=2)], max_steps=2)
    trainer.fit(KnownGradientModel(scales=(1.0, 1.0)))

    printed = capsys.readouterr().out
    assert "Gradients over the last 2 optimizer steps, to step 2" in printed
    assert "8.66" in printed  # sqrt(75), layer net.0
    assert "healthy" in printed


def test_accumulated_gradients_are_measured_not_one_micro_batch(tmp_path):
    # Lightning divides each micro-batch's loss by 4, so a step's gradient is the mean over 4
    # micro-batches: for scales 1..4, |g|^2 = 5 * 2.5^2 + 1; for 5..8, 5 * 6.5^2 + 1.
    monitor = GradientMonitor(every_n_steps=2, overhead_budget=None)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[monitor], max_steps=2, accumulate_grad_batches=4)
    trainer.fit(KnownGradientModel(scales=tuple(float(c) for c in range(1, 9))))

    stats = monitor.snapshot.gradients
    assert stats.steps == 2
    assert stats.layers["net.1"].norm == pytest.approx(math.sqrt((5 * 2.5**2 + 1 + 5 * 6.5**2 + 1) / 2))


def test_bf16_mixed_precision(tmp_path):
    monitor = GradientMonitor(every_n_steps=2)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[monitor], max_steps=2, precision="bf16-mixed")
    trainer.fit(KnownGradientModel(scales=(1.0, 1.0)))

    stats = monitor.snapshot.gradients
    assert stats.layers["net.1"].norm == pytest.approx(math.sqrt(6), rel=1e-2)
    assert stats.layers["net.0"].norm == pytest.approx(math.sqrt(75), rel=1e-2)


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused-adam"])
def test_fp16_gradient_scaler_fused_adam_and_skipped_steps(tmp_path, fused):
    class WithAdam(KnownGradientModel):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.0, fused=fused)

    # On the first step, 2^16 * the loss overflows float16: the scaler skips it and halves its scale.
    # Fused Adam unscales inside step(), so its gradients still carry the scale when measured.
    monitor = GradientMonitor(every_n_steps=4, overhead_budget=None)
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[monitor], max_steps=4, plugins=[precision])
    trainer.fit(WithAdam(scales=(1.0,) * 8))

    stats = monitor.snapshot.gradients
    assert stats.skipped_steps >= 1
    assert stats.steps == 4 - stats.skipped_steps
    assert not stats.exploding
    assert stats.layers["net.1"].norm == pytest.approx(math.sqrt(6), rel=1e-2)


class InjectsNaN(KnownGradientModel):
    def on_after_backward(self):
        if self.global_step == 1:
            self.net[0].bias.grad[0] = math.nan


def test_a_nan_gradient_is_counted_raises_the_flag_and_warns_once(tmp_path):
    monitor = GradientMonitor(every_n_steps=2, overhead_budget=None)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[monitor], max_steps=4)
    with pytest.warns(
        ActGuardWarning, match=r"At step 2: gradients have exploded: 1 optimizer steps got NaN"
    ) as record:
        trainer.fit(InjectsNaN(scales=(1.0,) * 4))

    # The NaN reached the weights (0 * NaN is NaN), so the second window explodes too: still one warning.
    assert len([warning for warning in record if warning.category is ActGuardWarning]) == 1
    stats = monitor.snapshot.gradients
    assert (stats.exploding, stats.nonfinite_steps) == (True, 2)


def test_a_nan_gradient_in_the_last_window(tmp_path):
    monitor = GradientMonitor(every_n_steps=2, warn=False, overhead_budget=None)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[monitor], max_steps=2)
    trainer.fit(InjectsNaN(scales=(1.0,) * 2))

    stats = monitor.snapshot.gradients
    assert (stats.layers["net.0"].nonfinite_steps, stats.layers["net.1"].nonfinite_steps) == (1, 0)
    assert (stats.exploding, stats.nonfinite_steps, stats.steps) == (True, 1, 1)


def test_a_deep_sigmoid_mlp_is_flagged_as_vanishing_and_a_shallow_relu_mlp_is_not(tmp_path):
    deep = GradientMonitor(every_n_steps=10)
    with pytest.warns(ActGuardWarning, match=r"At step 10: gradients have vanished: the first layer 'net.0' gets"):
        tiny_trainer(tmp_path, logger=False, callbacks=[deep], max_steps=20).fit(
            DigitsMLP(depth=16, activation=nn.Sigmoid), digits_loaders()
        )
    assert deep.snapshot.gradients.vanishing
    assert deep.snapshot.gradients.depth_ratio < 1e-6

    shallow = GradientMonitor(every_n_steps=10)
    tiny_trainer(tmp_path, logger=False, callbacks=[shallow], max_steps=20).fit(DigitsMLP(depth=3), digits_loaders())
    assert not shallow.snapshot.gradients.vanishing
    assert 0.1 < shallow.snapshot.gradients.depth_ratio < 10


def test_gradient_histograms(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    monitor = GradientMonitor(every_n_steps=2, histogram_every_n_steps=4)
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[monitor], max_steps=8)
    trainer.fit(KnownGradientModel(scales=(1.0,) * 8))

    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    histograms = events.Histograms("grad_hist/net.1")
    assert [event.step for event in histograms] == [3, 7]
    value = histograms[0].histogram_value
    assert (value.num, value.sum, value.sum_squares) == (3, 4, 6)  # gradient (1, 2, 1)


def test_monitors_share_the_window_one_of_them_chose(tmp_path, known_dead_model):
    activations, gradients = ActivationMonitor(print_summary=False), GradientMonitor(every_n_steps=4)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[activations, gradients], max_steps=8)
    trainer.fit(known_dead_model)

    assert activations.snapshot is gradients.snapshot
    assert (activations.snapshot.step, activations.snapshot.batches) == (8, 4)
    assert list(gradients.snapshot.gradients.layers) == ["head"]
    assert engine_for(known_dead_model) is None
    assert not trainer.optimizers[0]._optimizer_step_post_hooks


def test_two_chosen_windows_that_differ_are_refused(tmp_path, known_dead_model):
    callbacks = [ActivationMonitor(every_n_steps=5), GradientMonitor(every_n_steps=4)]
    with pytest.raises(ValueError, match="GradientMonitor asks for windows of 4 steps, but ActivationMonitor"):
        tiny_trainer(tmp_path, logger=False, callbacks=callbacks).fit(known_dead_model)
    assert engine_for(known_dead_model) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vanishing_ratio": 1.0}, r"`vanishing_ratio` must be in \(0, 1\), got 1.0"),
        ({"vanishing_floor": 0.0}, "`vanishing_floor` must be positive, got 0.0"),
        ({"exploding_norm": -1}, "`exploding_norm` must be positive, got -1"),
        ({"every_n_steps": 0}, "`every_n_steps` must be a positive int or None, got 0"),
        ({"histogram_every_n_steps": 1.5}, "`histogram_every_n_steps` must be a positive int or None, got 1.5"),
    ],
    ids=["ratio", "floor", "norm", "window", "histograms"],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientMonitor(**kwargs)
