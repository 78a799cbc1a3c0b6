"""Wire shapes, named as in the seed's schema (`QwenImageEditRequest`,
`ImageGenerationResponse`, `TaskDetail`, …). Fields the seed lacks are our
documented extensions and are all optional."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from retouch.models import ModelSpec
from retouch.tasks import MAX_SEED

MAX_IMAGES = 3
MAX_URL_LENGTH = 2048  # the seed's limit for callback_url
# The seed states none for image_urls. Presigned links (an S3 one with a session token
# runs to ~2-3 KB) must pass; 8 KB is the request line most HTTP servers accept.
MAX_IMAGE_URL_LENGTH = 8192
# ASCII digits without leading zeros (`\d` takes any script's digits), `x` or the
# provider's `*` between them.
_SIZE = re.compile(r"([1-9][0-9]{0,4})[x*]([1-9][0-9]{0,4})")
# The characters RFC 3986 allows in a URI, with well-formed percent-escapes.
_URI = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")

# The URL shapes the validators accept, stated in the schema for API tools (the validators
# also check hosts, lengths and encodings).
_IMAGE_URL: dict[str, Any] = {
    "format": "uri",
    "pattern": "^([Hh][Tt][Tt][Pp][Ss]?://|[Dd][Aa][Tt][Aa]:)",
}
_CALLBACK_URL: dict[str, Any] = {"format": "uri", "pattern": "^[Hh][Tt][Tt][Pp][Ss]://"}

TaskStatusName = Literal["pending", "processing", "completed", "failed", "cancelled"]


class QwenImageEditRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Model name", examples=["qwen-image-edit"])
    prompt: str = Field(
        max_length=2000,
        description="How to edit the input image(s); at most 2000 characters "
        "and 2000 tokens of the model's tokenizer",
        examples=["Replace the background of this image"],
    )
    image_urls: list[Annotated[str, Field(json_schema_extra=_IMAGE_URL)]] = Field(
        min_length=1,
        max_length=MAX_IMAGES,
        description="1-3 http(s) URLs of the input images: jpg, png, bmp, webp or tiff, "
        "width and height within 384-3072 pixels, at most 10 MB each. The content is "
        "checked, not the extension. Extensions: `data:image/<type>;base64,…` URIs, and "
        "the links `POST /v1/uploads` answers.",
        examples=[["https://example.com/image1.png"]],
    )
    callback_url: Annotated[str, Field(json_schema_extra=_CALLBACK_URL)] | None = Field(
        default=None,
        max_length=MAX_URL_LENGTH,
        description="HTTPS address called with the task detail once the task is "
        "completed, failed or cancelled (stored; delivery is signed)",
    )
    n: StrictInt = Field(default=1, ge=1, le=6, description="Extension: number of results")
    seed: StrictInt | None = Field(
        default=None, ge=0, le=MAX_SEED, description="Extension: random seed for reproducibility"
    )
    negative_prompt: str | None = Field(
        default=None, max_length=500, description="Extension: what to avoid"
    )
    size: str | None = Field(
        default=None,
        description="Extension: output size `WxH`, each side 512-2048 and a multiple of 16; "
        "default: about 1 megapixel at the aspect ratio of the last input image, fitted "
        "within those bounds and the model's max output side",
        examples=["1024x1024"],
    )
    prompt_extend: StrictBool = Field(
        default=False,
        description="Extension: accepted only as false (not offered)",
        json_schema_extra={"const": False},
    )
    watermark: StrictBool = Field(
        default=False,
        description="Extension: accepted only as false (not offered)",
        json_schema_extra={"const": False},
    )

    @field_validator("image_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for index, url in enumerate(urls):
            if url[:5].lower() == "data:":
                continue  # decoded and checked at submission (retouch.uploads)
            problem = url_problem(url, ("http", "https"), MAX_IMAGE_URL_LENGTH)
            if problem:
                raise ValueError(f"image_urls[{index}] {problem}")
        return urls

    @field_validator("callback_url")
    @classmethod
    def _check_callback(cls, url: str | None) -> str | None:
        if url is not None:
            problem = url_problem(url, ("https",))
            if problem:
                raise ValueError(f"callback_url {problem}")
        return url

    @field_validator("size")
    @classmethod
    def _check_size(cls, size: str | None) -> str | None:
        if size is not None:
            parse_size(size)
        return size

    @field_validator("prompt_extend", "watermark")
    @classmethod
    def _only_false(cls, value: bool) -> bool:
        if value:
            raise ValueError("is not offered by this server; send false or leave it out")
        return value


def parse_size(size: str) -> tuple[int, int]:
    match = _SIZE.fullmatch(size.strip())
    if not match:
        raise ValueError(f"must look like 1024x1024 (width x height), not {size!r}")
    width, height = int(match[1]), int(match[2])
    for side in (width, height):
        if not 512 <= side <= 2048 or side % 16:
            raise ValueError(
                f"{size!r}: each side must be within 512-2048 pixels and a multiple of 16"
            )
    return width, height


def url_problem(url: str, schemes: tuple[str, ...], max_length: int = MAX_URL_LENGTH) -> str | None:
    """What makes `url` unusable as an absolute URL of one of `schemes`, or None."""
    if len(url) > max_length:
        return f"is longer than {max_length} characters"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a valid URL"
    if parts.scheme.lower() not in schemes:
        allowed = " or ".join(schemes)
        return f"must be an {allowed} URL, not {url[:80]!r}"
    if not parts.netloc or not parts.hostname:
        return f"has no host: {url[:80]!r}"
    if not _URI.fullmatch(url):
        return (
            f"is not a URI: {url[:80]!r} (percent-encode spaces and non-ASCII characters; "
            "write an international domain name in its xn-- form)"
        )
    return None


class TaskInfo(BaseModel):
    can_cancel: bool = Field(description="Whether the task can be cancelled")
    estimated_time: Annotated[int, Field(ge=0)] = Field(
        description="Estimated seconds until completion"
    )


class Usage(BaseModel):
    billing_rule: Literal["per_call", "per_token", "per_second"] = "per_call"
    credits_reserved: Annotated[float, Field(ge=0)]
    user_group: Literal["default", "vip"]


class TaskErrorInfo(BaseModel):
    """Extension: why a failed task failed."""

    code: int
    message: str
    type: str
    param: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int = Field(description="Task creation timestamp (Unix seconds)")
    id: str = Field(examples=["task-unified-1757156493-imcg5zqt"])
    model: str
    object: Literal["image.generation.task"] = "image.generation.task"
    progress: Annotated[int, Field(ge=0, le=100)]
    status: TaskStatusName = Field(description="`cancelled` is an extension of the seed")
    task_info: TaskInfo
    type: Literal["image"] = "image"
    usage: Usage


class CallbackState(BaseModel):
    """Extension: the delivery of the task's callback."""

    status: Literal["waiting", "pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None = None


class TaskDetail(ImageGenerationResponse):
    results: list[str] | None = Field(
        default=None, description="Result links once completed; valid for 24 hours by default"
    )
    error: TaskErrorInfo | None = Field(default=None, description="Extension: on failed tasks")
    callback: CallbackState | None = Field(
        default=None, description="Extension: on tasks with a callback_url"
    )


class ModelDefaults(BaseModel):
    steps: int
    true_cfg_scale: float
    negative_prompt: str | None


class ModelInfo(BaseModel):
    """Extension: a served model, its limits and its price."""

    id: str
    object: Literal["model"] = "model"
    family: Literal["edit", "edit-plus"]
    max_images: int
    max_output_side: int
    price_per_image: float
    user_groups: list[str]
    defaults: ModelDefaults
    lora: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


def model_info(spec: ModelSpec) -> ModelInfo:
    return ModelInfo(
        id=spec.name,
        family=spec.family,
        max_images=spec.max_images,
        max_output_side=spec.max_output_side,
        price_per_image=spec.price,
        user_groups=list(spec.user_groups),
        defaults=ModelDefaults(
            steps=spec.effective_steps,
            true_cfg_scale=spec.effective_true_cfg_scale,
            negative_prompt=spec.negative_prompt,
        ),
        lora=Path(spec.lora.source).name if spec.lora else None,
    )


class UploadResponse(BaseModel):
    object: Literal["upload"] = "upload"
    id: str
    url: str = Field(description="Signed link that `image_urls` accepts until `expires_at`.")
    expires_at: int
    bytes: int
    content_type: str
    width: int
    height: int


class AccountRef(BaseModel):
    id: str
    name: str


class Credits(BaseModel):
    balance: float = Field(description="Granted less captured.")
    reserved: float = Field(description="Held for unfinished tasks.")
    available: float = Field(description="What new tasks may reserve.")


class AccountLimits(BaseModel):
    requests_per_minute: int = Field(description="Task creations per minute.")
    max_concurrent_tasks: int = Field(description="Unfinished tasks at a time.")


class UsageResponse(BaseModel):
    object: Literal["usage"] = "usage"
    account: AccountRef
    user_group: Literal["default", "vip"]
    credits: Credits
    limits: AccountLimits
    tasks: dict[str, int] = Field(description="The account's tasks by status.")


class ErrorBody(BaseModel):
    code: int
    message: str
    type: str
    param: str | None = None
    fallback_suggestion: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
