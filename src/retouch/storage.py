"""Result storage: where edited images go, and the links that fetch them.

The local backend keeps files under the data directory; links are signed with
HMAC-SHA256 over the file's key and expiry, served by the API without an API
key, and refused once expired or altered.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlencode

from retouch.clock import Clock
from retouch.errors import NotFoundError, PermissionDeniedError

# Keys look like `<task id>/<index>-<run>.png` (results; `<task id>/<index>.png` from
# before runs were tagged) or `uploads/up_<hex>` (images uploaded for a task);
# nothing else is ever stored or served.
_KEY = re.compile(
    r"^(task-unified-\d+-[a-z0-9]{8}/\d{1,2}(-[0-9a-f]{8})?\.png|uploads/up_[0-9a-f]{24})$"
)
_TASK_ID = re.compile(r"^task-unified-\d+-[a-z0-9]{8}$")
UPLOADS = "uploads/"
# A signed link's `expires`: a Unix time of ASCII digits, short enough for
# `int()` and `datetime.fromtimestamp()` (11 digits reach the year 5138).
_EXPIRES = re.compile(r"[0-9]{1,11}")
# A signed link's `signature`: what `_sign` makes, a SHA-256 HMAC in lowercase hex.
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
# Local files are written under this prefix, then renamed into place.
_TMP_PREFIX = ".tmp-"
# Below this much free space a local result volume cannot take a result image
# (a 1024x1024 PNG is about 1-3 MB): `/readyz` reports it as full.
MIN_FREE_BYTES = 1 << 20


def new_run() -> str:
    """The tag of one attempt at a task: its results are its own, so an attempt
    that lost its lease can neither overwrite nor delete the results of another."""
    return secrets.token_hex(4)


def result_key(task_id: str, index: int, run: str) -> str:
    """Where attempt `run` of a task stores its result image number `index`."""
    return f"{task_id}/{index}-{run}.png"


def link_expires(value: str) -> int | None:
    """A signed link's `expires` as a Unix time, or None when it is not one: `int()`
    alone would take `"٣"` and choke on 5,000 digits."""
    return int(value) if _EXPIRES.fullmatch(value) else None


def signature_matches(expected: str, given: str) -> bool:
    """Whether `given` is the signature `expected`, in constant time. Only
    well-formed ones are compared: `compare_digest` raises on non-ASCII text."""
    return _SIGNATURE.fullmatch(given) is not None and hmac.compare_digest(expected, given)


def task_prefix(task_id: str) -> str:
    """Where every result object of a task lives (all attempts)."""
    if not _TASK_ID.match(task_id):
        raise ValueError(f"not a task id: {task_id!r}")
    return f"{task_id}/"


class ResultStorage(Protocol):
    def put(self, task_id: str, index: int, data: bytes, run: str) -> str:
        """Store one result image of attempt `run`; return its key."""
        ...

    def delete(self, keys: list[str]) -> None: ...

    def delete_task(self, task_id: str, keep: Collection[str] = ()) -> int:
        """Delete every result object stored for a task, whichever attempt stored
        it, except the keys in `keep`; return how many."""
        ...

    def put_object(self, key: str, data: bytes, content_type: str) -> None:
        """Store bytes under a key of the allowed shapes (uploads)."""
        ...

    def get_object(self, key: str) -> bytes:
        """The bytes stored under `key`; `FileNotFoundError` when there are none."""
        ...

    def purge_uploads(self, older_than: datetime) -> int:
        """Delete uploads stored before `older_than`; return how many."""
        ...

    def link(self, base_url: str, key: str, expires_at: datetime) -> str:
        """A URL that downloads `key` without an API key until `expires_at`."""
        ...

    def open_signed(self, key: str, expires: int, signature: str) -> Path:
        """The local file behind a link this storage signed (backends that serve
        their own links); refuses altered or expired links."""
        ...

    def check(self) -> None:
        """Raise unless results can be stored right now (for `/readyz`)."""
        ...


def _write_beside(path: Path, data: bytes) -> None:
    """Write beside, then rename: a reader never sees half a file, and a write that
    fails (no space left) leaves no partial file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_if_empty(folder: Path) -> None:
    """Remove a folder that holds nothing; one that holds a file (written meanwhile,
    say) or is gone already stays as it is."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def open_storage(
    location: str | None, default_dir: Path, signing_key: bytes, clock: Clock, **s3: str | None
) -> ResultStorage:
    """`s3://bucket/prefix` (S3-compatible object store), else a local directory."""
    if location and location.startswith("s3://"):
        from retouch.s3storage import S3ResultStorage

        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"{location!r} names no bucket: use s3://BUCKET[/PREFIX]")
        return S3ResultStorage(
            bucket,
            prefix.strip("/"),
            clock,
            endpoint_url=s3.get("endpoint_url"),
            region=s3.get("region"),
        )
    return LocalResultStorage(Path(location) if location else default_dir, signing_key, clock)


class LocalResultStorage:
    def __init__(self, root: Path, signing_key: bytes, clock: Clock) -> None:
        self.root = root
        self._signing_key = signing_key
        self._clock = clock

    def put(self, task_id: str, index: int, data: bytes, run: str) -> str:
        key = result_key(task_id, index, run)
        self.put_object(key, data, "image/png")
        return key

    def put_object(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_beside(path, data)
        except BaseException:
            if not key.startswith(UPLOADS):
                # A failed put leaves no task folder behind (a full disk, say).
                _remove_if_empty(path.parent)
            raise

    def get_object(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def purge_uploads(self, older_than: datetime) -> int:
        folder = self.root / UPLOADS
        if not folder.is_dir():
            return 0
        cutoff = older_than.timestamp()
        purged = 0
        for path in folder.iterdir():
            # `.tmp-*`: a write cut short by a crash, never renamed into place.
            if not path.name.startswith(("up_", _TMP_PREFIX)):
                continue
            with contextlib.suppress(FileNotFoundError):  # purged meanwhile
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    purged += 1
        return purged

    def delete(self, keys: list[str]) -> None:
        folders = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            if not key.startswith(UPLOADS):  # shared by every upload, written meanwhile
                folders.add(path.parent)
        for folder in folders:
            _remove_if_empty(folder)

    def delete_task(self, task_id: str, keep: Collection[str] = ()) -> int:
        folder = self.root / task_prefix(task_id)
        if not folder.is_dir():
            return 0
        kept = {self._path(key) for key in keep}
        deleted = 0
        for path in folder.iterdir():  # results, and the temporary files of a killed write
            if path not in kept and path.is_file():
                path.unlink(missing_ok=True)
                deleted += 1
        _remove_if_empty(folder)
        return deleted

    def link(self, base_url: str, key: str, expires_at: datetime) -> str:
        expires = int(expires_at.timestamp())
        query = urlencode({"expires": expires, "signature": self._sign(key, expires)})
        return f"{base_url.rstrip('/')}/v1/files/{quote(key)}?{query}"

    def open_signed(self, key: str, expires: int, signature: str) -> Path:
        """The file behind a link, after checking its signature and expiry."""
        if not _KEY.match(key) or not signature_matches(self._sign(key, expires), signature):
            raise PermissionDeniedError(
                "This result link is invalid: its signature does not match",
                param="signature",
                fallback_suggestion="fetch the task again for fresh result links",
            )
        expired_at = datetime.fromtimestamp(expires, self._clock.now().tzinfo)
        if self._clock.now() >= expired_at:
            raise PermissionDeniedError(
                f"This result link expired at {expired_at.isoformat()}",
                param="expires",
                fallback_suggestion="results are kept for a limited time; run the edit again",
            )
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError("This result no longer exists", param="key")
        return path

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise OSError(f"{self.root} is not writable")
        free = shutil.disk_usage(self.root).free
        if free < MIN_FREE_BYTES:
            raise OSError(f"{self.root} is full: {free} bytes free, no room for a result")

    def _sign(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a result key: {key!r}")
        return self.root / key
