"""The HTTP endpoints. Each one parses on the event loop, then does all of its
database work in one worker-thread hop (`_in_thread`), then renders. Those that
read a body check the API key first (`_caller`): a stranger cannot make the
server read and parse megabytes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

from fastapi import APIRouter, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from retouch.accounts import MAX_IDEMPOTENCY_KEY_LENGTH
from retouch.api.auth import SECURITY, authenticate, bearer_secret
from retouch.api.errors import validation_to_error
from retouch.api.schemas import (
    ErrorResponse,
    ImageGenerationResponse,
    ModelList,
    QwenImageEditRequest,
    TaskDetail,
    UploadResponse,
    UsageResponse,
    model_info,
)
from retouch.api.service import TaskService
from retouch.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RetouchError,
)
from retouch.keys import ApiKey
from retouch.metrics import readiness_problems, render_latest
from retouch.storage import link_expires
from retouch.tasks import Task
from retouch.uploads import content_type

router = APIRouter()
SSE_POLL_SECONDS = 0.25
SSE_KEEPALIVE_SECONDS = 15.0
# How often a stream asks again whether its key still works: a key revoked (or given
# a new secret) while its holder follows a task stops the stream within this.
SSE_KEY_CHECK_SECONDS = 1.0
T = TypeVar("T")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route, in the seed's body; any route may also answer 503
    while the database is unreachable."""
    return {code: {"model": ErrorResponse, "description": "Error"} for code in (*codes, 503)}


def _service(request: Request) -> TaskService:
    return cast(TaskService, request.app.state.services)


async def _in_thread(
    request: Request,
    work: Callable[[TaskService, ApiKey], T],
    *,
    read_only: bool = False,
    key: ApiKey | None = None,
) -> T:
    """Authenticate (unless `key` is the caller's, checked already) and do the
    request's work in one worker-thread hop (or, for reads that cannot wait on a
    lock, right here)."""
    service = _service(request)
    if key is not None:
        return await run_in_threadpool(work, service, key)
    secret = bearer_secret(request)
    if not service.store.reads_never_wait:
        return await run_in_threadpool(lambda: work(service, authenticate(service.store, secret)))
    key = authenticate(service.store, secret)
    if read_only:
        return work(service, key)
    return await run_in_threadpool(work, service, key)


async def _caller(request: Request) -> ApiKey:
    """The caller's key, or the same 401 as `_in_thread` answers; for routes that
    must not read a body for someone without one."""
    secret = bearer_secret(request)
    store = _service(request).store
    if store.reads_never_wait:
        return authenticate(store, secret)
    return await run_in_threadpool(authenticate, store, secret)


async def _task_detail(
    request: Request,
    action: Callable[[TaskService, ApiKey], Task],
    *,
    read_only: bool = False,
) -> JSONResponse:
    """Act on one of the caller's tasks and answer with its detail."""
    base_url = str(request.base_url)

    def work(service: TaskService, key: ApiKey) -> dict[str, Any]:
        return service.render(action(service, key), base_url)

    return JSONResponse(await _in_thread(request, work, read_only=read_only))


M = TypeVar("M", bound=BaseModel)


async def edit_request(request: Request) -> QwenImageEditRequest:
    return await json_body(request, QwenImageEditRequest)


async def json_body(request: Request, model: type[M]) -> M:
    """Parse the body as JSON whatever its Content-Type (`curl -d` sends a form type)."""
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequestError("The request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError(
            "The request body is not valid JSON: it is nested too deeply"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_to_error(exc) from None


_CREATE_BODY = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "Extension: the same key with the same body within 24 hours "
            "returns the task the first request created, charged once; with another body, 409.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/QwenImageEditRequest"},
                "examples": {
                    "image_edit": {
                        "summary": "Image Edit",
                        "value": {
                            "model": "qwen-image-edit",
                            "prompt": "Replace the background of this image",
                            "image_urls": ["https://example.com/image1.png"],
                        },
                    }
                },
            }
        },
    },
}


