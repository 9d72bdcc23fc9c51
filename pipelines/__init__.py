"""Ready-made generation pipelines with diffattn presets (installed as ``diffattn.pipelines``)."""

from .embedded import (
    EMBEDDED_DEFAULTS,
    EmbeddedDefaults,
    build_embedded_wan_pipeline,
    save_embedded_wan_pipeline,
)
from .highres import HighResConfig, HighResResult, generate_highres, parse_highres_config
from .load import (
    EMBEDDED_MARK,
    GENERATION_KEYS,
    PIPELINE_CLASSES,
    TRANSFORMER_FAMILIES,
    family_of,
    is_embedded,
    load_pipeline,
)

__all__ = [
    "EMBEDDED_DEFAULTS",
    "EMBEDDED_MARK",
    "GENERATION_KEYS",
    "PIPELINE_CLASSES",
    "TRANSFORMER_FAMILIES",
    "EmbeddedDefaults",
    "HighResConfig",
    "HighResResult",
    "build_embedded_wan_pipeline",
    "family_of",
    "generate_highres",
    "is_embedded",
    "load_pipeline",
    "parse_highres_config",
    "save_embedded_wan_pipeline",
]
