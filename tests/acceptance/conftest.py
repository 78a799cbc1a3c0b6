"""Every `retouch serve` an acceptance test ran must leave a consistent ledger."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import ServeProcess, retouch_cli


@pytest.fixture(autouse=True)
def ledger_stays_consistent() -> Iterator[None]:
    ServeProcess.served_data_dirs.clear()
    yield
    for data_dir in sorted(ServeProcess.served_data_dirs):
        result = retouch_cli("ledger", "check", "--data-dir", str(data_dir), check=False)
        assert result.returncode == 0, (
            f"ledger check of {data_dir}:\n{result.stdout}{result.stderr}"
        )
