import math

import pytest
import torch

from scforge_scvi.nn import MultiHeadSelfAttention, key_padding_attention_mask


def _attention(dropout: float = 0.0) -> MultiHeadSelfAttention:
    torch.manual_seed(0)
    return MultiHeadSelfAttention(16, 4, dropout)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(3, 6, 16)
    lengths = torch.tensor([6, 4, 1])
    padding_mask = torch.arange(6)[None, :] < lengths[:, None]  # (B, L)
    return x, padding_mask


def _manual_attention(attn: MultiHeadSelfAttention, x, padding_mask):
    B, L, d = x.shape
    H, D = attn.num_heads, attn.head_dim

    def heads(t):
        return t.view(B, L, H, D).transpose(1, 2)

    q = heads(x @ attn.q_proj.weight.T + attn.q_proj.bias)
    k = heads(x @ attn.k_proj.weight.T + attn.k_proj.bias)
    v = heads(x @ attn.v_proj.weight.T + attn.v_proj.bias)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, L, L)
    scores = scores.masked_fill(~padding_mask[:, None, None, :], float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v  # (B, H, L, D)
    y = y.transpose(1, 2).reshape(B, L, d)
    return y @ attn.out_proj.weight.T + attn.out_proj.bias


def test_matches_manual_masked_softmax_attention():
    attn = _attention().eval()
    x, padding_mask = _batch()
    with torch.no_grad():
        out = attn(x, padding_mask)
        expected = _manual_attention(attn, x, padding_mask)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_no_mask_equals_all_real_mask():
    attn = _attention().eval()
    x, _ = _batch()
    all_real = torch.ones(3, 6, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, None), attn(x, all_real))


def test_padded_keys_do_not_change_real_positions():
    attn = _attention().eval()
    x, padding_mask = _batch()
    noisy = x.clone()
    noisy[~padding_mask] = 100.0 * torch.randn(int((~padding_mask).sum()), 16)
    with torch.no_grad():
        a, b = attn(x, padding_mask), attn(noisy, padding_mask)
    torch.testing.assert_close(a[padding_mask], b[padding_mask], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(b).all()  # padded query rows see the real keys, never an empty set


def test_sequence_without_real_tokens_stays_finite():
    attn = _attention().eval()
    x, padding_mask = _batch()
    padding_mask[2] = False
    with torch.no_grad():
        assert torch.isfinite(attn(x, padding_mask)).all()


def test_key_padding_attention_mask_shape_and_values():
    padding_mask = torch.tensor([[True, True, False], [False, False, False]])
    mask = key_padding_attention_mask(padding_mask)
    assert mask.shape == (2, 1, 1, 3)
    assert mask[0, 0, 0].tolist() == [True, True, False]
    assert mask[1, 0, 0].tolist() == [True, True, True]  # empty row: allow all, avoid NaN
    # integer masks (1 = real) read the same way
    assert torch.equal(key_padding_attention_mask(padding_mask.long()), mask)


def test_projections_run_as_modules():
    # Adapter wrappers (LoRA) replace these children; they only work if forward calls them.
    attn = _attention()
    called = []
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(attn, name).register_forward_hook(lambda m, i, o, name=name: called.append(name))
    x, padding_mask = _batch()
    attn(x, padding_mask)
    assert sorted(called) == ["k_proj", "out_proj", "q_proj", "v_proj"]


def test_attention_dropout_only_in_training():
    attn = _attention(dropout=0.5)
    x, padding_mask = _batch()
    attn.eval()
    with torch.no_grad():
        torch.testing.assert_close(attn(x, padding_mask), attn(x, padding_mask))
    attn.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(attn(x, padding_mask), attn(x, padding_mask))


@pytest.mark.parametrize("num_heads", [1, 2, 8])
def test_head_counts(num_heads):
    attn = MultiHeadSelfAttention(16, num_heads).eval()
    x, padding_mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            attn(x, padding_mask), _manual_attention(attn, x, padding_mask), atol=1e-5, rtol=1e-5
        )
