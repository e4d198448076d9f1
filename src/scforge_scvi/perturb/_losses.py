"""Losses of the perturbation set model, in ``torch``.

Both losses compare a predicted cell set with an observed cell set of the same perturbation
and cell type. Cells of the two sets are not paired, so the comparison is distributional
(:func:`energy_distance`) or on set means (:func:`set_mean_mse`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pairwise_euclidean(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the cells of two batched sets.

    Parameters
    ----------
    x, y
        ``(B, N, G)`` and ``(B, M, G)``.
    eps
        Floor of the squared distance before the square root, so that the gradient stays
        finite where two cells coincide (the diagonal of ``x`` against itself).

    Returns
    -------
    ``(B, N, M)`` distances.
    """
    sq = (
        x.pow(2).sum(-1)[:, :, None]  # (B, N, 1)
        + y.pow(2).sum(-1)[:, None, :]  # (B, 1, M)
        - 2.0 * torch.bmm(x, y.transpose(1, 2))  # (B, N, M)
    )
    return sq.clamp_min(eps).sqrt()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance between two sets of cells, per set.

    ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` with Euclidean distances, every expectation an
    average over all pairs, the diagonal included (the V-statistic, which is never negative
    and is what cell-eval's ``edistance`` computes).

    Parameters
    ----------
    x, y
        ``(B, N, G)`` and ``(B, M, G)``; also accepts single sets ``(N, G)`` and ``(M, G)``.

    Returns
    -------
    ``(B,)`` (or a 0-d tensor for single sets).
    """
    single = x.dim() == 2
    if single:
        x, y = x[None], y[None]
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"energy_distance needs (B, N, G) and (B, M, G) tensors, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}."
        )
    cross = pairwise_euclidean(x, y).mean(dim=(1, 2))
    within_x = pairwise_euclidean(x, x).mean(dim=(1, 2))
    within_y = pairwise_euclidean(y, y).mean(dim=(1, 2))
    out = 2.0 * cross - within_x - within_y
    return out[0] if single else out


def set_mean_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the set means (pseudobulks), averaged over genes, per set.

    Parameters
    ----------
    x, y
        ``(B, N, G)`` and ``(B, M, G)``.

    Returns
    -------
    ``(B,)``.
    """
    return (x.mean(dim=1) - y.mean(dim=1)).pow(2).mean(dim=-1)


@dataclass(frozen=True)
class PerturbLossWeights:
    """Weights of the two terms of the set loss.

    Parameters
    ----------
    energy
        Weight of the per-set energy distance (the distribution of the cells).
    mean_mse
        Weight of the MSE between predicted and observed set means (the pseudobulk, what
        cell-eval's mae / mse / pearson_delta read). Plays the role of a ``decoder_weight``.
    """

    energy: float = 1.0
    mean_mse: float = 1.0

    def __post_init__(self) -> None:
        for name in ("energy", "mean_mse"):
            if getattr(self, name) < 0:
                raise ValueError(f"Loss weight {name} must be >= 0, got {getattr(self, name)}.")
        if self.energy == 0 and self.mean_mse == 0:
            raise ValueError("At least one loss weight (energy, mean_mse) must be positive.")


def perturbation_set_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: PerturbLossWeights
) -> dict[str, torch.Tensor]:
    """Weighted set loss and its terms, each averaged over the sets of the batch.

    Returns
    -------
    ``{"loss": ..., "energy": ..., "mean_mse": ...}``, 0-d tensors; the terms are unweighted
    so that each can be logged and judged on its own.
    """
    energy = energy_distance(prediction, target).mean()
    mean_mse = set_mean_mse(prediction, target).mean()
    loss = weights.energy * energy + weights.mean_mse * mean_mse
    return {"loss": loss, "energy": energy, "mean_mse": mean_mse}
