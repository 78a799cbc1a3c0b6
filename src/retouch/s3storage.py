"""Result storage in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, R2).

Objects use the local backend's keys (`<task id>/<index>.png`) under an optional
prefix; links are presigned GET URLs that go straight to the store, so the API
never serves these files itself. Credentials come from boto3's usual chain
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws/credentials`, instance roles).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# boto3 and botocore ship no type information (no boto3-stubs/botocore-stubs here);
# `unused-ignore` keeps these lines valid once the stubs are installed.
import boto3  # type: ignore[import-untyped, unused-ignore]
from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]
from botocore.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    BotoCoreError,
    ClientError,
)

from retouch.clock import Clock
from retouch.errors import NotFoundError
from retouch.storage import _KEY, UPLOADS, result_key, task_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

# SigV4 presigned URLs live at most 7 days.
MAX_LINK_SECONDS = 7 * 24 * 3600
# DeleteObjects takes at most 1000 keys a call.
DELETE_BATCH = 1000


class S3ResultStorage:
    """Results as objects in `bucket`, at `prefix/<task id>/<index>.png`.

    `link()` returns a presigned GET URL valid from now (the injected clock) until
    `expires_at`, but for at least 1 second and at most 7 days, the SigV4 limit:
    with a result retention longer than 7 days, links fetched early expire after
    7 days (fetching the task again gives fresh ones); the objects themselves are
    kept until the janitor deletes them. The signature's own timestamp is the real
    time at signing.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        clock: Clock,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 result storage needs a bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._clock = clock
        if client is None:
            client = _make_client(endpoint_url, region)
        self._client: S3Client = client

    @property
    def endpoint_url(self) -> str:
        return str(self._client.meta.endpoint_url)

    def put(self, task_id: str, index: int, data: bytes, run: str) -> str:
        key = result_key(task_id, index, run)
        self.put_object(key, data, "image/png")
        return key

    def put_object(self, key: str, data: bytes, content_type: str) -> None:
        self._client.put_object(
            Bucket=self.bucket, Key=self._object(key), Body=data, ContentType=content_type
        )

    def get_object(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from None
            raise
        return bytes(response["Body"].read())

    def purge_uploads(self, older_than: datetime) -> int:
        """Delete the uploads stored before `older_than`. Other objects under the
        prefix (a console's folder marker `uploads/`, say) are none of ours: they
        are left alone, and never stop the purge."""
        root = self._object_prefix("")
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._object_prefix(UPLOADS)
        )
        stale = []
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"].removeprefix(root)
                if item["LastModified"] < older_than and _KEY.match(key):
                    stale.append(key)
        self.delete(stale)
        return len(stale)

    def delete(self, keys: list[str]) -> None:
        """Delete the objects behind `keys`; keys already gone are fine."""
        objects: list[ObjectIdentifierTypeDef] = [{"Key": self._object(key)} for key in keys]
        for start in range(0, len(objects), DELETE_BATCH):
            response = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": objects[start : start + DELETE_BATCH], "Quiet": True},
            )
            errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise OSError(
                    f"S3 bucket {self.bucket!r} at {self.endpoint_url} did not delete "
                    f"{len(errors)} object(s), e.g. {first.get('Key')!r}: "
                    f"{first.get('Code')}: {first.get('Message')}"
                )

    def delete_task(self, task_id: str, keep: Collection[str] = ()) -> int:
        """Delete every object under the task's prefix but `keep`: one listing, then
        batched deletes."""
        root = self._object_prefix("")
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._object_prefix(task_prefix(task_id))
        )
        listed = [
            item["Key"].removeprefix(root) for page in pages for item in page.get("Contents", [])
        ]
        stale = [key for key in listed if key not in keep and _KEY.match(key)]
        self.delete(stale)
        return len(stale)

    def link(self, base_url: str, key: str, expires_at: datetime) -> str:
        """A presigned GET URL for `key` (`base_url` is unused: links go to the store)."""
        seconds = int((expires_at - self._clock.now()).total_seconds())
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._object(key)},
            ExpiresIn=min(max(seconds, 1), MAX_LINK_SECONDS),
        )

    def open_signed(self, key: str, expires: int, signature: str) -> Path:
        raise NotFoundError(
            "Results are kept in S3 storage and downloaded from the store's own links, "
            "not from this server",
            param="key",
            fallback_suggestion="fetch the task again for fresh result links",
        )

    def check(self) -> None:
        """Raise `OSError` unless the bucket exists and these credentials may use it."""
        where = f"S3 bucket {self.bucket!r} at {self.endpoint_url}"
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            error = exc.response.get("Error", {})
            code, message = str(error.get("Code", "")), str(error.get("Message", ""))
            if code and code != str(status):  # HEAD answers have no body: no real code
                message = f"{code}: {message}"
            detail = f"HTTP {status} {message}".strip()
            if status == 404:
                raise OSError(f"{where} does not exist ({detail})") from exc
            if status == 403:
                raise OSError(f"{where} refused access ({detail}): check the credentials") from exc
            raise OSError(f"{where} is not usable ({detail})") from exc
        except BotoCoreError as exc:
            raise OSError(f"{where} is unreachable: {exc}") from exc

    def _object(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"not a result key: {key!r}")
        return self._object_prefix(key)

    def _object_prefix(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key


def _make_client(endpoint_url: str | None, region: str | None) -> S3Client:
    config = Config(
        signature_version="s3v4",
        # Custom endpoints (SeaweedFS, MinIO) rarely have per-bucket DNS names.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    # A session of its own: boto3's default session is not thread-safe to create,
    # while a client, once made, is safe to share between threads.
    session = boto3.session.Session()
    client: S3Client = session.client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )
    return client
