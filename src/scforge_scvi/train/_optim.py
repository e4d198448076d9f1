"""Optimizer parameter groups by a stated rule, AdamW built from named parameter sets, and
the optimizer and schedule that both training plans configure (:func:`configure_adamw`).

The rule: a tensor with two or more dimensions is decayed, unless it is an embedding table
(its name contains ``"embedding"``). Biases, LayerNorm weights and every other tensor with
fewer than two dimensions are never decayed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from scforge_scvi._logging import logger

from ._schedules import make_lr_scheduler

NamedParameters = nn.Module | Iterable[tuple[str, nn.Parameter]]
NoDecayRule = Callable[[str, torch.Tensor], bool]
_COUNT_KEYS = (
    "decay_tensors",
    "decay_params",
    "no_decay_tensors",
    "no_decay_params",
    "trainable_params",
)


def default_no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter is exempt from weight decay.

    Parameters
    ----------
    name
        Qualified parameter name, e.g. ``"blocks.0.attn.q_proj.weight"``.
    param
        The parameter.

    Returns
    -------
    ``True`` for tensors with fewer than 2 dimensions (biases, norms) and for embedding
    tables (``"embedding"`` in the name); ``False`` otherwise.
    """
    return param.dim() < 2 or "embedding" in name


def _named(params: NamedParameters) -> list[tuple[str, nn.Parameter]]:
    if isinstance(params, nn.Module):
        return list(params.named_parameters())
    named = list(params)
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(
                "Expected an nn.Module or an iterable of (name, parameter) pairs such as "
                f"module.named_parameters(); got an item of type {type(item).__name__}."
            )
    return named


