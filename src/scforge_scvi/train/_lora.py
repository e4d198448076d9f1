"""LoRA adapters over peft: inject, freeze, save, load and merge.

:func:`apply_lora` wraps selected ``nn.Linear`` modules of any module in place with peft's
LoRA layers (``out = base(x) + B(A(dropout(x))) * alpha / rank``, ``B`` initialised to zero,
so the adapted module starts out equal to the base). Only the adapter weights stay trainable.
While adapters are attached, a wrapped layer's base weight is stored under
``<name>.base_layer.weight``; :func:`merge_lora` folds the adapters into the base weights and
restores the original module and state-dict keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from scforge_scvi._settings import from_known_keys
from scforge_scvi.io._adapters import LORA_KEY as _LORA_KEY
from scforge_scvi.nn._dropout import Dropout

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "linear1", "linear2")
_ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """Which linear layers get LoRA adapters, and their size.

    Parameters
    ----------
    rank
        Rank ``r`` of the update ``B @ A``.
    alpha
        Scale numerator: the update is multiplied by ``alpha / rank``.
    dropout
        Dropout on the adapter input, in ``[0, 1)``.
    target_modules
        Names of the ``nn.Linear`` modules to adapt, matched against the qualified module name
        exactly or as its last dotted component(s) (``"q_proj"`` matches
        ``"blocks.0.attn.q_proj"``). The default covers attention and feed-forward layers of
        :class:`~scforge_scvi.nn.ScForgeBackbone`.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraSettings.rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ValueError(f"LoraSettings.alpha must be positive, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)  # lists come back from JSON
        if not self.target_modules or not all(
            isinstance(t, str) and t for t in self.target_modules
        ):
            raise ValueError(
                "LoraSettings.target_modules must be a non-empty sequence of module names, "
                f"got {self.target_modules!r}."
            )

    @property
    def scaling(self) -> float:
        """Multiplier of the adapter update, ``alpha / rank``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary (``target_modules`` as a list)."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSettings:
        """Build settings from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        return from_known_keys(cls, d)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def lora_layer_names(module: nn.Module) -> list[str]:
    """Qualified names of the modules that currently carry LoRA adapters."""
    return [name for name, sub in module.named_modules() if isinstance(sub, LoraLayer)]


def apply_lora(module: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA adapters into ``module`` in place and freeze everything else in it.

    Parameters
    ----------
    module
        Any module, typically a :class:`~scforge_scvi.nn.ScForgeBackbone`.
    settings
        Rank, alpha, dropout and target module names.

    Returns
    -------
    The same module object, adapted. Within it only parameters whose name contains
    ``"lora_"`` keep ``requires_grad=True``.

    Raises
    ------
    ValueError
        If no ``nn.Linear`` module matches ``settings.target_modules`` (the message lists the
        available names), or if the module already carries LoRA adapters.
    """
    if lora_layer_names(module):
        raise ValueError(
            "This module already carries LoRA adapters; call merge_lora() before applying new ones."
        )
    linear_names = [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
    targets = [
        name for name in linear_names if any(_matches(name, t) for t in settings.target_modules)
    ]
    if not targets:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise ValueError(
            f"No nn.Linear module matches LoRA target_modules {list(settings.target_modules)}. "
            f"Available Linear module names (last component): {suffixes}."
        )
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,  # exact qualified names: only the Linear modules found above
        bias="none",
    )
    peft.inject_adapter_in_model(config, module, adapter_name=_ADAPTER_NAME)
    if settings.dropout > 0:  # the same dropout as the backbone's, cheaper on the CPU
        for sub in module.modules():
            if isinstance(sub, LoraLayer) and _ADAPTER_NAME in sub.lora_dropout:
                sub.lora_dropout[_ADAPTER_NAME] = Dropout(settings.dropout)
    for name, param in module.named_parameters():
        param.requires_grad_(_LORA_KEY in name)
    return module


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed as in ``module.state_dict()`` (detached copies)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if _LORA_KEY in k}


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_lora_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter weights saved by :func:`lora_state_dict` into an adapted module.

    Parameters
    ----------
    module
        A module prepared with :func:`apply_lora` using the same settings.
    state_dict
        Adapter weights. Every adapter key of ``module`` must be present and no other key.

    Raises
    ------
    KeyError
        Naming the missing and unexpected keys when the two sets differ.
    """
    expected = {k for k in module.state_dict() if _LORA_KEY in k}
    if not expected:
        raise ValueError("The module has no LoRA adapters; call apply_lora() first.")
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise KeyError(
            f"LoRA state dict does not match the module: missing {len(missing)} key(s) "
            f"[{_preview(missing)}], unexpected {len(unexpected)} key(s) "
            f"[{_preview(unexpected)}]. Were the adapters built with the same LoraSettings?"
        )
    # Key sets were compared above; strict=False only skips the (frozen) base weights.
    module.load_state_dict(state_dict, strict=False)


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove the LoRA layers.

    Each adapted layer becomes its original ``nn.Linear`` again, with
    ``W <- W + B @ A * alpha / rank``; ``state_dict()`` keys are the original ones. The
    ``requires_grad`` flags are left as they are (base weights stay frozen).

    Parameters
    ----------
    module
        A module adapted with :func:`apply_lora`.

    Returns
    -------
    The same module object, now a plain module.
    """
    names = lora_layer_names(module)
    if not names:
        raise ValueError("The module has no LoRA adapters to merge.")
    for name in names:
        layer = module.get_submodule(name)
        layer.merge()
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child_name, layer.get_base_layer())
    if "peft_config" in vars(module):  # set by peft on injection
        del module.peft_config
    return module


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` number of parameters of ``module``."""
    params = list(module.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)