# What a client can do with the task a create answers (OpenAPI links: API tools follow them).
_TASK_LINKS = {
    name: {"operationId": operation, "parameters": {"task_id": "$response.body#/id"}}
    for name, operation in (
        ("GetTaskDetail", "getTaskDetail"),
        ("CancelTask", "cancelTask"),
        ("StreamTaskEvents", "streamTaskEvents"),
        ("RedeliverCallback", "redeliverCallback"),
    )
}


@router.post(
    "/v1/images/generations",
    operation_id="createQwenImageEditGeneration",
    summary="qwen-image-edit Interface",
    tags=["Image Generation"],
    responses={
        200: {
            "model": ImageGenerationResponse,
            "description": "Image task created",
            "headers": {
                "Location": {
                    "description": "Extension: the task's detail, `/v1/tasks/{id}`",
                    "schema": {"type": "string"},
                }
            },
            "links": _TASK_LINKS,
        },
        **_errors(400, 401, 402, 403, 404, 409, 413, 429, 500, 502),
    },
    openapi_extra={**_CREATE_BODY, "security": SECURITY},
)
async def create_generation(request: Request) -> JSONResponse:
    caller = await _caller(request)  # a stranger's body is never read
    idempotency_key = _idempotency_key(request)
    body = await edit_request(request)
    base_url = str(request.base_url)

    def work(service: TaskService, key: ApiKey) -> tuple[dict[str, Any], bool]:
        task, replayed = service.create(key, body, idempotency_key, base_url)
        return service.render(task, base_url, detail=False), replayed

    rendered, replayed = await _in_thread(request, work, key=caller)
    headers = {"Location": f"/v1/tasks/{rendered['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(rendered, headers=headers)


def _idempotency_key(request: Request) -> str | None:
    """The optional `Idempotency-Key` header (Stripe's semantics): 1-255 visible ASCII."""
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY_LENGTH or not all(
        "!" <= ch <= "~" for ch in value
    ):
        raise InvalidRequestError(
            f"`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII "
            "characters (a UUID is a good choice)",
            param="Idempotency-Key",
        )
    return value


@router.get(
    "/v1/tasks/{task_id}",
    operation_id="getTaskDetail",
    summary="Get task detail",
    tags=["Task Management"],
    responses={200: {"model": TaskDetail, "description": "Task detail"}, **_errors(401, 404, 429)},
    openapi_extra={"security": SECURITY},
)
async def get_task(task_id: str, request: Request) -> JSONResponse:
    return await _task_detail(request, lambda s, key: s.get(key, task_id), read_only=True)


@router.post(
    "/v1/tasks/{task_id}/cancel",
    operation_id="cancelTask",
    summary="Cancel a task (extension)",
    description="Cancels a pending task at once and a running one within one denoising step. "
    "Cancelling a cancelled task is a no-op; a completed or failed task answers 409.",
    tags=["Task Management"],
    responses={200: {"model": TaskDetail, "description": "Task detail"}, **_errors(401, 404, 409)},
    openapi_extra={"security": SECURITY},
)
async def cancel_task(task_id: str, request: Request) -> JSONResponse:
    return await _task_detail(request, lambda s, key: s.cancel(key, task_id))


@router.post(
    "/v1/tasks/{task_id}/callback/redeliver",
    operation_id="redeliverCallback",
    summary="Send a finished task's callback again (extension)",
    description="Queues a new delivery (a new `webhook-id`) of the task detail to the task's "
    "`callback_url`. 400 when the task has no callback_url; 409 while it is not finished.",
    tags=["Task Management"],
    responses={
        200: {"model": TaskDetail, "description": "Task detail"},
        **_errors(400, 401, 404, 409),
    },
    openapi_extra={"security": SECURITY},
)
async def redeliver_callback(task_id: str, request: Request) -> JSONResponse:
    return await _task_detail(request, lambda s, key: s.redeliver(key, task_id))


@router.get(
    "/v1/models",
    operation_id="listModels",
    summary="List served models with their limits and price (extension)",
    tags=["Models"],
    responses={200: {"model": ModelList, "description": "Models"}, **_errors(401)},
    openapi_extra={"security": SECURITY},
)
async def list_models(request: Request) -> JSONResponse:
    def work(service: TaskService, key: ApiKey) -> list[dict[str, Any]]:
        return [model_info(spec).model_dump() for spec in service.served_models(key)]

    data = await _in_thread(request, work, read_only=True)
    return JSONResponse({"object": "list", "data": data})


@router.get(
    "/v1/tasks/{task_id}/events",
    operation_id="streamTaskEvents",
    summary="Follow a task: Server-Sent Events (extension)",
    description="`text/event-stream`: an `event: task` with the task detail at once and at "
    "every change of status or progress; after a terminal status the final detail, then the "
    "stream ends. A `: keep-alive` comment every 15 s while nothing changes. If the key "
    "stops working (revoked, or rotated to a new secret), an `event: error` with the 401 "
    "error body, then the stream ends.",
    tags=["Task Management"],
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream"},
        **_errors(401, 404),
    },
    openapi_extra={"security": SECURITY},
)
async def task_events(task_id: str, request: Request) -> StreamingResponse:
    base_url = str(request.base_url)
    first = await _in_thread(request, lambda s, key: (key, s.get(key, task_id)), read_only=True)
    key, task = first
    service = _service(request)
    secret = bearer_secret(request)
    key_checked = time.monotonic()

    def read() -> Task:
        nonlocal key_checked
        if time.monotonic() - key_checked >= SSE_KEY_CHECK_SECONDS:
            authenticate(service.store, secret)
            key_checked = time.monotonic()
        return service.get(key, task_id)

    async def events() -> AsyncIterator[str]:
        try:
            async for event in task_changes():
                yield event
        except AuthenticationError as exc:
            yield f"event: error\ndata: {json.dumps(exc.body(), separators=(',', ':'))}\n\n"

    async def task_changes() -> AsyncIterator[str]:
        current: Task | None = task
        shown: tuple[str, int] | None = None
        quiet_since = time.monotonic()
        while current is not None:
            state = (current.status.value, current.progress)
            if state != shown:
                shown = state
                quiet_since = time.monotonic()
                body = await run_in_threadpool(service.render, current, base_url)
                yield f"event: task\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"
                if current.status.is_terminal:
                    return
            elif time.monotonic() - quiet_since >= SSE_KEEPALIVE_SECONDS:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(SSE_POLL_SECONDS)
            if await request.is_disconnected():
                return
            current = read() if service.store.reads_never_wait else await run_in_threadpool(read)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/v1/uploads",
    operation_id="uploadImage",
    summary="Upload an input image (extension)",
    description="multipart/form-data with one `file`: checked like any input image "
    "(jpg, png, bmp, webp or tiff; 384-3072 px; at most 10 MB). Answers a signed `url` that "
    "`image_urls` accepts for one hour.",
    tags=["Image Generation"],
    responses={
        200: {"model": UploadResponse, "description": "The upload"},
        **_errors(400, 401, 413),
    },
    openapi_extra={
        "security": SECURITY,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                }
            },
        },
    },
)
async def upload_image(request: Request) -> JSONResponse:
    caller = await _caller(request)  # a stranger's body is never read
    service = _service(request)
    uploads = service.uploads
    if uploads is None:
        raise NotFoundError("This server does not take uploads", param="file")
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequestError(
            "Send the image as multipart/form-data in a field named `file`", param="file"
        )
    try:
        form = await request.form(max_files=1, max_fields=10)
    except RetouchError:  # a body past the size limit (413)
        raise
    except Exception as exc:  # malformed multipart bodies
        raise InvalidRequestError(f"The multipart body could not be read: {exc}") from None
    try:
        item = form.get("file")
        if item is None or isinstance(item, str):
            raise InvalidRequestError("`file` is required: one image file", param="file")
        data = await item.read()
    finally:
        await form.close()
    base_url = service.public_url or str(request.base_url)

    def work(service: TaskService, key: ApiKey) -> dict[str, Any]:
        upload = uploads.save(data, "file")
        return {
            "object": "upload",
            "id": upload.id,
            "url": uploads.link(base_url, upload),
            "expires_at": int(upload.expires_at.timestamp()),
            "bytes": upload.bytes,
            "content_type": upload.content_type,
            "width": upload.width,
            "height": upload.height,
        }

    return JSONResponse(await _in_thread(request, work, key=caller))


