"""The YAML configuration schema behind the ``scforge`` command line.

>>> from scforge_scvi.config import ScForgeConfig
>>> config = ScForgeConfig.from_yaml("finetune_config.yaml", overrides=["training.max_epochs=1"])

See :mod:`scforge_scvi.config._schema` for how relative paths, sequence lengths and the
fine-tuning strategy are interpreted.
"""

from ._errors import ConfigError
from ._overrides import apply_overrides
from ._schema import (
    NAMED_GENE_VOCABS,
    DataConfig,
    MaskingConfig,
    ModelConfig,
    PreprocessingConfig,
    ScForgeConfig,
    TokenizerConfig,
)
from ._training import (
    DEFAULT_LORA_TARGET_MODULES,
    BenchmarkSpec,
    FinetuneConfig,
    FinetuneStrategy,
    HeadConfig,
    LoraConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
)

__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "NAMED_GENE_VOCABS",
    "BenchmarkSpec",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "FinetuneStrategy",
    "HeadConfig",
    "LoraConfig",
    "MaskingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PreprocessingConfig",
    "ScForgeConfig",
    "SchedulerConfig",
    "TokenizerConfig",
    "TrainingConfig",
    "apply_overrides",
]
