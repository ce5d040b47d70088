"""Typed run configuration: dataclasses with one comment per field, YAML files mapped onto them, dotted overrides.

    schema.py      the dataclasses (RunConfig and its sections) and ConfigError
    loading.py     YAML files and `--a.b=value` overrides -> RunConfig, values parsed by field type; save_config
    validation.py  checks across fields that types cannot express
    objective.py   the keys of each denoiser.diffusion.objective: the other's refused, nulls filled with defaults
    distill.py     checks of the `distill` section (ldm distill)

Unknown keys and wrong types fail before any work with a message that names the key.
"""

from ldm.config.loading import (
    config_from_argv,
    from_dict,
    load_config,
    parse_overrides,
    renamed_sections,
    save_config,
    stage_section,
    to_dict,
)
from ldm.config.schema import (
    ConfigError,
    DataConfig,
    DegradeConfig,
    DenoiserModelConfig,
    DenoiserStageConfig,
    DiffusionConfig,
    DistillConfig,
    RunConfig,
    TextModelConfig,
    TrainConfig,
    VAELossConfig,
    VAEModelConfig,
    VAEStageConfig,
)
from ldm.config.validation import validate, validate_conditioning, validate_superres

__all__ = [
    "ConfigError", "DataConfig", "DegradeConfig", "DenoiserModelConfig", "DenoiserStageConfig", "DiffusionConfig",
    "DistillConfig", "RunConfig", "TextModelConfig", "TrainConfig", "VAELossConfig", "VAEModelConfig", "VAEStageConfig",
    "config_from_argv", "from_dict", "load_config", "parse_overrides", "renamed_sections", "save_config",
    "stage_section", "to_dict", "validate", "validate_conditioning", "validate_superres",
]
