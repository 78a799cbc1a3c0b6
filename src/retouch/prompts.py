"""Counting prompt tokens with the checkpoint's own tokenizer, without torch.

The API refuses over-long prompts at the door when the tokenizer file is at
hand (a local checkpoint, the demo, or a Hugging Face cache); the worker checks
again with the loaded pipeline's tokenizer in every case.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from retouch.errors import InvalidInputError
from retouch.models import DEMO, FIXTURE, ModelSpec

log = logging.getLogger(__name__)

_TOKENIZER_FILE = "tokenizer/tokenizer.json"
MAX_PROMPT_TOKENS = 2000


def ensure_prompt_fits(tokens: int | None) -> None:
    """Refuse a prompt longer than the limit (None: its length is not known here)."""
    if tokens is not None and tokens > MAX_PROMPT_TOKENS:
        raise InvalidInputError(
            f"the prompt is {tokens} tokens long by the model's tokenizer; "
            f"the limit is {MAX_PROMPT_TOKENS}",
            param="prompt",
        )


class PromptTokenCounter:
    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def count(self, spec: ModelSpec, prompt: str) -> int | None:
        """Tokens in `prompt`, or None when this model's tokenizer is not at hand."""
        tokenizer = self._tokenizer(spec)
        if tokenizer is None:
            return None
        return len(tokenizer.encode(prompt, add_special_tokens=False).ids)

    def _tokenizer(self, spec: ModelSpec) -> Any:
        with self._lock:
            if spec.checkpoint not in self._tokenizers:
                self._tokenizers[spec.checkpoint] = self._load(spec.checkpoint)
            return self._tokenizers[spec.checkpoint]

    def _load(self, checkpoint: str) -> Any:
        path = self._find(checkpoint)
        if path is None:
            return None
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(path))
        except Exception:
            log.warning("could not read the tokenizer at %s; the worker will count", path)
            return None

    def _find(self, checkpoint: str) -> Path | None:
        if checkpoint == FIXTURE:
            return None
        base = self.models_dir / "demo" if checkpoint == DEMO else Path(checkpoint).expanduser()
        if (base / _TOKENIZER_FILE).is_file():
            return base / _TOKENIZER_FILE
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        try:
            cached = try_to_load_from_cache(checkpoint, _TOKENIZER_FILE)
        except Exception:  # not a repo id
            return None
        return Path(cached) if isinstance(cached, str) else None