def parameter_groups(
    params: NamedParameters,
    *,
    weight_decay: float,
    lr: float,
    name: str = "params",
    no_decay_rule: NoDecayRule = default_no_decay,
    include_frozen: bool = True,
) -> list[dict[str, Any]]:
    """Split parameters into a decayed and a non-decayed optimizer group.

    Parameters
    ----------
    params
        A module, or ``(name, parameter)`` pairs (e.g. ``module.named_parameters()``).
    weight_decay
        Weight decay of the decayed group.
    lr
        Learning rate of both groups.
    name
        Name of this parameter set; groups are named ``f"{name}.decay"`` and
        ``f"{name}.no_decay"`` and carry ``"param_set": name``.
    no_decay_rule
        ``(name, param) -> bool``, ``True`` for parameters that must not be decayed.
        Defaults to :func:`default_no_decay`.
    include_frozen
        Keep parameters with ``requires_grad=False``. Leave it on for gradual unfreezing:
        frozen backbone parameters must be in the optimizer from the start so that, once
        unfrozen, they train with their own learning rate. (AdamW skips parameters without a
        gradient, so frozen entries cost nothing while frozen.)

    Returns
    -------
    A list of at most two group dicts (empty groups are left out), each with keys
    ``"name"``, ``"param_set"``, ``"params"``, ``"lr"`` and ``"weight_decay"``.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param_name, param in _named(params):
        if not include_frozen and not param.requires_grad:
            continue
        (no_decay if no_decay_rule(param_name, param) else decay).append(param)
    groups = [
        {"name": f"{name}.decay", "params": decay, "weight_decay": weight_decay},
        {"name": f"{name}.no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [{**g, "param_set": name, "lr": lr} for g in groups if g["params"]]


def build_adamw(
    param_sets: Mapping[str, tuple[NamedParameters, float]],
    *,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    no_decay_rule: NoDecayRule = default_no_decay,
    include_frozen: bool = True,
) -> torch.optim.AdamW:
    """Build AdamW from named parameter sets, each with its own learning rate.

    Parameters
    ----------
    param_sets
        ``{set_name: (module_or_named_parameters, lr)}``, for example
        ``{"backbone": (backbone, 1e-5), "head": (head, 1e-3)}``. Each set is split into
        decayed and non-decayed groups by :func:`parameter_groups`.
    weight_decay
        Weight decay of the decayed groups.
    betas, eps
        AdamW hyper-parameters.
    no_decay_rule, include_frozen
        See :func:`parameter_groups`.

    Returns
    -------
    The optimizer. :func:`parameter_group_summary` reports what went where.
    """
    groups: list[dict[str, Any]] = []
    owner: dict[int, str] = {}
    for set_name, spec in param_sets.items():
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise TypeError(
                f"param_sets[{set_name!r}] must be a (module_or_named_parameters, lr) tuple, "
                f"got {type(spec).__name__}."
            )
        params, lr = spec
        named = _named(params)
        for param_name, param in named:
            if id(param) in owner and owner[id(param)] != set_name:
                raise ValueError(
                    f"Parameter {param_name!r} of set {set_name!r} is also in set "
                    f"{owner[id(param)]!r}; every parameter may belong to one set only."
                )
            owner[id(param)] = set_name
        groups += parameter_groups(
            named,
            weight_decay=weight_decay,
            lr=lr,
            name=set_name,
            no_decay_rule=no_decay_rule,
            include_frozen=include_frozen,
        )
    if not groups:
        raise ValueError(
            f"No parameters to optimise in sets {list(param_sets)} "
            f"(include_frozen={include_frozen})."
        )
    return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay)


def parameter_group_summary(
    groups: torch.optim.Optimizer | Iterable[Mapping[str, Any]],
) -> dict[str, dict[str, int]]:
    """Count tensors and parameters per set, decayed versus not.

    Parameters
    ----------
    groups
        An optimizer or a list of group dicts. Groups are gathered by their ``"param_set"``
        key (falling back to ``"name"``, then ``"group{i}"``); a group counts as decayed when
        its ``weight_decay`` is non-zero.

    Returns
    -------
    ``{set_name: {"decay_tensors", "decay_params", "no_decay_tensors", "no_decay_params",
    "trainable_params"}}``.
    """
    if isinstance(groups, torch.optim.Optimizer):
        groups = groups.param_groups
    summary: dict[str, dict[str, int]] = {}
    for i, group in enumerate(groups):
        set_name = group.get("param_set", group.get("name", f"group{i}"))
        counts = summary.setdefault(set_name, dict.fromkeys(_COUNT_KEYS, 0))
        kind = "decay" if group.get("weight_decay", 0.0) else "no_decay"
        params = list(group["params"])
        counts[f"{kind}_tensors"] += len(params)
        counts[f"{kind}_params"] += sum(p.numel() for p in params)
        counts["trainable_params"] += sum(p.numel() for p in params if p.requires_grad)
    return summary


def format_parameter_summary(summary: Mapping[str, Mapping[str, int]]) -> str:
    """One line per set from :func:`parameter_group_summary`, for logs."""
    return "\n".join(
        f"{set_name}: decay {c['decay_tensors']} tensors / {c['decay_params']:,} params, "
        f"no decay {c['no_decay_tensors']} tensors / {c['no_decay_params']:,} params, "
        f"trainable {c['trainable_params']:,} params"
        for set_name, c in summary.items()
    )


def configure_adamw(
    param_sets: Mapping[str, tuple[NamedParameters, float]],
    *,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    starts: Mapping[str, tuple[int | None, int]] | None = None,
) -> dict[str, Any]:
    """AdamW over named parameter sets and its warmup + cosine schedule, stepped per step.

    What ``configure_optimizers`` of both training plans returns; the groups are logged.

    Parameters
    ----------
    param_sets, weight_decay, betas
        See :func:`build_adamw`.
    total_steps, warmup_steps, min_lr_ratio, starts
        See :func:`~scforge_scvi.train._schedules.make_lr_scheduler`.

    Returns
    -------
    ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval": "step"}}``.
    """
    optimizer = build_adamw(param_sets, weight_decay=weight_decay, betas=betas)
    logger.info(
        "Optimizer groups:\n%s", format_parameter_summary(parameter_group_summary(optimizer))
    )
    scheduler = make_lr_scheduler(
        optimizer,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=min_lr_ratio,
        starts=starts,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
