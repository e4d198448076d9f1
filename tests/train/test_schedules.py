import io
import math

import numpy as np
import pytest
import torch

from scforge_scvi.train._schedules import cosine_with_warmup, make_lr_scheduler


def _curve(n_steps: int, **kwargs) -> np.ndarray:
    return np.array([cosine_with_warmup(s, **kwargs) for s in range(n_steps)])


def test_warmup_rises_from_a_small_positive_value_to_one():
    curve = _curve(11, warmup_steps=10, total_steps=100)
    assert 0 < curve[0] < 0.1
    assert np.all(np.diff(curve) > 0)
    assert curve[10] == 1.0


def test_cosine_decays_monotonically_to_the_floor():
    kwargs = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    curve = _curve(111, **kwargs)
    assert np.all(np.diff(curve[10:]) <= 0)
    assert cosine_with_warmup(60, **kwargs) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert curve[-1] == 0.1


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.05])
def test_stays_at_the_floor_after_the_last_step(min_lr_ratio):
    kwargs = dict(warmup_steps=5, total_steps=50, min_lr_ratio=min_lr_ratio)
    tail = _curve(5050, **kwargs)[50:]
    assert np.all(tail == min_lr_ratio)  # exactly, for thousands of steps: never rises again


def test_no_warmup_starts_at_peak():
    assert cosine_with_warmup(0, warmup_steps=0, total_steps=10) == 1.0


def test_warmup_longer_than_training_then_floor():
    curve = _curve(30, warmup_steps=20, total_steps=10, min_lr_ratio=0.2)
    assert np.all(np.diff(curve[:10]) > 0) and curve[:10].max() < 1.0
    assert np.all(curve[10:] == 0.2)


def test_non_positive_total_steps_means_no_decay():
    curve = _curve(100, warmup_steps=4, total_steps=0)
    assert np.all(np.diff(curve[:5]) > 0)
    assert np.all(curve[4:] == 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(step=-1, warmup_steps=0, total_steps=10), "step"),
        (dict(step=0, warmup_steps=-1, total_steps=10), "warmup_steps"),
        (dict(step=0, warmup_steps=0, total_steps=10, min_lr_ratio=1.5), "min_lr_ratio"),
    ],
)
def test_invalid_arguments(kwargs, match):
    step = kwargs.pop("step")
    with pytest.raises(ValueError, match=match):
        cosine_with_warmup(step, **kwargs)


def test_scheduler_scales_each_group_from_its_own_base_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-5}])
    scheduler = make_lr_scheduler(optimizer, warmup_steps=3, total_steps=20, min_lr_ratio=0.1)
    for step in range(40):
        multiplier = cosine_with_warmup(step, warmup_steps=3, total_steps=20, min_lr_ratio=0.1)
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([1e-3 * multiplier, 1e-5 * multiplier], rel=1e-9)
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-6])


def test_scheduler_state_round_trips_with_weights_only_loading():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_lr_scheduler(optimizer, warmup_steps=2, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    fresh_opt = torch.optim.SGD([param], lr=1.0)
    fresh = make_lr_scheduler(fresh_opt, warmup_steps=2, total_steps=10)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh_opt.load_state_dict(optimizer.state_dict())
    assert fresh.last_epoch == 5
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 8)))


def test_scheduler_warns_when_warmup_covers_training():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.warns(UserWarning, match="never reaches its peak"):
        make_lr_scheduler(optimizer, warmup_steps=10, total_steps=5)
