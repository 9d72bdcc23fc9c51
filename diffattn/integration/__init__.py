"""diffusers integration: processors per model family, generation state, apply / remove."""

from .apply import SparseHandle, apply, remove, sparse_processors
from .core import Schedule, SparseAttentionCore
from .state import GenerationState, GenerationStateHook
from .step_cache import StepCache

__all__ = ["GenerationState", "GenerationStateHook", "Schedule", "SparseAttentionCore", "SparseHandle", "apply", "remove", "sparse_processors", "StepCache"]
