"""The backbone's dropout: right drop rate, unbiased, reproducible, identity in eval mode."""

from __future__ import annotations

import pytest
import torch

from scforge_scvi.nn._dropout import Dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_and_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(2_000_001, requires_grad=True)  # not a multiple of four draws
    y = Dropout(p).train()(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 3e-3
    assert abs(y.mean().item() - 1.0) < 5e-3
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient = mask * scale


def test_reproducible_from_the_global_seed_and_identity_in_eval():
    layer = Dropout(0.1)
    x = torch.randn(64, 33)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, layer(x))
    assert layer.eval()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)
