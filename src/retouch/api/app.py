"""The FastAPI application. It never imports torch: inference runs in a worker."""

from __future__ import annotations

from typing import Any, cast

from fastapi import FastAPI
from pydantic import BaseModel

from retouch import __version__
from retouch.api.admin import ADMIN_SECURITY_SCHEME, AdminService
from retouch.api.admin import REQUEST_MODELS as ADMIN_REQUEST_MODELS
from retouch.api.admin import router as admin_router
from retouch.api.auth import SECURITY_SCHEMES
from retouch.api.errors import install_error_handlers
from retouch.api.limits import BodySizeLimit, RequestCheck
from retouch.api.playground import router as playground_router
from retouch.api.routes import router
from retouch.api.schemas import QwenImageEditRequest
from retouch.api.service import TaskService
from retouch.metrics import store_registry

DESCRIPTION = """\
A self-hosted server for the qwen-image-edit async task API.

Submit an edit with 1-3 image URLs, get a task id, poll `GET /v1/tasks/{id}`,
download the result links (valid 24 hours by default).

Extensions to the reference contract (all optional, all compatible): the
`cancelled` status and `POST /v1/tasks/{id}/cancel`; an `error` object on
failed tasks; `usage` on the task detail; the request fields `n`, `seed`,
`negative_prompt`, `size` (and `prompt_extend`/`watermark`, accepted only as
false); `Idempotency-Key` on create; `GET /v1/usage`; `GET /v1/models`; 402,
405, 409 and 413 errors in the seed's error shape; an admin API under
`/admin/v1` for accounts, keys and credits (admin token only).
"""


def create_app(
    service: TaskService, *, max_request_bytes: int = 1 << 20, admin: AdminService | None = None
) -> FastAPI:
    app = FastAPI(
        title="Retouch: qwen-image-edit Interface",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = service
    app.state.admin = admin
    app.state.metrics_registry = store_registry(service.store)
    routers = (router, admin_router, playground_router)
    for included in routers:
        app.include_router(included)
    install_error_handlers(app, [route for included in routers for route in included.routes])
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_middleware(RequestCheck)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, made to read like the seed's: its schema names, no 422."""
    from fastapi.openapi.utils import get_openapi

    spec = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    request_models: tuple[type[BaseModel], ...] = (QwenImageEditRequest, *ADMIN_REQUEST_MODELS)
    for model in request_models:
        request_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(request_schema.pop("$defs", {}))
        schemas[model.__name__] = request_schema
    # The models this server serves, as the seed lists its one model.
    served = sorted(cast(TaskService, app.state.services).models)
    schemas["QwenImageEditRequest"]["properties"]["model"]["enum"] = served
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    spec["components"]["securitySchemes"] = {
        **SECURITY_SCHEMES,
        "adminToken": ADMIN_SECURITY_SCHEME,
    }
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    return spec
