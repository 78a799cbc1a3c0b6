"""Fuzzing the two parsers strangers feed: the create request and the image decoder.

Whatever the input, the answer is a clear refusal (the seed's 400 with a
message naming what is wrong) or an accepted value, never another exception.
`RETOUCH_FUZZ_EXAMPLES` raises the number of examples for a longer run (the
figures in docs/security.md come from one).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from retouch.api.app import create_app
from retouch.api.errors import validation_to_error
from retouch.api.schemas import QwenImageEditRequest
from retouch.api.service import TaskService
from retouch.clock import FakeClock
from retouch.errors import InvalidInputError, InvalidRequestError
from retouch.images import MAX_SIDE, MIN_SIDE, decode_image
from retouch.models import ModelSpec
from retouch.storage import LocalResultStorage
from retouch.store import Store, create_db_engine, migrate

EXAMPLES = int(os.environ.get("RETOUCH_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
VALID = {
    "model": "qwen-image-edit",
    "prompt": "make it blue",
    "image_urls": ["https://example.com/a.png"],
}
FIELDS = [
    "model", "prompt", "image_urls", "callback_url", "n", "seed", "negative_prompt",
    "size", "prompt_extend", "watermark",
]  # fmt: skip

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with some fields replaced by anything, or removed."""
    body: dict[str, Any] = dict(VALID)
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()):
            body[field] = draw(json_values)
        else:
            body.pop(field, None)
    return body


def _refusal_is_clear(error: InvalidRequestError) -> None:
    assert error.status == 400 and error.type == "invalid_request_error"
    assert isinstance(error.message, str) and error.message
    assert error.param is None or isinstance(error.param, str)


@FUZZ
@given(body=mutated_bodies() | st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_any_request_body_is_accepted_or_refused_clearly(body: dict[str, Any]) -> None:
    try:
        QwenImageEditRequest.model_validate(body)
    except Exception as exc:
        from pydantic import ValidationError

        assert isinstance(exc, ValidationError), repr(exc)
        _refusal_is_clear(validation_to_error(exc))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    """The real app (no worker) over a real SQLite store, called in-process."""
    root: Path = tmp_path_factory.mktemp("fuzz")
    engine = create_db_engine(f"sqlite:///{root / 'fuzz.db'}")
    migrate(engine)
    clock = FakeClock()
    store = Store(engine, clock)
    _key, secret = store.create_key("fuzzer", credits=1e9)
    spec = ModelSpec(name="qwen-image-edit", checkpoint="fixture", price=1.0)
    service = TaskService(store, LocalResultStorage(root / "results", b"k", clock), clock, [spec])
    with TestClient(create_app(service), raise_server_exceptions=False) as test_client:
        yield test_client, secret
    store.close()


@FUZZ
@given(raw=st.binary(max_size=2000) | st.builds(json.dumps, json_values).map(str.encode))
def test_any_raw_body_gets_the_seeds_error_or_a_task(
    client: tuple[TestClient, str], raw: bytes
) -> None:
    test_client, secret = client
    response = test_client.post(
        "/v1/images/generations",
        content=raw,
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    assert response.status_code in (200, 400), response.text
    body = response.json()
    if response.status_code == 400:
        assert set(body) == {"error"} and body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"]


def _encoded(fmt: str, size: tuple[int, int] = (400, 400)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [_encoded(fmt) for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "BMP")]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with bytes flipped, cut or inserted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        choice = draw(st.integers(0, 2))
        position = draw(st.integers(0, len(data) - 1))
        if choice == 0:
            data[position] = draw(st.integers(0, 255))
        elif choice == 1:
            del data[position:]
            if not data:
                break
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@FUZZ
@given(data=mutated_images() | st.binary(max_size=4096))
@example(data=b"II*\x00\x08\x00\x00\x00")  # a TIFF whose metadata ends at once: Pillow warned
def test_any_bytes_decode_to_a_fit_image_or_a_named_refusal(data: bytes) -> None:
    try:
        image = decode_image(data, "image_urls[0]")
    except InvalidInputError as exc:
        assert exc.param == "image_urls[0]" and exc.message
        return
    assert image.mode == "RGB"
    assert MIN_SIDE <= image.width <= MAX_SIDE and MIN_SIDE <= image.height <= MAX_SIDE