# The query of a signed link (a result or an upload): no API key, these instead.
_SIGNED_LINK_QUERY: dict[str, Any] = {
    "parameters": [
        {"name": "expires", "in": "query", "required": True, "schema": {"type": "integer"}},
        {"name": "signature", "in": "query", "required": True, "schema": {"type": "string"}},
    ]
}


@router.get(
    "/v1/uploads/{upload_id}",
    operation_id="downloadUpload",
    summary="An uploaded image (signed link, no API key)",
    tags=["Image Generation"],
    responses={200: {"content": {"image/*": {}}, "description": "The image"}, **_errors(403, 404)},
    openapi_extra=_SIGNED_LINK_QUERY,
)
# HEAD as every general-purpose server answers it (RFC 9110 9.1): link checkers and
# downloaders ask for the size and type first. Left out of the schema (same operation).
@router.head("/v1/uploads/{upload_id}", include_in_schema=False)
async def download_upload(upload_id: str, request: Request) -> Response:
    uploads = _service(request).uploads
    if uploads is None:
        raise NotFoundError("This server does not take uploads")
    expires, signature = _signed_link(request, "upload")
    data = await run_in_threadpool(uploads.open_signed, upload_id, expires, signature)
    return Response(data, media_type=content_type(data), headers={"Cache-Control": "private"})


