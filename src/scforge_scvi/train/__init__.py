"""Training: the Lightning plan, schedules, optimizer groups, callbacks and LoRA."""

from scforge_scvi.io._adapters import is_lora_key

from ._callbacks import (
    BestCheckpoint,
    EpochSeed,
    StreamEpoch,
    atomic_save_checkpoint,
)
from ._freezing import STRATEGIES, GradualUnfreezing, check_frozen_are_loaded, configure_strategy
from ._lora import (
    LoraSettings,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_layer_names,
    lora_state_dict,
    merge_lora,
)
from ._optim import build_adamw, parameter_group_summary, parameter_groups
from ._plans import ScForgeTrainingPlan
from ._schedules import cosine_with_warmup, make_lr_scheduler

__all__ = [
    "STRATEGIES",
    "BestCheckpoint",
    "EpochSeed",
    "GradualUnfreezing",
    "LoraSettings",
    "ScForgeTrainingPlan",
    "StreamEpoch",
    "apply_lora",
    "atomic_save_checkpoint",
    "build_adamw",
    "check_frozen_are_loaded",
    "configure_strategy",
    "cosine_with_warmup",
    "count_parameters",
    "is_lora_key",
    "load_lora_state_dict",
    "lora_layer_names",
    "lora_state_dict",
    "make_lr_scheduler",
    "merge_lora",
    "parameter_group_summary",
    "parameter_groups",
]
