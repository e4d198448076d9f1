"""Load weights into a module whose rows are named: genes, perturbations or batches.

A perturbation model initialised from another one may have its genes in another order, new
perturbations or other batches. Tensors indexed by such names are matched row by row
(:func:`remap`); every other tensor is loaded when its shape fits and skipped otherwise, and
everything is reported (:func:`load_by_name`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from scforge_scvi._logging import logger

REPORT_KINDS = ("loaded", "remapped", "skipped_shape", "initialised", "unexpected")


def remap(
    source: torch.Tensor, target: torch.Tensor, old: Sequence[str], new: Sequence[str], axis: int
) -> tuple[torch.Tensor, int] | None:
    """Copy the entries of ``source`` whose names (along ``axis``) recur in ``new``.

    Returns the merged tensor (``target``'s values for new names) and the number of matched
    names, or ``None`` when the other axes do not fit.
    """
    other = [d for d in range(source.dim()) if d != axis]
    if source.dim() != target.dim() or any(source.shape[d] != target.shape[d] for d in other):
        return None
    position = {name: i for i, name in enumerate(old)}
    pairs = [(j, position[name]) for j, name in enumerate(new) if name in position]
    out = target.detach().clone()
    if pairs:
        dst, src = (torch.tensor(x, dtype=torch.long) for x in zip(*pairs))
        out.index_copy_(axis, dst, source.index_select(axis, src).to(out.dtype))
    return out, len(pairs)


def load_by_name(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    axes: Mapping[str, tuple[int, str]],
    saved_names: Mapping[str, Sequence[str]],
    names: Mapping[str, Sequence[str]],
    *,
    rebuilt: Sequence[str] = (),
) -> dict[str, list[str]]:
    """Load what fits into ``module``; return and log what was loaded, remapped, skipped and
    initialised.

    Parameters
    ----------
    module
        The new module.
    state
        The saved weights.
    axes
        ``{tensor: (axis, what)}``: tensors whose ``axis`` is indexed by the names ``what``.
    saved_names, names
        ``{what: [...]}`` of the saved weights and of ``module``.
    rebuilt
        Tensors the new module built itself (counted as loaded, never copied).

    Returns
    -------
    ``{kind: [tensor, ...]}`` for each kind of :data:`REPORT_KINDS`; remapped and skipped
    entries carry a note in parentheses.
    """
    current = module.state_dict()
    merged = dict(current)
    report: dict[str, list[str]] = {kind: [] for kind in REPORT_KINDS}
    for key, target in current.items():
        if key not in state:
            report["initialised"].append(key)
            continue
        source = state[key]
        if key in rebuilt:
            report["loaded"].append(key)
            continue
        if key in axes:
            axis, what = axes[key]
            old, new = list(saved_names.get(what, [])), list(names[what])
            if old != new:
                remapped = remap(source, target, old, new, axis)
                if remapped is not None:
                    merged[key], n_shared = remapped
                    report["remapped"].append(f"{key} ({n_shared}/{len(new)} {what} matched)")
                    continue
        if tuple(source.shape) != tuple(target.shape):
            report["skipped_shape"].append(
                f"{key} (checkpoint {tuple(source.shape)}, model {tuple(target.shape)})"
            )
            continue
        merged[key] = source
        report["loaded"].append(key)
    report["unexpected"] = sorted(set(state) - set(current))
    module.load_state_dict(merged)
    logger.info(
        "Loaded %d tensors, remapped %d by name, skipped %d for shape, initialised %d, "
        "ignored %d unexpected.",
        *(len(report[k]) for k in REPORT_KINDS),
    )
    for kind in REPORT_KINDS[1:]:
        if report[kind]:
            logger.warning("%s: %s", kind, ", ".join(report[kind]))
    return report
