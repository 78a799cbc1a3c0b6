"""The README's configuration reference covers every setting."""

from __future__ import annotations

from retouch.cli import ENV_ONLY
from retouch.settings import Settings
from tests.support import REPO


def test_readme_lists_every_setting_with_its_flag() -> None:
    readme = (REPO / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`RETOUCH_{name.upper()}`" in readme, f"{name}: run scripts/readme_settings.py"
        if name not in ENV_ONLY:
            assert f"`--{name.replace('_', '-')}`" in readme, name
