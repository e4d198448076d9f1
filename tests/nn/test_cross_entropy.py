"""The chunked linear cross-entropy equals the plain one, in value and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scforge_scvi.nn import _cross_entropy as ce
from scforge_scvi.nn import linear_cross_entropy


def test_gradients_are_exact_in_float64():
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda *a: ce._LinearCrossEntropy.apply(*a, target), (h, w, b))


def test_matches_plain_cross_entropy_across_chunks(monkeypatch):
    monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", 300)  # 300 // 97 = 3 rows per chunk
    torch.manual_seed(0)
    h = torch.randn(20, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    b = torch.randn(97, requires_grad=True)
    target = torch.randint(0, 97, (20,))
    plain = F.cross_entropy(F.linear(h, w, b), target)
    expected = torch.autograd.grad(plain, (h, w, b))
    chunked = linear_cross_entropy(h, w, b, target)
    got = torch.autograd.grad(chunked, (h, w, b))
    torch.testing.assert_close(chunked, plain)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
