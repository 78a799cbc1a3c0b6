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
from retouch.accounts import MAX_ACCOUNT_LIMIT, Account, UserGroup
from retouch.edit_cli import edit, tasks
from retouch.settings import Settings

if typing.TYPE_CHECKING:
    from retouch.store import Store

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# Secrets stay off the command line (visible to every user in `ps`).
ENV_ONLY = frozenset({"secret_key", "admin_token"})


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
        # `*_dir` settings name directories, `*_file` ones files.
        click_type = click.Path(
            path_type=Path, file_okay=not name.endswith("_dir"), dir_okay=not name.endswith("_file")
        )
    else:
        click_type = annotation
    return click.option(flag, name, type=click_type, default=None, help=help_text)


def _without_none(annotation: Any) -> Any:
    """The type a setting's value has when given: without None, and without the
    validators of an `Annotated` type (the settings check those)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        remaining = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(remaining) == 1:
            return _without_none(remaining[0])
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def build_settings(**options: Any) -> Settings:
    """Flags given on the command line win over `RETOUCH_*` variables."""
    given = {name: value for name, value in options.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        # A field's problem names the field; one between fields names the flags itself.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) + ': ' if error['loc'] else ''}"
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise click.UsageError(f"invalid settings: {problems}") from None


_store_options = settings_options("data_dir", "database_url", "db_pool_size")


class _Commands(click.Group):
    """A file or folder a command cannot use (a data directory that cannot be created
    or written, an output path under a file) is one line and exit 1, as every other
    refusal, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if exc.filename is None:
                raise
            problem = exc.strerror or type(exc).__name__
            raise click.ClickException(f"cannot use {exc.filename}: {problem}") from None


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="retouch")
def main() -> None:
    """Retouch: a self-hostable server for the qwen-image-edit async task API."""


main.add_command(edit)
main.add_command(tasks)


@main.command()
@settings_options()
def serve(**options: Any) -> None:
    """Serve the API with an in-process worker (SQLite and local files by default)."""
    from retouch.logs import configure_logging
    from retouch.server import StartupError
    from retouch.server import serve as run
    from retouch.store import DatabaseOpenError

    settings = build_settings(**options)
    configure_logging()
    try:
        run(settings)
    except (StartupError, DatabaseOpenError) as exc:
        click.echo(f"retouch: {exc}", err=True)
        sys.exit(1)


@main.command()
@settings_options(
    "data_dir", "database_url", "db_pool_size", "storage", "s3_endpoint_url", "s3_region", "host",
    "worker_port", "shutdown_grace_seconds", "model", "models_file", "model_name", "family",
    "steps", "true_cfg_scale", "device", "dtype", "offload", "compile", "quantize",
    "quantize_text_encoder", "lora", "lora_weight", "lora_steps", "lora_true_cfg_scale",
    "lora_weight_name", "price", "result_ttl_seconds", "lease_seconds", "poll_interval_seconds",
    "allow_private_networks", "fetch_ports", "fetch_timeout_seconds", "max_image_bytes",
)  # fmt: skip
def worker(**options: Any) -> None:
    """Run edits from a shared database (one process per GPU: --device cuda:N).

    SIGTERM (or Ctrl-C) stops claiming, lets the running task finish for up to
    --shutdown-grace-seconds, hands it back to the queue if it has not, and exits 0.
    """
    from retouch.models import ModelsFileError
    from retouch.worker_process import WorkerStartupError, run_worker

    settings = build_settings(**options)
    try:
        settings.model_specs()  # a models problem is one line, before anything starts
        run_worker(settings)
    except (WorkerStartupError, ModelsFileError) as exc:
        click.echo(f"retouch: {exc}", err=True)
        sys.exit(1)


