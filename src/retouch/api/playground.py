"""The playground: a small page at `/playground` for trying the API in a browser.

Static files shipped in the package (`retouch/playground/`), no build step and
nothing fetched from elsewhere. The page calls the API with relative URLs on
its own origin, sending the key it is given as a Bearer token.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

router = APIRouter(include_in_schema=False)

_ASSETS = files("retouch").joinpath("playground")

# Scripts, styles and API calls from this origin only; images also from result links
# (object storage may presign them on another host) and from the page's own blobs.
_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data: http: https:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_COMMON_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _asset(name: str, media_type: str, **headers: str) -> Response:
    body = _ASSETS.joinpath(name).read_bytes()
    return Response(body, media_type=media_type, headers={**_COMMON_HEADERS, **headers})


@router.get("/")
def root() -> RedirectResponse:
    # Relative, so that it also lands right behind a path prefix.
    return RedirectResponse("playground", status_code=307)


@router.get("/playground")
def playground_page() -> Response:
    return _asset(
        "index.html",
        "text/html; charset=utf-8",
        **{"Content-Security-Policy": _CONTENT_SECURITY_POLICY},
    )


@router.get("/playground/app.js")
def playground_script() -> Response:
    return _asset("app.js", "text/javascript; charset=utf-8")


@router.get("/playground/style.css")
def playground_style() -> Response:
    return _asset("style.css", "text/css; charset=utf-8")
