"""The engine seam: load a model once, run edits with progress and cancellation.

Torch and diffusers are imported only inside the engine modules, lazily, so the
API process never loads them.
"""

from retouch.engine.base import EditJob, Engine, Interrupted, StepCallback, StopCheck

__all__ = ["EditJob", "Engine", "Interrupted", "StepCallback", "StopCheck"]
