"""The API process never imports torch or diffusers."""

from __future__ import annotations

import subprocess
import sys


def test_api_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import retouch.api.app, retouch.server, retouch.cli, retouch.worker\n"
        "loaded = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
