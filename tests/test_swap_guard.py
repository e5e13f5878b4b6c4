"""The guards' "swap" action in real training runs: it swaps what the diagnosis names, reviews, reverts, resumes."""

import pytest
import torch
from conftest import DigitsMLP, digits_loaders, tiny_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_actguard import ActGuardWarning, ActivationMonitor, DeadReLUGuard, LossPlateauGuard, restore_swaps
from lightning_actguard.callbacks import Guard
from lightning_actguard.callbacks._guard import Finding


class SwapsAtFirstWindow(Guard):
    """A guard whose condition holds in every window and names ``layers``: a swap that happens for sure."""

    def __init__(self, layers, **kwargs):
        super().__init__(action="swap", print_summary=False, **kwargs)
        self.layers = tuple(layers)

    def inspect(self, trainer, snapshot):
        return Finding("test condition", layers=self.layers)


class AdamDigits(DigitsMLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits_in_order(batch_size=64):
    return DataLoader(digits_loaders().dataset, batch_size=batch_size, shuffle=False)


def digits_loss(model):
    inputs, targets = digits_loaders().dataset.tensors
    with torch.no_grad():
        return nn.functional.cross_entropy(model.net(inputs), targets).item()


def test_a_stalled_sigmoid_mlp_is_swapped_to_selu_and_then_learns(tmp_path):
    stalled = DigitsMLP(depth=12, activation=nn.Sigmoid, lr=0.1)
    tiny_trainer(tmp_path, logger=False, max_steps=250).fit(stalled, digits_loaders())

    guard = LossPlateauGuard(patience=40, min_delta=0.01, every_n_steps=10, action="swap", print_summary=False)
    monitor = ActivationMonitor(overhead_budget=None, print_summary=False)
    swapped = DigitsMLP(depth=12, activation=nn.Sigmoid, lr=0.1)
    with pytest.warns(ActGuardWarning, match="swap"):
        tiny_trainer(tmp_path, logger=False, callbacks=[guard, monitor], max_steps=250).fit(swapped, digits_loaders())

    swap, review = guard.events
    sigmoids = [f"net.{index}" for index in range(1, 23, 2)]
    assert swap.action == "swap"
    assert all(f"'{name}': Sigmoid() -> SELU()" in swap.outcome for name in sigmoids)
    assert (review.action, review.severity) == ("review", "info")
    assert "helped" in review.condition
    assert all(isinstance(swapped.net[index], nn.SELU) for index in range(1, 23, 2))
    # The monitor's hooks moved to the new modules: the same layer names now report SELU statistics.
    assert [monitor.snapshot.activations[name].kind for name in sigmoids] == ["selu"] * 11
    assert digits_loss(stalled) > 2.2
    assert digits_loss(swapped) < 0.5 * digits_loss(stalled)


def test_dead_relu_guard_swaps_only_the_dead_layers(tmp_path):
    guard = DeadReLUGuard(threshold=0.9, action="swap", every_n_steps=10, cooldown=10**6, print_summary=False)
    model = DigitsMLP(depth=4, lr=5.0)
    with pytest.warns(ActGuardWarning, match="Action: swapped"):
        tiny_trainer(tmp_path, logger=False, callbacks=[guard], max_steps=30).fit(model, digits_loaders())

    swap = guard.events[0]
    dead = set(swap.evidence["dead_frac"])
    relus = {f"net.{index}" for index in (1, 3, 5)}
    assert dead
    assert dead <= relus
    assert {name for name in relus if isinstance(model.net.get_submodule(name.split(".")[1]), nn.ELU)} == dead


def test_a_learnable_replacement_joins_the_optimizer_and_trains(tmp_path):
    guard = SwapsAtFirstWindow(["net.1", "net.3"], swap_mapping={nn.ReLU: nn.PReLU}, swap_init=True, every_n_steps=5)
    model = DigitsMLP(depth=4, lr=0.1)
    with pytest.warns(ActGuardWarning, match="swap"):
        tiny_trainer(tmp_path, logger=False, callbacks=[guard], max_steps=40).fit(model, digits_loaders())

    assert "re-initialised 'net.0' (kaiming_normal), 'net.2' (kaiming_normal)" in guard.events[0].outcome
    optimized = {id(param) for group in model.optimizers().optimizer.param_groups for param in group["params"]}
    for index in (1, 3):
        assert isinstance(model.net[index], nn.PReLU)
        assert id(model.net[index].weight) in optimized
        assert model.net[index].weight.item() != pytest.approx(0.25)  # PReLU starts at 0.25
    assert isinstance(model.net[5], nn.ReLU)


def test_a_swap_that_makes_the_loss_worse_is_reverted(tmp_path):
    zeros = nn.Threshold(1e9, 0.0)  # a replacement that outputs only zeros
    guard = SwapsAtFirstWindow(["net.1", "net.3"], swap_mapping={nn.ReLU: zeros}, every_n_steps=10, review_steps=10)
    monitor = ActivationMonitor(overhead_budget=None, print_summary=False)
    model = DigitsMLP(depth=3, lr=0.1)
    originals = [model.net[1], model.net[3]]
    with pytest.warns(ActGuardWarning, match="swap"):
        tiny_trainer(tmp_path, logger=False, callbacks=[guard, monitor], max_steps=40).fit(model, digits_loaders())

    swap, revert = guard.events
    assert (swap.step, revert.step, revert.action, revert.severity) == (10, 20, "revert_swap", "action")
    assert "made things worse" in revert.condition
    assert [model.net[1], model.net[3]] == originals
    assert monitor.snapshot.activations["net.1"].kind == "relu"
    assert guard.state_dict()["swaps"] == {"standing": []}


def optimizer_state_by_name(model, optimizer):
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(param)]: state for param, state in optimizer.state.items()}


