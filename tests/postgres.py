"""A private PostgreSQL cluster for tests that stop, restart or break the database.

The shared cluster that `RETOUCH_TEST_DATABASE_URL` names serves every test at
once; a test that restarts PostgreSQL needs one of its own. `PrivatePostgres`
runs `initdb` into a fresh directory and `pg_ctl` on a free loopback port (no
Unix socket), as the `postgres` user when the tests run as root (PostgreSQL
refuses to run as root). Use the fixture from a test module:

    from tests.postgres import private_postgres_fixture  # noqa: F401  (`private_postgres`)

and ask for `private_postgres` (a started `PrivatePostgres`, stopped with
`-m immediate` and deleted after the test). Without PostgreSQL's server
binaries those tests are skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port

START_TIMEOUT_SECONDS = 60


def server_binaries() -> Path | None:
    """The newest `/usr/lib/postgresql/<version>/bin` (Debian), else `pg_ctl`'s on PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


class PrivatePostgres:
    """One PostgreSQL cluster in a temporary directory, on a loopback port."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.port = free_port()
        # Not under pytest's tmp_path: the `postgres` user cannot enter that (0700, root's).
        self.workdir = Path(tempfile.mkdtemp(prefix="retouch-pg-"))
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        self._user = _run_as()
        if self._user is not None:
            record = pwd.getpwnam(self._user)
            os.chown(self.workdir, record.pw_uid, record.pw_gid)
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> PrivatePostgres:
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale", "C", "--no-sync",
        )  # fmt: skip
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._ctl("start", "-o", options, "-l", str(self.log_path))

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast", down_seconds: float = 0.0) -> None:
        """Stop (clients are disconnected), stay down a while, start again. Not
        `pg_ctl restart`: that one forgets the log file, so the server would
        write into our pipes."""
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def is_running(self) -> bool:
        result = self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False)
        return result.returncode == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def remove(self) -> None:
        if self.data_dir.exists() and self.is_running():
            self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _ctl(self, action: str, *args: str) -> None:
        self._run(
            "pg_ctl", action, "-D", str(self.data_dir), "-w", "-t", str(START_TIMEOUT_SECONDS),
            *args,
        )  # fmt: skip

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self.binaries / program), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=self.workdir,
            timeout=START_TIMEOUT_SECONDS + 30,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{self.log()[-3000:]}"
            )
        return result


def _run_as() -> str | None:
    """The user PostgreSQL runs as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    return "postgres"


@pytest.fixture(name="private_postgres")
def private_postgres_fixture() -> Iterator[PrivatePostgres]:
    """A started PostgreSQL cluster of the test's own, removed afterwards."""
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    cluster = PrivatePostgres(binaries)
    try:
        cluster.init().start()
        yield cluster
    finally:
        cluster.remove()