@main.group()
def keys() -> None:
    """Create, list, revoke and rotate API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who the key is for.")
@click.option(
    "--account",
    help="Id or name of the account the key acts for; default: a new account named NAME.",
)
@click.option(
    "--group",
    type=click.Choice(["default", "vip"]),
    default="default",
    show_default=True,
    help="User group of the new account.",
)
@click.option(
    "--credits",
    type=click.FloatRange(min=0),
    help="Credits of the new account; default: --default-credits.",
)
@settings_options("data_dir", "database_url", "default_credits")
def keys_create(
    name: str, account: str | None, group: UserGroup, credits: float | None, **options: Any
) -> None:
    """Create a key and print it once; only its digest is stored."""
    from retouch.callbacks import webhook_secret
    from retouch.errors import ConflictError, RetouchError

    settings = build_settings(**options)
    if account is not None and (credits is not None or group != "default"):
        raise click.UsageError(
            "--group and --credits describe a new account; for an existing one use "
            "`retouch accounts update` and `retouch credits grant`"
        )
    store = _store(settings)
    starting = settings.default_credits if credits is None else credits
    try:
        key, secret = store.create_key(name, account, user_group=group, credits=starting)
    except ConflictError as exc:
        raise click.ClickException(
            f"{exc.message}; to add a key to it, pass --account {name!r}"
        ) from None
    except RetouchError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(secret)
    click.echo(
        f"Created key {key.id} for {name!r} (account {key.account.name!r}, {key.account.id}, "
        f"{key.account.user_group}, {key.account.available:g} credits available). "
        "This is the only time the key is shown: keep it safe.\n"
        "Callbacks of the account's tasks are signed (Standard Webhooks) with "
        f"{webhook_secret(settings.signing_key(), key.account.id)}",
        err=True,
    )


@keys.command("list")
@click.option("--account", help="Only this account's keys (id or name).")
@_store_options
def keys_list(account: str | None, **options: Any) -> None:
    """List keys (never their secrets)."""
    store = _store(build_settings(**options))
    rows = _admin_call(lambda: store.list_keys(account))
    if not rows:
        click.echo("No keys yet: retouch keys create --name NAME", err=True)
        return
    click.echo(f"{'ID':<21} {'NAME':<20} {'PREFIX':<10} {'ACCOUNT':<20} {'CREATED':<20} STATUS")
    for key in rows:
        status = "active" if key.active else "revoked"
        if key.active and key.rotated_at is not None:
            status += f" (rotated {key.rotated_at.strftime('%Y-%m-%d %H:%M:%S')})"
        created = key.created_at.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{key.id:<21} {key.name:<20} {key.prefix + '…':<10} {key.account.name:<20} "
            f"{created:<20} {status}"
        )


@keys.command("revoke")
@click.argument("key_id")
@_store_options
def keys_revoke(key_id: str, **options: Any) -> None:
    """Revoke a key: it answers 401 from now on (its running tasks finish and are billed)."""
    if not _store(build_settings(**options)).revoke_key(key_id):
        raise click.ClickException(f"no active key with id {key_id!r}")
    click.echo(f"Revoked {key_id}.", err=True)


@keys.command("rotate")
@click.argument("key_id")
@_store_options
def keys_rotate(key_id: str, **options: Any) -> None:
    """Give a key a new secret: the old secret answers 401 at once; the key keeps its
    id, account and tasks."""
    store = _store(build_settings(**options))
    key, secret = _admin_call(lambda: store.rotate_key(key_id))
    click.echo(secret)
    click.echo(
        f"Rotated {key.id}: the old secret no longer works. Keep the new one safe.", err=True
    )


@main.group()
def accounts() -> None:
    """Show and change accounts: user group, allowed models, limits."""


@accounts.command("list")
@_store_options
def accounts_list(**options: Any) -> None:
    """Accounts with their credits."""
    settings = build_settings(**options)
    rows = _admin_call(_store(settings).list_accounts)
    if not rows:
        click.echo("No accounts yet: retouch keys create --name NAME", err=True)
        return
    click.echo(
        f"{'ID':<22} {'NAME':<20} {'GROUP':<8} {'BALANCE':>12} {'RESERVED':>12} {'AVAILABLE':>12}"
    )
    for account in rows:
        click.echo(
            f"{account.id:<22} {account.name:<20} {account.user_group:<8} "
            f"{account.balance:>12g} {account.reserved:>12g} {account.available:>12g}"
        )


@accounts.command("show")
@click.argument("account")
@settings_options(
    "data_dir", "database_url", "requests_per_minute", "requests_per_minute_vip",
    "max_concurrent_tasks", "max_concurrent_tasks_vip",
)  # fmt: skip
def accounts_show(account: str, **options: Any) -> None:
    """One account: credits, models, limits, and its latest ledger entries."""
    settings = build_settings(**options)
    store = _store(settings)
    found = _admin_call(lambda: store.get_account(account))
    _print_account(found, settings)
    click.echo("latest entries:")
    for entry in store.ledger(found.id, 10):
        task = f"  {entry.task_id}" if entry.task_id else ""
        note = f"  ({entry.note})" if entry.note else ""
        when = entry.created_at.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"  {when}  {entry.kind.value:<8} {entry.credits:>10g}{task}{note}")


def _print_account(account: Account, settings: Settings) -> None:
    limits = settings.limits.for_account(account)
    models = "all" if account.allowed_models is None else ", ".join(account.allowed_models)
    click.echo(
        f"{account.name} ({account.id}), {account.user_group}\n"
        f"credits: {account.balance:g} balance, {account.reserved:g} reserved, "
        f"{account.available:g} available\n"
        f"models: {models}\n"
        f"limits: {limits.requests_per_minute} tasks/minute, "
        f"{limits.max_concurrent_tasks} unfinished tasks"
    )


def _limit(value: str) -> int | None:
    if value == "default":
        return None
    if not value.isdecimal() or not 1 <= int(value) <= MAX_ACCOUNT_LIMIT:
        raise click.BadParameter(f"a whole number from 1 to {MAX_ACCOUNT_LIMIT}, or `default`")
    return int(value)


@accounts.command("update")
@click.argument("account")
@click.option("--group", type=click.Choice(["default", "vip"]), help="User group.")
@click.option("--models", help="Comma-separated models the account may use, or `all`.")
@click.option("--rate", "rate", help="Task creations per minute, or `default` (the group's).")
@click.option("--concurrency", help="Unfinished tasks at a time, or `default` (the group's).")
@settings_options(
    "data_dir", "database_url", "requests_per_minute", "requests_per_minute_vip",
    "max_concurrent_tasks", "max_concurrent_tasks_vip", "models_file", "model", "model_name",
)  # fmt: skip
def accounts_update(
    account: str,
    group: UserGroup | None,
    models: str | None,
    rate: str | None,
    concurrency: str | None,
    **options: Any,
) -> None:
    """Change an account's user group, allowed models or limits.

    --models takes the names the server serves: give this command the server's
    --models-file (or --model-name) when it has one, as its API would refuse others."""
    settings = build_settings(**options)
    changes: dict[str, Any] = {}
    if models == "all":
        changes["allowed_models"] = None
    elif models is not None:
        names = [name.strip() for name in models.split(",") if name.strip()]
        _check_served(names, settings)
        changes["allowed_models"] = names
    if rate is not None:
        changes["requests_per_minute"] = _limit(rate)
    if concurrency is not None:
        changes["max_concurrent_tasks"] = _limit(concurrency)
    store = _store(settings)
    updated = _admin_call(lambda: store.update_account(account, user_group=group, **changes))
    _print_account(updated, settings)


def _check_served(names: list[str], settings: Settings) -> None:
    """Refuse model names the configured models do not include (a typo would leave
    the account with a model nobody serves)."""
    from retouch.models import ModelsFileError

    try:
        served = {spec.name for spec in settings.model_specs()}
    except ModelsFileError as exc:
        raise click.ClickException(str(exc)) from None
    unknown = sorted(set(names) - served)
    if unknown:
        configured = "--models-file or --model-name" if not settings.models_file else "models file"
        raise click.BadParameter(
            f"no model {', '.join(unknown)} is served with these settings, which serve "
            f"{', '.join(sorted(served))}; check the names, or give this command the "
            f"server's {configured}",
            param_hint="'--models'",
        )


@main.group()
def credits() -> None:
    """Top up accounts."""


# A negative AMOUNT ("-40") is an amount, not an unknown option.
@credits.command("grant", context_settings={"ignore_unknown_options": True})
@click.argument("account")
@click.argument("amount", type=float)
@click.option("--note", help="Why (kept in the ledger).")
@_store_options
def credits_grant(account: str, amount: float, note: str | None, **options: Any) -> None:
    """Add AMOUNT credits to ACCOUNT (id or name); a negative AMOUNT takes them back."""
    store = _store(build_settings(**options))
    updated = _admin_call(lambda: store.grant(account, amount, note or "granted from the CLI"))
    click.echo(
        f"{updated.name}: {updated.balance:g} credits ({updated.available:g} available)", err=True
    )


@main.group()
def ledger() -> None:
    """The credits ledger."""


@ledger.command("check")
@_store_options
def ledger_check(**options: Any) -> None:
    """Verify every balance and every task's reservation; exit 1 on any violation."""
    problems = _store(build_settings(**options)).check_ledger()
    if problems:
        for problem in problems:
            click.echo(problem)
        raise click.ClickException(f"the ledger has {len(problems)} problem(s)")
    click.echo("The ledger is consistent.", err=True)


