"""The `retouch` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from retouch import __version__
from retouch.settings import Settings

_data_dir = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Data directory (SQLite database, results, demo model).  [default: ./retouch-data]",
)
_database_url = click.option("--database-url", help="SQLAlchemy database URL.")


def build_settings(**options: Any) -> Settings:
    """Flags given on the command line win over `RETOUCH_*` variables."""
    given = {name: value for name, value in options.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise click.UsageError(f"invalid settings: {problems}") from None


@click.group()
@click.version_option(__version__, prog_name="retouch")
def main() -> None:
    """Retouch: a self-hostable server for the qwen-image-edit async task API."""


@main.command()
@click.option("--host", help="Interface to listen on.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Port to listen on.  [default: 8000]")
@_data_dir
@_database_url
@click.option(
    "--model",
    help="`demo` (tiny random weights, CPU), a Hugging Face id such as "
    "Qwen/Qwen-Image-Edit-2511, or a local checkpoint directory.  [default: demo]",
)
@click.option("--model-name", help="API name of the model.  [default: qwen-image-edit]")
@click.option("--family", type=click.Choice(["auto", "edit", "edit-plus"]))
@click.option("--steps", type=int, help="Denoising steps (default: the model's own).")
@click.option("--true-cfg-scale", type=float)
@click.option("--device", help="Torch device, e.g. cuda:0 or cpu.  [default: cuda if present]")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]))
@click.option("--public-url", help="Base URL of result links (behind a proxy).")
@click.option("--result-ttl-seconds", type=int, help="Result link lifetime.  [default: 86400]")
@click.option(
    "--allow-private-networks/--no-allow-private-networks",
    default=None,
    help="Let image URLs reach private and loopback addresses.  [default: off]",
)
@click.option("--worker/--no-worker", default=None, help="Run the in-process worker.")
def serve(**options: Any) -> None:
    """Serve the API with an in-process worker (SQLite and local files by default)."""
    from retouch.server import StartupError, configure_logging
    from retouch.server import serve as run

    settings = build_settings(**options)
    configure_logging()
    try:
        run(settings)
    except StartupError as exc:
        click.echo(f"retouch: {exc}", err=True)
        sys.exit(1)


@main.group()
def keys() -> None:
    """Create and list API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who the key is for.")
@click.option("--group", type=click.Choice(["default", "vip"]), default="default")
@_data_dir
@_database_url
def keys_create(name: str, group: str, data_dir: Path | None, database_url: str | None) -> None:
    """Create a key and print it once; only its digest is stored."""
    from retouch.server import open_store

    store = open_store(build_settings(data_dir=data_dir, database_url=database_url))
    key, secret = store.create_key(name, user_group=group)
    click.echo(secret)
    click.echo(
        f"Created key {key.id} for {name!r}. This is the only time it is shown: keep it safe.",
        err=True,
    )


@keys.command("list")
@_data_dir
@_database_url
def keys_list(data_dir: Path | None, database_url: str | None) -> None:
    """List keys (never their secrets)."""
    from retouch.server import open_store

    store = open_store(build_settings(data_dir=data_dir, database_url=database_url))
    rows = store.list_keys()
    if not rows:
        click.echo("No keys yet: retouch keys create --name NAME", err=True)
        return
    click.echo(f"{'ID':<21} {'NAME':<20} {'PREFIX':<10} {'GROUP':<8} {'CREATED':<20} STATUS")
    for key in rows:
        status = "active" if key.active else "revoked"
        created = key.created_at.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{key.id:<21} {key.name:<20} {key.prefix + '…':<10} {key.user_group:<8} "
            f"{created:<20} {status}"
        )


@keys.command("revoke")
@click.argument("key_id")
@_data_dir
@_database_url
def keys_revoke(key_id: str, data_dir: Path | None, database_url: str | None) -> None:
    """Revoke a key: it answers 401 from now on."""
    from retouch.server import open_store

    store = open_store(build_settings(data_dir=data_dir, database_url=database_url))
    if not store.revoke_key(key_id):
        raise click.ClickException(f"no active key with id {key_id!r}")
    click.echo(f"Revoked {key_id}.", err=True)


@main.command("demo-model")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def demo_model(directory: Path) -> None:
    """Write the tiny random-weight Qwen-Image-Edit-Plus checkpoint to DIRECTORY."""
    from retouch.engine.demo import write_demo_checkpoint

    path = write_demo_checkpoint(directory)
    click.echo(f"Wrote the demo checkpoint to {path} (random weights: its output is noise).")


@main.command()
@_data_dir
@_database_url
def migrate(data_dir: Path | None, database_url: str | None) -> None:
    """Create or upgrade the database schema."""
    from retouch.server import open_store

    open_store(build_settings(data_dir=data_dir, database_url=database_url)).close()
    click.echo("The database schema is up to date.", err=True)
