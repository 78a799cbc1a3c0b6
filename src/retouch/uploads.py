"""Images sent to the server itself: `POST /v1/uploads` and `data:` URIs.

An upload is checked like any input image (format sniffed, size, bombs), kept
in the result storage under `uploads/`, and answered with a signed link,
`…/v1/uploads/<id>?expires=…&signature=…`, that `image_urls` accepts until it
expires (one hour). Workers never fetch such a link over the network: they
recognise its signature and read the bytes from the storage, so uploads work
whatever the server's address and however strict the address guard is.
Uploaded files are kept as long as results, so a task accepted with a fresh
link still finds its image however long it waited in the queue.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import parse_qs, quote, urlsplit

from retouch.clock import Clock
from retouch.errors import (
    InvalidInputError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from retouch.images import decode_image, sniff_format
from retouch.storage import UPLOADS, ResultStorage, link_expires, signature_matches

log = logging.getLogger(__name__)
UPLOAD_LINK_SECONDS = 3600
_ID = re.compile(r"^up_[0-9a-f]{24}$")
_LINK_PATH = re.compile(r"/v1/uploads/(up_[0-9a-f]{24})$")
_DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[a-z0-9=._-]+)*;base64,", re.IGNORECASE)
_CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
}


@dataclass(frozen=True)
class Upload:
    id: str
    expires_at: datetime
    bytes: int
    content_type: str
    width: int
    height: int


def content_type(data: bytes) -> str:
    """The media type of an accepted image, from its first bytes."""
    return _CONTENT_TYPES.get(sniff_format(data) or "", "application/octet-stream")


def is_data_uri(url: str) -> bool:
    return url[:5].lower() == "data:"


class Uploads:
    def __init__(
        self,
        storage: ResultStorage,
        signing_key: bytes,
        clock: Clock,
        *,
        max_bytes: int = 10 * 1024 * 1024,
        link_seconds: int = UPLOAD_LINK_SECONDS,
    ) -> None:
        self.storage = storage
        self._key = signing_key
        self.clock = clock
        self.max_bytes = max_bytes
        self.link_seconds = link_seconds

    # -- receiving ----------------------------------------------------------

    def check(self, data: bytes, param: str) -> Upload:
        """Check an image and name its upload, storing nothing yet (`keep` does);
        `InvalidInputError` naming `param` if unfit."""
        if len(data) > self.max_bytes:
            raise InvalidInputError(
                f"the image is {len(data):,} bytes; at most {self.max_bytes:,} are accepted",
                param=param,
            )
        image = decode_image(data, param)
        return Upload(
            id="up_" + secrets.token_hex(12),
            expires_at=self.clock.now() + timedelta(seconds=self.link_seconds),
            bytes=len(data),
            content_type=content_type(data),
            width=image.width,
            height=image.height,
        )

    def keep(self, upload: Upload, data: bytes) -> None:
        """Store the bytes of an upload that `check` named."""
        self.storage.put_object(UPLOADS + upload.id, data, upload.content_type)

    def save(self, data: bytes, param: str) -> Upload:
        """Check an image and keep it; `InvalidInputError` naming `param` if unfit."""
        upload = self.check(data, param)
        self.keep(upload, data)
        return upload

    def discard(self, uploads: Collection[Upload]) -> None:
        """Delete uploads no task will read (their create was refused or replayed).
        One that cannot be deleted now is left to the janitor's purge."""
        if not uploads:
            return
        try:
            self.storage.delete([UPLOADS + upload.id for upload in uploads])
        except OSError as exc:
            log.warning("could not delete %d unused upload(s): %s", len(uploads), exc)

    def decode_data_uri(self, uri: str, param: str) -> bytes:
        """The bytes of a `data:image/…;base64,…` URI (unchecked as an image: `check`
        does that)."""
        header = _DATA_URI.match(uri)
        if header is None:
            raise InvalidRequestError(
                f"`{param}` is a data: URI but not `data:image/<type>;base64,<data>`",
                param=param,
            )
        encoded = uri[header.end() :]
        if len(encoded) > (self.max_bytes + 2) // 3 * 4 + 4:
            raise InvalidInputError(
                f"the image in the data: URI is over {self.max_bytes:,} bytes", param=param
            )
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(
                f"`{param}`: the data: URI's base64 is malformed", param=param
            ) from None

    # -- links --------------------------------------------------------------

    def link(self, base_url: str, upload: Upload) -> str:
        expires = int(upload.expires_at.timestamp())
        signature = self._sign(upload.id, expires)
        return (
            f"{base_url.rstrip('/')}/v1/uploads/{quote(upload.id)}"
            f"?expires={expires}&signature={signature}"
        )

    def open_signed(self, upload_id: str, expires: int, signature: str) -> bytes:
        """The bytes behind a link this server signed, refused as `/v1/files` refuses
        result links: 403 when altered or expired, 404 once the upload is gone."""
        self._verify(upload_id, expires, signature, param="signature")
        if self._expired(expires):
            expired_at = datetime.fromtimestamp(expires, self.clock.now().tzinfo)
            raise PermissionDeniedError(
                f"This upload link expired at {expired_at.isoformat()}",
                param="expires",
                fallback_suggestion="upload the image again",
            )
        try:
            return self.storage.get_object(UPLOADS + upload_id)
        except FileNotFoundError:
            raise NotFoundError(
                "This upload no longer exists (uploads are kept as long as results)",
                param="upload_id",
                fallback_suggestion="upload the image again",
            ) from None

    def check_link(self, url: str, param: str) -> bool:
        """Whether `url` is one of our upload links; a 400 naming `param` if it is
        altered or expired."""
        parsed = self._parse(url)
        if parsed is None:
            return False
        try:
            expires = self._verify(*parsed, param=param)
        except PermissionDeniedError as exc:
            raise InvalidRequestError(f"`{param}`: {exc.message}", param=param) from None
        if self._expired(expires):
            raise InvalidRequestError(
                f"`{param}`: this upload link expired; upload the image again",
                param=param,
            )
        return True

    def resolve(self, url: str, param: str) -> bytes | None:
        """The bytes of one of our upload links (for a worker), or None if `url`
        is not one. Its expiry was checked when the task was accepted."""
        parsed = self._parse(url)
        if parsed is None:
            return None
        upload_id = parsed[0]
        self._verify(*parsed, param=param)
        try:
            return self.storage.get_object(UPLOADS + upload_id)
        except FileNotFoundError:
            raise InvalidInputError(
                "the uploaded image no longer exists (uploads are kept as long as results); "
                "upload it again",
                param=param,
            ) from None

    def purge(self, older_than: datetime) -> int:
        return self.storage.purge_uploads(older_than)

    def _parse(self, url: str) -> tuple[str, int | None, str] | None:
        """The id, `expires` (None unless a Unix time) and signature of a link on our
        upload path; None for any other URL."""
        parts = urlsplit(url)
        match = _LINK_PATH.search(parts.path)
        if parts.scheme not in ("http", "https") or match is None:
            return None
        query = parse_qs(parts.query)
        expires = query.get("expires", [""])[0]
        signature = query.get("signature", [""])[0]
        if not expires or not signature:
            return None
        return match[1], link_expires(expires), signature

    def _verify(self, upload_id: str, expires: int | None, signature: str, *, param: str) -> int:
        """The link's expiry, once it is known to be one this server signed."""
        if expires is None:
            raise PermissionDeniedError(
                "This upload link is invalid: `expires` is not a Unix time", param=param
            )
        if not _ID.fullmatch(upload_id) or not signature_matches(
            self._sign(upload_id, expires), signature
        ):
            raise PermissionDeniedError(
                "This upload link is invalid: its signature does not match", param=param
            )
        return expires

    def _expired(self, expires: int) -> bool:
        return self.clock.now().timestamp() >= expires

    def _sign(self, upload_id: str, expires: int) -> str:
        message = f"upload\n{upload_id}\n{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()
