"""The perturbation set model and its losses, in plain torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from scforge_scvi.perturb._losses import (
    PerturbLossWeights,
    energy_distance,
    perturbation_set_loss,
    set_mean_mse,
)
from scforge_scvi.perturb._module import PerturbationSetModel, PerturbConfig, shift_cells


def tiny_config(**overrides) -> PerturbConfig:
    base = {
        "n_genes": 12,
        "n_perturbations": 4,
        "hidden_dim": 16,
        "num_layers": 2,
        "num_heads": 2,
        "encoder_hidden_dim": 24,
        "dropout": 0.0,
        "cell_set_len": 6,
    }
    return PerturbConfig(**{**base, **overrides})


def test_output_shape_and_non_negative():
    torch.manual_seed(0)
    model = PerturbationSetModel(tiny_config())
    torch.nn.init.normal_(model.decoder.linear2.weight, std=1.0)  # make the output move
    basal = torch.rand(3, 6, 12) * 3
    out = model(basal, torch.tensor([0, 1, 3]))
    assert out.prediction.shape == (3, 6, 12)
    assert out.hidden.shape == (3, 6, 16)
    assert (out.prediction >= 0).all()
    assert (out.delta < -basal).any(), "test needs some negative raw outputs to be clipped"


def test_untrained_model_returns_its_basal_cells():
    """The decoder's last layer starts at zero: step 0 is the control-mean baseline."""
    model = PerturbationSetModel(tiny_config())
    basal = torch.rand(2, 6, 12)
    out = model(basal, torch.tensor([1, 2]))
    torch.testing.assert_close(out.prediction, basal)


def test_permuting_the_set_permutes_the_output():
    torch.manual_seed(0)
    model = PerturbationSetModel(tiny_config()).eval()
    torch.nn.init.normal_(model.decoder.linear2.weight, std=0.5)
    basal = torch.rand(2, 6, 12)
    perm = torch.randperm(6)
    out = model(basal, torch.tensor([1, 2])).prediction
    out_perm = model(basal[:, perm], torch.tensor([1, 2])).prediction
    torch.testing.assert_close(out_perm, out[:, perm], rtol=1e-5, atol=1e-6)


def test_cells_of_a_set_interact():
    """The set transformer mixes cells: changing one cell changes the others' outputs."""
    torch.manual_seed(0)
    model = PerturbationSetModel(tiny_config()).eval()
    torch.nn.init.normal_(model.decoder.linear2.weight, std=0.5)
    basal = torch.rand(1, 6, 12)
    changed = basal.clone()
    changed[0, 0] += 1.0
    a = model(basal, torch.tensor([1])).prediction[0, 1:]
    b = model(changed, torch.tensor([1])).prediction[0, 1:]
    assert not torch.allclose(a, b)


def test_perturbation_table_uses_a_learned_control_vector():
    torch.manual_seed(0)
    table = torch.randn(4, 5)
    config = tiny_config(perturbation_features="table", perturbation_dim=5, control_index=0)
    model = PerturbationSetModel(config, perturbation_table=table)
    enc = model.perturbation_encoder
    torch.testing.assert_close(enc.table, table)
    before = enc(torch.tensor([0]))
    with torch.no_grad():
        enc.table[0] = 100.0  # the control row of the table is never read
    torch.testing.assert_close(enc(torch.tensor([0])), before)
    enc(torch.tensor([0, 1])).sum().backward()
    assert enc.control_vector.grad is not None and enc.control_vector.grad.abs().sum() > 0


def test_table_shape_is_checked():
    config = tiny_config(perturbation_features="table", perturbation_dim=5)
    with pytest.raises(ValueError, match="one row per perturbation"):
        PerturbationSetModel(config, perturbation_table=torch.zeros(3, 5))