def _store(settings: Settings) -> Store:
    from retouch.store import DatabaseOpenError, open_store

    try:
        return open_store(settings)
    except DatabaseOpenError as exc:
        raise click.ClickException(str(exc)) from None


def _admin_call(action: Callable[[], T]) -> T:
    """Run a store action; its refusals (unknown account, taken name…) become one line."""
    from retouch.errors import RetouchError

    try:
        return action()
    except RetouchError as exc:
        hint = f" ({exc.fallback_suggestion})" if exc.fallback_suggestion else ""
        raise click.ClickException(exc.message + hint) from None


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
    "lora_weight", "lora_steps", "lora_true_cfg_scale", "lora_weight_name", "data_dir",
    "allow_private_networks", "fetch_ports",
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
    for source in images:  # before the (slow) model load
        if not source.startswith(("http://", "https://")) and not Path(source).is_file():
            raise click.BadParameter(
                f"{source}: no such file (nor an http(s) URL)", param_hint="--image"
            )
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
    # The first run warms caches up (and compiles, with --compile): left out of the mean.
    of_runs = "1" if runs == 1 else f"2-{runs}"
    mean = {"run": "mean", "of_runs": of_runs, **summary(results)}
    click.echo(json.dumps(mean) if as_json else _bench_line(mean))


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
    from retouch.errors import ModelLoadError

    try:
        path = write_demo_checkpoint(directory)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Wrote the demo checkpoint to {path} (random weights: its output is noise).")


@main.command()
@_store_options
def migrate(**options: Any) -> None:
    """Create or upgrade the database schema."""
    _store(build_settings(**options)).close()
    click.echo("The database schema is up to date.", err=True)