@router.get(
    "/v1/usage",
    operation_id="getUsage",
    summary="The caller's credits, limits and task counts (extension)",
    tags=["Account"],
    responses={200: {"model": UsageResponse, "description": "Usage"}, **_errors(401)},
    openapi_extra={"security": SECURITY},
)
async def get_usage(request: Request) -> JSONResponse:
    return JSONResponse(await _in_thread(request, lambda s, key: s.usage(key), read_only=True))


@router.get(
    "/v1/files/{key:path}",
    operation_id="downloadResult",
    summary="Download a result image (signed link, no API key)",
    tags=["Task Management"],
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG"},
        **_errors(403, 404),
    },
    openapi_extra=_SIGNED_LINK_QUERY,
)
@router.head("/v1/files/{key:path}", include_in_schema=False)
async def download_result(key: str, request: Request) -> FileResponse:
    expires, signature = _signed_link(request, "result")
    storage = _service(request).storage
    path = await run_in_threadpool(storage.open_signed, key, expires, signature)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private"})


def _signed_link(request: Request, what: str) -> tuple[int, str]:
    """A signed link's `expires` (a Unix time) and `signature`; 403, as for a
    signature that does not match, when either is missing or malformed."""
    expires = request.query_params.get("expires", "")
    signature = request.query_params.get("signature", "")
    if not expires or not signature:
        raise PermissionDeniedError(
            f"This {what} link is incomplete: `expires` and `signature` are required",
            param="signature",
        )
    seconds = link_expires(expires)
    if seconds is None:
        raise PermissionDeniedError(
            f"This {what} link is invalid: `expires` is not a Unix time", param="expires"
        )
    return seconds, signature


@router.get("/healthz", tags=["Operations"], summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["Operations"],
    summary="Readiness: the database and the result storage answer",
    responses={503: {"description": "Not ready; `problems` says why"}},
)
async def readyz(request: Request) -> JSONResponse:
    service = _service(request)
    problems = await run_in_threadpool(readiness_problems, service.store, service.storage)
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready", "problems": []})


@router.get(
    "/metrics",
    tags=["Operations"],
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics_registry
    body, content_type = await run_in_threadpool(render_latest, registry)
    return Response(body, media_type=content_type)
