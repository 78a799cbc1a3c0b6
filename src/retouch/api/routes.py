"""The HTTP endpoints. Each one is a few lines: parse, call the service, render."""

from __future__ import annotations

import json
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from retouch.api.auth import CurrentKey
from retouch.api.errors import validation_to_error
from retouch.api.schemas import (
    ErrorResponse,
    ImageGenerationResponse,
    QwenImageEditRequest,
    TaskDetail,
)
from retouch.api.service import TaskService
from retouch.errors import InvalidRequestError, PermissionDeniedError

router = APIRouter()


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": "Error"} for code in codes}


def _service(request: Request) -> TaskService:
    return cast(TaskService, request.app.state.services)


Service = Annotated[TaskService, Depends(_service)]


def _base_url(request: Request) -> str:
    return str(request.base_url)


async def edit_request(request: Request) -> QwenImageEditRequest:
    """Parse the body as JSON whatever its Content-Type (`curl -d` sends a form type)."""
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequestError("The request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object")
    try:
        return QwenImageEditRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_to_error(exc) from None


_CREATE_BODY = {
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
    }
}


@router.post(
    "/v1/images/generations",
    operation_id="createQwenImageEditGeneration",
    summary="qwen-image-edit Interface",
    tags=["Image Generation"],
    responses={
        200: {"model": ImageGenerationResponse, "description": "Image task created"},
        **_errors(400, 401, 403, 404, 413, 429, 500, 502, 503),
    },
    openapi_extra=_CREATE_BODY,
)
def create_generation(
    key: CurrentKey,
    body: Annotated[QwenImageEditRequest, Depends(edit_request)],
    service: Service,
    request: Request,
) -> JSONResponse:
    task = service.create(key, body)
    return JSONResponse(service.render(task, _base_url(request), detail=False))


@router.get(
    "/v1/tasks/{task_id}",
    operation_id="getTaskDetail",
    summary="Get task detail",
    tags=["Task Management"],
    responses={200: {"model": TaskDetail, "description": "Task detail"}, **_errors(401, 404, 429)},
)
def get_task(task_id: str, key: CurrentKey, service: Service, request: Request) -> JSONResponse:
    task = service.get(key, task_id)
    return JSONResponse(service.render(task, _base_url(request)))


@router.post(
    "/v1/tasks/{task_id}/cancel",
    operation_id="cancelTask",
    summary="Cancel a task (extension)",
    description="Cancels a pending task at once and a running one within one denoising step. "
    "Cancelling a cancelled task is a no-op; a completed or failed task answers 409.",
    tags=["Task Management"],
    responses={200: {"model": TaskDetail, "description": "Task detail"}, **_errors(401, 404, 409)},
)
def cancel_task(task_id: str, key: CurrentKey, service: Service, request: Request) -> JSONResponse:
    task = service.cancel(key, task_id)
    return JSONResponse(service.render(task, _base_url(request)))


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
)
def download_result(
    key: str,
    service: Service,
    expires: Annotated[str, Query()] = "",
    signature: Annotated[str, Query()] = "",
) -> FileResponse:
    if not expires.isdigit() or not signature:
        raise PermissionDeniedError(
            "This result link is incomplete: `expires` and `signature` are required",
            param="signature",
        )
    path = service.storage.open_signed(key, int(expires), signature)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private"})


@router.get("/healthz", tags=["Operations"], summary="Liveness", include_in_schema=True)
def healthz() -> dict[str, str]:
    return {"status": "ok"}
