"""Rewrite the README's configuration table from the settings object.

python scripts/readme_settings.py
"""

from __future__ import annotations

from pathlib import Path

from retouch.cli import ENV_ONLY
from retouch.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
HEADER = "| Environment | Flag | Default | Meaning |\n|---|---|---|---|\n"


def table() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        flag = "—" if name in ENV_ONLY else f"`--{name.replace('_', '-')}`"
        default = "—" if field.default is None else f"`{field.default}`"
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `RETOUCH_{name.upper()}` | {flag} | {default} | {meaning} |")
    return "\n".join(rows)


def main() -> None:
    text = README.read_text()
    start = text.index(HEADER) + len(HEADER)
    end = text.index("\n\n", start)
    README.write_text(text[:start] + table() + text[end:])


if __name__ == "__main__":
    main()
