"""The demo checkpoint: a tiny random-weight Qwen-Image-Edit-Plus, built in code.

Every component of the real checkpoint is here (transformer, VAE, Qwen2.5-VL
text encoder, tokenizer, processor, scheduler) with the real architecture and
tiny sizes, so the whole diffusers code path runs on a CPU in seconds and no
hub access is needed. Its output is noise by construction.

The latent geometry matches the real model (16 latent channels, 8x spatial
downsampling), so image sizes, token counts and the pipeline's own resizing
behave exactly as they do with a real checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retouch.errors import ModelLoadError

# A marker written last: a directory without it is an interrupted build.
COMPLETE_MARKER = "retouch-demo.json"
DEMO_FORMAT = 2

_ENDOFTEXT = "<|endoftext|>"
_SPECIAL_TOKENS = [
    _ENDOFTEXT,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The pre-tokenizer pattern of Qwen2's byte-level BPE.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = [
    "Describe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate.",
    "Replace the background of this image with a beach at sunset.",
    "Put a red scarf on the cat. Make the sky blue. Remove the person on the left.",
    "Picture 1: Picture 2: Picture 3: user assistant system",
    "0123456789 the a an of to in and with on for is are this that",
]

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def is_complete(directory: Path) -> bool:
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("format") == DEMO_FORMAT)
    except (OSError, ValueError):
        return False


def ensure_demo_checkpoint(directory: Path) -> Path:
    """Build the demo checkpoint into `directory` unless a complete one is there."""
    if is_complete(directory):
        return directory
    return write_demo_checkpoint(directory)


def write_demo_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into `directory`, safely beside other writers.

    Several workers sharing a data directory may build it at once. The build goes
    into a folder of its own, then is renamed into place in one step, so nobody
    ever sees a partial checkpoint. A lock file serialises builders on one host
    (the second finds the first's checkpoint complete and builds nothing); without
    it (another host on a network file system) a builder whose rename fails because
    a complete checkpoint is already there takes that one and drops its own copy.
    A complete checkpoint is never deleted, and a directory that is no demo
    checkpoint at all is refused rather than replaced."""
    directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        if is_complete(directory):
            return directory
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-build-", dir=directory.parent))
        try:
            pipeline = build_demo_pipeline(seed)
            pipeline.save_pretrained(staging, safe_serialization=True)
            marker = {"format": DEMO_FORMAT, "seed": seed}
            (staging / COMPLETE_MARKER).write_text(json.dumps(marker))
            _install(staging, directory)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return directory


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on a file beside `directory`, held while building it."""
    lock_path = directory.parent / f".{directory.name}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _install(staging: Path, directory: Path) -> None:
    """Rename the finished `staging` folder to `directory` in one step."""
    try:
        # rename(2) is atomic; it fails if `directory` exists and is not empty.
        os.rename(staging, directory)
        return
    except OSError:
        if is_complete(directory):
            return  # another builder got there first: theirs is as good as ours
        if not directory.is_dir() or not (directory / COMPLETE_MARKER).exists():
            raise ModelLoadError(
                f"{directory} exists and is not a Retouch demo checkpoint; remove it or "
                "choose another directory for the demo model."
            ) from None
    # A demo checkpoint of another format: move it aside (one step), then install.
    stale = Path(tempfile.mkdtemp(prefix=f".{directory.name}-stale-", dir=directory.parent))
    try:
        os.rename(directory, stale / directory.name)
        try:
            os.rename(staging, directory)
        except OSError:
            if not is_complete(directory):
                raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def build_demo_pipeline(seed: int = 0) -> Any:
    """Return an in-memory `QwenImageEditPlusPipeline` with tiny random weights."""
    import torch
    import transformers
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    transformers.utils.logging.disable_progress_bar()
    tokenizer = _build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _build_text_encoder(tokenizer)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    return QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=_build_processor(tokenizer),
        transformer=transformer,
    )


def _build_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        unk_token=None,
        eos_token=_ENDOFTEXT,
        pad_token=_ENDOFTEXT,
        model_max_length=32768,
        chat_template=_CHAT_TEMPLATE,
    )


def _build_text_encoder(tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 2, 4],
                "rope_theta": 1000000.0,
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [1],
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _build_processor(tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    clip_mean = [0.48145466, 0.4578275, 0.40821073]
    clip_std = [0.26862954, 0.26130258, 0.27577711]
    image_processor = Qwen2VLImageProcessor(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=clip_mean,
        image_std=clip_std,
    )
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=_CHAT_TEMPLATE,
    )
