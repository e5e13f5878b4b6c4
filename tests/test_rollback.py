"""RollbackPoint: a captured training state comes back exactly, in memory or from its file."""

import copy

import pytest
import torch
from torch import nn

from lightning_actguard.rollback import RollbackPoint, capture_state, restore_state


def make_run(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        inputs = torch.randn(16, 4, generator=generator)
        loss = model(inputs).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def assert_same_tree(actual, expected):
    """Equal containers, and every tensor equal bit for bit (same dtype and shape)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same_tree(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for item, expected_item in zip(actual, expected, strict=True):
            assert_same_tree(item, expected_item)
    else:
        assert actual == expected


def states(model, optimizer, scheduler):
    return copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))


@pytest.fixture(params=["memory", "disk"])
def point(request, tmp_path):
    return RollbackPoint(tmp_path / "snapshot.pt" if request.param == "disk" else None)


def test_restore_puts_back_weights_buffers_optimizer_and_scheduler_state_exactly(point):
    model, optimizer, scheduler = make_run()
    train(model, optimizer, scheduler, 3, seed=1)
    point.capture(3, model, [optimizer], [scheduler])
    expected = states(model, optimizer, scheduler)
    train(model, optimizer, scheduler, 4, seed=2)
    assert not torch.equal(model[0].weight, expected[0]["0.weight"])

    assert point.restore(model, [optimizer], [scheduler]) == 3

    assert_same_tree(states(model, optimizer, scheduler), expected)
    assert model[1].num_batches_tracked.item() == 3  # a buffer, rolled back too
    assert scheduler.last_epoch == 3
    assert optimizer.param_groups[0]["lr"] == 0.005


def test_a_restored_run_continues_exactly_as_the_first_time(point):
    model, optimizer, scheduler = make_run()
    train(model, optimizer, scheduler, 3, seed=1)
    point.capture(3, model, [optimizer], [scheduler])
    first = train(model, optimizer, scheduler, 5, seed=7)
    end_of_first = states(model, optimizer, scheduler)

    for _ in range(2):  # twice: training after a restore must not write into the kept copy
        point.restore(model, [optimizer], [scheduler])
        assert train(model, optimizer, scheduler, 5, seed=7) == first
        assert_same_tree(states(model, optimizer, scheduler), end_of_first)


def test_restoring_keeps_the_containers_others_hold():
    model, optimizer, scheduler = make_run()
    groups, group, state = optimizer.param_groups, optimizer.param_groups[0], optimizer.state
    point = RollbackPoint()
    point.capture(0, model, [optimizer], [scheduler])
    train(model, optimizer, scheduler, 3, seed=1)

    point.restore(model, [optimizer], [scheduler])

    assert optimizer.param_groups is groups
    assert optimizer.param_groups[0] is group
    assert optimizer.state is state
    assert group["lr"] == 0.01  # read through the reference held before the restore
    assert len(state) == 0  # Adam had no state at step 0


def test_one_state_is_kept_and_capturing_replaces_it(point):
    model, optimizer, scheduler = make_run()
    point.capture(0, model, [optimizer], [scheduler])
    train(model, optimizer, scheduler, 2, seed=1)
    point.capture(2, model, [optimizer], [scheduler])
    expected = states(model, optimizer, scheduler)
    train(model, optimizer, scheduler, 2, seed=2)

    assert point.restore(model, [optimizer], [scheduler]) == 2
    assert_same_tree(states(model, optimizer, scheduler), expected)
    # Weights and buffers, plus Adam's two moments per parameter and its step counters.
    weights = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    moments = 2 * sum(param.numel() * 4 for param in model.parameters())
    assert point.nbytes == weights + moments + 4 * len(list(model.parameters()))


def test_the_file_is_replaced_atomically_and_read_by_processes_that_do_not_write(tmp_path):
    model, optimizer, scheduler = make_run()
    writer = RollbackPoint(tmp_path / "snapshot.pt", write=True)
    reader = RollbackPoint(tmp_path / "snapshot.pt", write=False)
    for step in (0, 5):
        writer.capture(step, model, [optimizer], [scheduler])
        reader.capture(step, model, [optimizer], [scheduler])
    expected = states(model, optimizer, scheduler)
    train(model, optimizer, scheduler, 2, seed=1)

    assert [path.name for path in tmp_path.iterdir()] == ["snapshot.pt"]  # no temporary file left
    assert reader.restore(model, [optimizer], [scheduler]) == 5
    assert_same_tree(states(model, optimizer, scheduler), expected)


def test_misuse_is_refused_with_a_clear_error():
    model, optimizer, scheduler = make_run()
    with pytest.raises(RuntimeError, match=r"restore\(\) called before any capture"):
        RollbackPoint().restore(model, [optimizer], [scheduler])
    state = capture_state(0, model, [optimizer], [scheduler])
    with pytest.raises(ValueError, match=r"captured with 1 optimizer\(s\) and 1 scheduler\(s\), got 1 and 0"):
        restore_state(state, model, [optimizer], [])
