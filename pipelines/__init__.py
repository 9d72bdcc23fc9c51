"""Ready-made generation pipelines with diffattn presets (installed as ``diffattn.pipelines``)."""

from .embedded import (
    EMBEDDED_DEFAULTS,
    EmbeddedDefaults,
    build_embedded_wan_pipeline,
    save_embedded_wan_pipeline,
)

__all__ = [
    "EMBEDDED_DEFAULTS",
    "EmbeddedDefaults",
    "build_embedded_wan_pipeline",
    "save_embedded_wan_pipeline",
]
