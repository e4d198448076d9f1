"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping

import torch


def cosine_with_warmup(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    start_step: int | None = 0,
) -> float:
    """Learning-rate multiplier: linear warmup, cosine decay, then a constant floor.

    Parameters
    ----------
    step
        Optimizer step, counted from 0.
    warmup_steps
        Length of the linear warmup. During warmup the multiplier is
        ``(step + 1) / (warmup_steps + 1)``: small but positive at step 0, so the first update
        already moves the weights, and exactly 1 at ``step == warmup_steps``.
    total_steps
        Step at which the cosine reaches ``min_lr_ratio``. For every ``step >= total_steps``
        the multiplier is exactly ``min_lr_ratio``: the schedule never rises again. If
        ``total_steps <= 0`` there is no decay: warmup, then 1 for good. If
        ``warmup_steps >= total_steps > 0`` the warmup is cut short at ``total_steps`` and the
        floor follows.
    min_lr_ratio
        Floor of the multiplier, in ``[0, 1]``.
    start_step
        Step at which the schedule starts, e.g. when a frozen backbone unfreezes: the
        multiplier is 0 before it (always, with ``None``), and the warmup and the cosine count
        from it; ``total_steps`` still counts from step 0.

    Returns
    -------
    The multiplier, in ``[0, 1]``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if start_step is None or step < start_step:
        return 0.0
    step, total_steps = step - start_step, max(total_steps - start_step, 0)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
    if total_steps > 0 and step >= total_steps:
        return float(min_lr_ratio)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if total_steps <= 0:
        return 1.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    starts: Mapping[str, tuple[int | None, int]] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Wrap :func:`cosine_with_warmup` in a ``LambdaLR`` stepped once per optimizer step.

    Every parameter group keeps its own base learning rate; the multiplier scales each.

    Parameters
    ----------
    optimizer
        The optimizer whose groups' ``lr`` are the peak learning rates.
    warmup_steps, total_steps, min_lr_ratio
        See :func:`cosine_with_warmup`.
    starts
        ``{param_set: (start_step, warmup_steps)}`` for the groups of a parameter set (their
        ``"param_set"`` key, see :func:`~scforge_scvi.train._optim.build_adamw`) whose
        schedule starts later, with a warmup of its own (see :func:`cosine_with_warmup`).

    Returns
    -------
    The scheduler; with Lightning use ``{"scheduler": s, "interval": "step"}``.
    """
    if 0 < total_steps <= warmup_steps:
        warnings.warn(
            f"warmup_steps ({warmup_steps}) >= total_steps ({total_steps}): the learning rate "
            f"never reaches its peak and drops to min_lr_ratio ({min_lr_ratio}) at step "
            f"{total_steps}.",
            UserWarning,
            stacklevel=2,
        )
    # Validate the arguments now rather than at the first step.
    cosine_with_warmup(
        0, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    schedules = []
    for group in optimizer.param_groups:
        start, warmup = (starts or {}).get(group.get("param_set"), (0, warmup_steps))
        schedules.append(
            functools.partial(
                cosine_with_warmup,
                warmup_steps=warmup,
                total_steps=total_steps,
                min_lr_ratio=min_lr_ratio,
                start_step=start,
            )
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedules)


WARMUP_STEPS = 50


def default_warmup_steps(total_steps: int) -> int:
    """Warmup of the default schedule: ``WARMUP_STEPS``, or a tenth of a shorter run.

    The annotation recipe of ``docs/benchmarks_annotation.md`` warms up for 50 of about 1,000
    steps; a run of a few hundred steps or fewer would otherwise spend most of it warming up.
    """
    return min(WARMUP_STEPS, max(0, int(total_steps)) // 10)


PRETRAIN_EPOCHS = 10
FINETUNE_STEPS = 1_000


def default_max_epochs(objective: str, n_train: int, batch_size: int) -> int:
    """Epochs of a training run whose ``max_epochs`` is not given.

    Pretraining: ``PRETRAIN_EPOCHS``. A task head (``classify`` / ``regress``): enough epochs
    for about ``FINETUNE_STEPS`` optimizer steps, between 5 and 100, so that small and large
    datasets get a similar number of updates (`docs/benchmarks_annotation.md` has the
    measurements behind the figure).
    """
    if objective == "pretrain":
        return PRETRAIN_EPOCHS
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return int(min(100, max(5, math.ceil(FINETUNE_STEPS / steps_per_epoch))))
