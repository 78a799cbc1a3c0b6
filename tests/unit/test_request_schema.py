"""Every limit of the request, at its edges."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from retouch.api.errors import validation_to_error
from retouch.api.schemas import QwenImageEditRequest

URL = "https://example.com/a.png"


def body(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "qwen-image-edit", "prompt": "edit", "image_urls": [URL]}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def problem(data: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as info:
        QwenImageEditRequest.model_validate(data)
    error = validation_to_error(info.value)
    return error.param, error.message


def test_minimal_request_is_accepted_and_extras_ignored() -> None:
    request = QwenImageEditRequest.model_validate(body(unknown_field=1))
    assert (request.n, request.seed, request.size, request.callback_url) == (1, None, None, None)


@pytest.mark.parametrize("field", ["model", "prompt", "image_urls"])
def test_required_fields(field: str) -> None:
    assert problem(body(**{field: ...})) == (field, f"`{field}` is required")


def test_prompt_length_edge() -> None:
    QwenImageEditRequest.model_validate(body(prompt="x" * 2000))
    param, message = problem(body(prompt="x" * 2001))
    assert param == "prompt" and "2000" in message


@pytest.mark.parametrize("count", [1, 2, 3])
def test_one_to_three_images_accepted(count: int) -> None:
    QwenImageEditRequest.model_validate(body(image_urls=[URL] * count))


@pytest.mark.parametrize("count", [0, 4])
def test_image_count_out_of_range(count: int) -> None:
    assert problem(body(image_urls=[URL] * count)) == (
        "image_urls",
        f"`image_urls` must contain 1-3 image URLs; got {count}",
    )


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.png", "file:///etc/passwd", "example.com/a.png", "http://", ""]
)
def test_image_urls_must_be_http(url: str) -> None:
    param, message = problem(body(image_urls=[URL, url]))
    assert param == "image_urls[1]"
    assert message.startswith("image_urls[1] ")


@pytest.mark.parametrize(
    "url",
    [
        "https://bücher.example/a.png",  # an IDN host: write it as xn--…
        "https://example.com/a b.png",
        "https://example.com/\u00e9.png",
        "https://example.com/%zz.png",
        "httpS://\u0080",
        "https://example.com/a.png\n",
    ],
)
def test_urls_must_be_uris(url: str) -> None:
    """RFC 3986 characters only, as the seed's `format: uri` says: a URL with spaces,
    raw non-ASCII or broken escapes is refused at once, not fetched or called back."""
    for field, param in [("image_urls", "image_urls[0]"), ("callback_url", "callback_url")]:
        value: Any = [url] if field == "image_urls" else url.replace("http://", "https://")
        got, message = problem(body(**{field: value}))
        assert got == param and "is not a URI" in message and "percent-encode" in message


@pytest.mark.parametrize(
    "url",
    [
        "https://xn--bcher-kva.example/a%20b.png?size=1&v=%C3%A9#top",
        "http://[2001:db8::1]:8080/a.png",
        "https://example.com/~user/a_(1).png;v=2",
    ],
)
def test_uris_with_escapes_and_every_allowed_character_pass(url: str) -> None:
    assert QwenImageEditRequest.model_validate(body(image_urls=[url])).image_urls == [url]
    callback = url.replace("http://", "https://")
    assert QwenImageEditRequest.model_validate(body(callback_url=callback)).callback_url == callback


def test_image_url_must_be_a_string() -> None:
    param, _ = problem(body(image_urls=[URL, 5]))
    assert param == "image_urls[1]"


def test_an_image_url_may_be_a_long_presigned_link_up_to_8192_chars() -> None:
    """The seed limits callback_url alone; a presigned S3 link with a session token runs
    past 2048 characters and must pass."""
    base = "https://bucket.s3.amazonaws.com/a.png?X-Amz-Security-Token="
    ok = base + "A" * (8192 - len(base))
    assert QwenImageEditRequest.model_validate(body(image_urls=[URL, ok])).image_urls[1] == ok
    param, message = problem(body(image_urls=[URL, ok + "A"]))
    assert param == "image_urls[1]" and "longer than 8192 characters" in message


def test_callback_url_is_https_only_and_at_most_2048_chars() -> None:
    ok = "https://example.com/" + "a" * (2048 - len("https://example.com/"))
    QwenImageEditRequest.model_validate(body(callback_url=ok))
    assert problem(body(callback_url=ok + "a"))[0] == "callback_url"
    param, message = problem(body(callback_url="http://example.com/hook"))
    assert param == "callback_url" and "https" in message


@pytest.mark.parametrize(("n", "valid"), [(0, False), (1, True), (6, True), (7, False)])
def test_n_range(n: int, valid: bool) -> None:
    if valid:
        assert QwenImageEditRequest.model_validate(body(n=n)).n == n
    else:
        assert problem(body(n=n))[0] == "n"


def test_n_must_be_an_integer() -> None:
    assert problem(body(n="2"))[0] == "n"
    assert problem(body(n=True))[0] == "n"


@pytest.mark.parametrize(
    ("seed", "valid"), [(-1, False), (0, True), (2147483647, True), (2147483648, False)]
)
def test_seed_range(seed: int, valid: bool) -> None:
    if valid:
        assert QwenImageEditRequest.model_validate(body(seed=seed)).seed == seed
    else:
        assert problem(body(seed=seed))[0] == "seed"


def test_negative_prompt_length_edge() -> None:
    QwenImageEditRequest.model_validate(body(negative_prompt="x" * 500))
    assert problem(body(negative_prompt="x" * 501))[0] == "negative_prompt"


@pytest.mark.parametrize("size", ["512x512", "2048x2048", "512x2048", "1024*768"])
def test_valid_sizes(size: str) -> None:
    QwenImageEditRequest.model_validate(body(size=size))


@pytest.mark.parametrize(
    "size",
    [
        *["496x512", "512x2064", "520x512", "1024", "axb", "0x0", "512x512x512"],
        *["\uff15\uff11\uff12x\uff15\uff11\uff12", "\u0665\u0661\u0662x512", "0512x0512"],
    ],
)
def test_invalid_sizes(size: str) -> None:
    param, message = problem(body(size=size))
    assert param == "size" and ("512-2048" in message or "1024x1024" in message)


@pytest.mark.parametrize("field", ["prompt_extend", "watermark"])
def test_unoffered_switches_accept_only_false(field: str) -> None:
    QwenImageEditRequest.model_validate(body(**{field: False}))
    param, message = problem(body(**{field: True}))
    assert param == field and "not offered" in message
