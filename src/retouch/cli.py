"""The `retouch` command."""

from __future__ import annotations

import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from retouch import __version__
from retouch.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

# Secrets stay off the command line (visible to every user in `ps`).
ENV_ONLY = frozenset({"secret_key"})


def settings_options(*names: str) -> Callable[[F], F]:
    """Add one flag per settings field (all of them when no names are given)."""
    fields = Settings.model_fields
    chosen = names or tuple(name for name in fields if name not in ENV_ONLY)

    def decorate(func: F) -> F:
        for name in reversed(chosen):
            func = _option(name, fields[name])(func)
        return func

    return decorate


def _option(name: str, field: FieldInfo) -> Callable[[F], F]:
    flag = "--" + name.replace("_", "-")
    default = "" if field.default is None else f"default: {field.default}; "
    help_text = f"{field.description or ''}  [{default}env: RETOUCH_{name.upper()}]"
    annotation = _without_none(field.annotation)
    if annotation is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    click_type: Any
    if typing.get_origin(annotation) is Literal:
        click_type = click.Choice([str(arg) for arg in typing.get_args(annotation)])
    elif annotation is Path:
        click_type = click.Path(path_type=Path, file_okay=False)
    else:
        click_type = annotation
    return click.option(flag, name, type=click_type, default=None, help=help_text)


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        remaining = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return remaining[0] if len(remaining) == 1 else annotation
    return annotation


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


_store_options = settings_options("data_dir", "database_url")


@click.group()
@click.version_option(__version__, prog_name="retouch")
def main() -> None:
    """Retouch: a self-hostable server for the qwen-image-edit async task API."""


@main.command()
@settings_options()
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
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who the key is for.")
@click.option("--group", type=click.Choice(["default", "vip"]), default="default")
@_store_options
def keys_create(name: str, group: str, **options: Any) -> None:
    """Create a key and print it once; only its digest is stored."""
    from retouch.callbacks import webhook_secret
    from retouch.server import open_store

    settings = build_settings(**options)
    store = open_store(settings)
    key, secret = store.create_key(name, user_group=group)
    click.echo(secret)
    click.echo(
        f"Created key {key.id} for {name!r}. This is the only time it is shown: keep it safe.\n"
        "Callbacks of its tasks are signed (Standard Webhooks) with "
        f"{webhook_secret(settings.signing_key(), key.id)}",
        err=True,
    )


@keys.command("list")
@_store_options
def keys_list(**options: Any) -> None:
    """List keys (never their secrets)."""
    from retouch.server import open_store

    rows = open_store(build_settings(**options)).list_keys()
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
@_store_options
def keys_revoke(key_id: str, **options: Any) -> None:
    """Revoke a key: it answers 401 from now on."""
    from retouch.server import open_store

    if not open_store(build_settings(**options)).revoke_key(key_id):
        raise click.ClickException(f"no active key with id {key_id!r}")
    click.echo(f"Revoked {key_id}.", err=True)


@main.command()
@click.option("--runs", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option(
    "--image",
    "images",
    multiple=True,
    help="Input image URL or file (repeat for several); default: a synthetic image.",
)
@click.option("--size", default="1024x1024", show_default=True, help="Output size WxH.")
@click.option("--prompt", default="Replace the background with a beach at sunset")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per run.")
@settings_options(
    "model", "models_file", "model_name", "family", "steps", "true_cfg_scale", "device",
    "dtype", "offload", "compile", "quantize", "quantize_text_encoder", "lora",
    "lora_weight", "lora_steps", "lora_true_cfg_scale", "data_dir", "allow_private_networks",
    "fetch_ports",
)  # fmt: skip
def bench(
    runs: int, images: tuple[str, ...], size: str, prompt: str, as_json: bool, **options: Any
) -> None:
    """Run edits through the engine and print the time of every stage."""
    import json

    from retouch.api.schemas import parse_size
    from retouch.bench import load_inputs, run_once, summary
    from retouch.engine.base import EditJob
    from retouch.engine.loader import engine_options, load_engine
    from retouch.errors import InvalidInputError, ModelLoadError
    from retouch.fetch import ImageFetcher
    from retouch.models import ModelsFileError

    settings = build_settings(**options)
    try:
        width, height = parse_size(size)
        spec = settings.model_specs()[0]
        started = time.perf_counter()
        engine = load_engine(spec, engine_options(settings))
        click.echo(
            f"loaded {spec.name} ({spec.checkpoint}) in {time.perf_counter() - started:.1f} s",
            err=True,
        )
        fetcher = ImageFetcher(
            allow_private_networks=settings.allow_private_networks,
            allowed_ports=settings.allowed_fetch_ports,
        )
        inputs, fetch_seconds = load_inputs(list(images), fetcher, (width, height))
    except (ValueError, ModelLoadError, ModelsFileError, InvalidInputError) as exc:
        raise click.ClickException(str(exc)) from None
    job = EditJob(
        images=inputs,
        prompt=prompt,
        seed=0,
        steps=spec.effective_steps,
        true_cfg_scale=spec.effective_true_cfg_scale,
        negative_prompt=spec.negative_prompt,
        width=width,
        height=height,
    )
    results = []
    for index in range(runs):
        times = run_once(engine, job, fetch_seconds)
        results.append(times)
        row = {"run": index + 1, "steps": times.steps, **times.row()}
        click.echo(json.dumps(row) if as_json else _bench_line(row))
    mean = summary(results)
    click.echo(
        json.dumps({"run": "mean", **mean}) if as_json else _bench_line({"run": "mean", **mean})
    )


def _bench_line(row: dict[str, Any]) -> str:
    cells = [
        f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}"
        for name, value in row.items()
    ]
    return "  ".join(cells)


@main.command("demo-model")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def demo_model(directory: Path) -> None:
    """Write the tiny random-weight Qwen-Image-Edit-Plus checkpoint to DIRECTORY."""
    from retouch.engine.demo import write_demo_checkpoint

    path = write_demo_checkpoint(directory)
    click.echo(f"Wrote the demo checkpoint to {path} (random weights: its output is noise).")


@main.command()
@_store_options
def migrate(**options: Any) -> None:
    """Create or upgrade the database schema."""
    from retouch.server import open_store

    open_store(build_settings(**options)).close()
    click.echo("The database schema is up to date.", err=True)