def test_extra_table_rows_and_feature_vectors_passed_directly():
    """Rows past the categories are perturbations known by features; vectors can be passed."""
    torch.manual_seed(0)
    table = torch.randn(7, 5)  # 4 categories + 3 perturbations without training cells
    config = tiny_config(perturbation_features="table", perturbation_dim=5, n_table_rows=7)
    model = PerturbationSetModel(config, perturbation_table=table)
    torch.nn.init.normal_(model.decoder.linear2.weight, std=1.0)
    basal = torch.rand(2, 6, 12)
    by_row = model(basal, torch.tensor([5, 2])).prediction
    by_vector = model(basal, torch.tensor([-1, -1]), perturbation_features=table[[5, 2]]).prediction
    torch.testing.assert_close(by_row, by_vector)
    # a control set keeps the learned control vector whatever features come with it
    enc = model.perturbation_encoder
    torch.testing.assert_close(
        enc(torch.tensor([0]), torch.full((1, 5), 9.0)), enc(torch.tensor([0]))
    )
    with pytest.raises(ValueError, match=r"features must have shape \(2, 5\)"):
        model(basal, torch.tensor([1, 2]), perturbation_features=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one_hot"):
        PerturbationSetModel(tiny_config())(
            basal, torch.tensor([1, 2]), perturbation_features=torch.zeros(2, 4)
        )
    with pytest.raises(ValueError, match="n_table_rows must be an integer >= n_perturbations"):
        tiny_config(perturbation_features="table", perturbation_dim=5, n_table_rows=3)
    with pytest.raises(ValueError, match="n_table_rows is only meaningful"):
        tiny_config(n_table_rows=7)
    assert PerturbConfig.from_dict(config.to_dict()) == config


def test_batch_embedding_is_required_iff_configured():
    model = PerturbationSetModel(tiny_config(n_batches=2))
    basal = torch.rand(2, 6, 12)
    out = model(basal, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.prediction.shape == (2, 6, 12)
    with pytest.raises(ValueError, match="n_batches"):
        model(basal, torch.tensor([1, 2]))


def test_pluggable_basal_encoder_reads_basal_input_and_counts_as_backbone():
    class CountEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 7)
            self.seen = None

        def forward(self, counts):
            self.seen = counts
            return self.proj(torch.log1p(counts))

    encoder = CountEncoder()
    weight = encoder.proj.weight.detach().clone()
    model = PerturbationSetModel(tiny_config(basal_dim=7), basal_encoder=encoder)
    torch.testing.assert_close(encoder.proj.weight, weight)  # init leaves it alone
    counts = torch.poisson(torch.full((2, 6, 12), 3.0))
    model(torch.rand(2, 6, 12), torch.tensor([1, 2]), basal_input=counts)
    assert encoder.seen.shape == (12, 12)  # (B * S, genes)
    backbone = {id(p) for m in model.backbone_modules() for p in m.parameters()}
    assert id(encoder.proj.weight) in backbone
    heads = {id(p) for m in model.head_modules() for p in m.parameters()}
    assert not backbone & heads
    assert len(backbone | heads) == len(list(model.parameters()))


def test_shifted_sets_move_their_mean_by_the_change_and_stay_non_negative():
    """The linear path's change reaches the set mean exactly, decreases included."""
    import scanpy as sc

    x = sc.datasets.pbmc68k_reduced().raw.X[:64, :40].toarray()  # log1p-normalised cells
    basal = torch.as_tensor(x, dtype=torch.float32).view(4, 16, 40)  # 4 sets of 16 cells
    mean = basal.mean(dim=1)
    change = torch.randn(4, 40, generator=torch.Generator().manual_seed(0)) * mean.clamp_min(0.1)
    shifted = shift_cells(basal, change)
    assert (shifted >= 0).all()
    reachable = mean + change >= 0
    assert (change[reachable] < 0).sum() > 20  # decreases are tested, not only increases
    torch.testing.assert_close(shifted.mean(dim=1)[reachable], (mean + change)[reachable])
    assert (shifted.mean(dim=1)[~reachable] == 0).all()  # a decrease past zero stops at zero
    clipped = torch.relu(basal + change[:, None, :]).mean(dim=1)  # what adding would give
    assert (clipped - (mean + change))[reachable & (change < 0)].max() > 0.05


def test_config_round_trip_and_validation():
    config = tiny_config(n_batches=3)
    assert PerturbConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown PerturbConfig"):
        PerturbConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(hidden_dim=15)
    with pytest.raises(ValueError, match="perturbation_dim"):
        tiny_config(perturbation_features="table")


# ------------------------------------------------------------------------------- losses
def _energy_numpy(x: np.ndarray, y: np.ndarray) -> float:
    def mean_dist(a, b):
        return np.mean([np.linalg.norm(p - q) for p in a for q in b])

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def test_energy_distance_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(1.0, 1.0, size=(7, 3))
    got = energy_distance(torch.tensor(x), torch.tensor(y))
    assert got.item() == pytest.approx(_energy_numpy(x, y), rel=1e-6)
    # two points on a line: 2*|0-3| - 0 - 0 over pairs including the diagonal
    a, b = torch.tensor([[0.0], [0.0]]), torch.tensor([[3.0], [3.0]])
    assert energy_distance(a, b).item() == pytest.approx(6.0, abs=1e-4)


def test_energy_distance_is_zero_for_identical_sets_and_has_finite_gradients():
    x = torch.rand(2, 5, 4, requires_grad=True)
    d = energy_distance(x, x.detach().clone())
    assert torch.allclose(d, torch.zeros(2), atol=1e-4)
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_energy_distance_grows_with_a_shift_and_is_batched():
    torch.manual_seed(0)
    y = torch.randn(3, 20, 4)
    d = torch.stack([energy_distance(y + s, y).mean() for s in (0.0, 0.5, 2.0)])
    assert d[0] < d[1] < d[2]
    batched = energy_distance(y + 1.0, y)
    single = torch.stack([energy_distance(y[i] + 1.0, y[i]) for i in range(3)])
    torch.testing.assert_close(batched, single)


def test_set_loss_terms_and_weights():
    x = torch.zeros(2, 3, 4)
    y = torch.ones(2, 3, 4)
    assert set_mean_mse(x, y).tolist() == [1.0, 1.0]
    terms = perturbation_set_loss(x, y, PerturbLossWeights(energy=0.5, mean_mse=3.0))
    assert terms["energy"].item() == pytest.approx(2 * 2.0, abs=1e-4)  # |x - y| = 2
    assert terms["loss"].item() == pytest.approx(0.5 * 4.0 + 3.0 * 1.0, abs=1e-4)
    with pytest.raises(ValueError, match="positive"):
        PerturbLossWeights(energy=0.0, mean_mse=0.0)