def test_a_checkpoint_after_a_swap_resumes_into_a_fresh_model_exactly(tmp_path):
    def run(max_steps, ckpt_path=None):
        guard = SwapsAtFirstWindow(["net.1"], swap_mapping={nn.Sigmoid: nn.PReLU}, every_n_steps=5)
        model = AdamDigits(depth=3, activation=nn.Sigmoid, lr=0.01)
        trainer = tiny_trainer(tmp_path, logger=False, callbacks=[guard], max_steps=max_steps)
        trainer.fit(model, digits_in_order(), ckpt_path=ckpt_path)
        return model, trainer

    with pytest.warns(ActGuardWarning, match="swap"):
        saved, trainer = run(10)
    trainer.save_checkpoint(tmp_path / "swapped.ckpt")
    restored, restored_trainer = run(10, ckpt_path=tmp_path / "swapped.ckpt")  # restores, takes no step

    inputs = digits_loaders().dataset.tensors[0][:32]
    assert isinstance(restored.net[1], nn.PReLU)
    torch.testing.assert_close(restored.net(inputs), saved.net(inputs), rtol=0, atol=0)
    expected = optimizer_state_by_name(saved, trainer.optimizers[0])
    actual = optimizer_state_by_name(restored, restored_trainer.optimizers[0])
    assert sorted(actual) == sorted(expected)
    assert "net.1.weight" in actual
    for name, state in expected.items():
        torch.testing.assert_close(actual[name]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0, msg=name)

    continued, _ = run(20, ckpt_path=tmp_path / "swapped.ckpt")  # the swap is not made twice; training goes on
    assert continued.net[1].weight.item() != saved.net[1].weight.item()

    # Outside Trainer.fit: restore_swaps, then load the weights, gives the same outputs.
    checkpoint = torch.load(tmp_path / "swapped.ckpt", weights_only=True)
    fresh = AdamDigits(depth=3, activation=nn.Sigmoid)
    assert [swap.name for swap in restore_swaps(fresh, checkpoint).swaps] == ["net.1"]
    fresh.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(fresh.net(inputs), saved.net(inputs), rtol=0, atol=0)


def test_a_replacement_that_fails_to_build_is_an_event_not_a_crash(tmp_path):
    def broken(old):
        raise RuntimeError("no such activation")

    guard = SwapsAtFirstWindow(["net.1"], swap_mapping={nn.ReLU: broken}, every_n_steps=5, cooldown=10**6)
    model = DigitsMLP(depth=3, lr=0.1)
    trainer = tiny_trainer(tmp_path, logger=False, callbacks=[guard], max_steps=10)
    with pytest.warns(ActGuardWarning, match="nothing swapped: building the replacement failed"):
        trainer.fit(model, digits_loaders())
    assert trainer.global_step == 10
    assert isinstance(model.net[1], nn.ReLU)


def test_swap_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match="`swap_mapping` is given but `action` 'warn' has no 'swap'"):
        DeadReLUGuard(swap_mapping={nn.ReLU: nn.ELU})
    with pytest.raises(ValueError, match="to itself"):
        DeadReLUGuard(action="swap", swap_mapping={nn.ReLU: nn.ReLU})
    with pytest.raises(ValueError, match="`review_steps` must be a positive int or None, got 0"):
        LossPlateauGuard(action="swap", review_steps=0)
