"""Ready-made generation pipelines with diffattn presets (installed as ``diffattn.pipelines``)."""

from .embedded import (
    EMBEDDED_DEFAULTS,
    EmbeddedDefaults,
    build_embedded_wan_pipeline,
    save_embedded_wan_pipeline,
)
from .load import (
    EMBEDDED_MARK,
    GENERATION_KEYS,
    PIPELINE_CLASSES,
    family_of,
    is_embedded,
    load_pipeline,
)

__all__ = [
    "EMBEDDED_DEFAULTS",
    "EMBEDDED_MARK",
    "GENERATION_KEYS",
    "PIPELINE_CLASSES",
    "EmbeddedDefaults",
    "build_embedded_wan_pipeline",
    "family_of",
    "is_embedded",
    "load_pipeline",
    "save_embedded_wan_pipeline",
]
