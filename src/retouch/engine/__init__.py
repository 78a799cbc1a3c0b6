"""The engine seam: load a model once, run edits with progress and cancellation.

Torch and diffusers are imported only inside the engine modules, lazily, so the
API process never loads them.
"""

from retouch.engine.base import (
    EditJob,
    Engine,
    EngineOptions,
    Interrupted,
    StepCallback,
    StopCheck,
)

__all__ = ["EditJob", "Engine", "EngineOptions", "Interrupted", "StepCallback", "StopCheck"]
