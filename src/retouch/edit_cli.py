"""`retouch edit` and `retouch tasks …`: the API's client side on the command line.

Only click is imported here; the HTTP client loads when a command runs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from retouch.client import Client, RetouchError, Task

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
CANCEL_WAIT_SECONDS = 15.0
_CONVERTED_SUFFIXES = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

_EXIT_CODES = """\b
Exit status:
  0    done: the task completed (and its results were saved)
  1    the task failed or was cancelled, the server refused the
       request, or --timeout passed
  2    usage error: a bad option, a missing file, no server or key
  130  interrupted (Ctrl-C)"""


def client_options(func: F) -> F:
    """--base-url and --api-key, defaulting to RETOUCH_BASE_URL and RETOUCH_API_KEY."""
    func = click.option(
        "--api-key",
        envvar="RETOUCH_API_KEY",
        show_envvar=True,
        help="API key (prefer the environment variable: the command line is visible in `ps`).",
    )(func)
    return click.option(
        "--base-url",
        envvar="RETOUCH_BASE_URL",
        show_envvar=True,
        help="The server, e.g. http://127.0.0.1:8000.",
    )(func)


def _client(base_url: str | None, api_key: str | None) -> Client:
    from retouch.client import Client, ConfigurationError

    try:
        # Creates carry an Idempotency-Key, so retrying them never makes two tasks.
        return Client(base_url, api_key, max_retries=2, on_retry=_say_retry)
    except ConfigurationError as exc:
        message = (
            str(exc)
            .replace("pass base_url=", "pass --base-url")
            .replace("pass api_key=", "pass --api-key")
        )
        raise click.UsageError(message) from None


def _say_retry(error: RetouchError, seconds: float) -> None:
    click.echo(f"retouch: {error.message}; retrying in {seconds:g} s", err=True)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"retouch: {message}", err=True)
    sys.exit(code)


def _describe(exc: RetouchError) -> str:
    return str(exc)


def _check_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise click.BadParameter("must look like 1024x1024 (width x height)")
    return f"{int(width)}x{int(height)}"


def _check_output(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Kept as a string: a trailing slash (a directory to create) must survive."""
    if value is None or _is_directory(value):
        return value
    suffix = Path(value).suffix
    if suffix.lower() not in ("", ".png", *_CONVERTED_SUFFIXES):
        raise click.BadParameter(
            f"results are PNG images; name the file .png (or .jpg, .webp), not {suffix!r}"
        )
    return value


def _is_directory(output: str) -> bool:
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


# -- progress -----------------------------------------------------------------


def _status_line(task: Task) -> str:
    if task.status == "pending":
        info = task.task_info
        parts = ["queued"]
        if info is not None and info.queue_position is not None:
            parts.append(f"position {info.queue_position}")
        if info is not None and info.estimated_time:
            parts.append(f"about {info.estimated_time} s to go")
        return ", ".join(parts)
    if task.status == "processing":
        return f"processing {task.progress}%"
    if task.status == "failed" and task.error is not None:
        return f"failed: {task.error}"
    return task.status


class ProgressDisplay:
    """Status, progress and elapsed time on stderr: one line rewritten in place on a
    terminal (refreshed every half second), a line per change otherwise."""

    def __init__(self, stream: IO[str] | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.task: Task | None = None
        self._printed: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._dirty = False

    def start(self) -> None:
        if self.tty and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def update(self, task: Task) -> None:
        with self._lock:
            self.task = task
            if self.tty:
                self._redraw()
                return
            bucket = (task.status, task.progress // 10)
            if bucket != self._printed:
                self._printed = bucket
                self.stream.write(f"{task.id}: {_status_line(task)} ({self._elapsed()})\n")
                self.stream.flush()

    def stop(self) -> None:
        """End the display (the cursor goes to a fresh line)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(1)
            self._ticker = None
        with self._lock:
            if self.tty and self._dirty:
                self.stream.write("\n")
                self.stream.flush()
                self._dirty = False

    def _elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def _redraw(self) -> None:
        if self.task is None:
            return
        line = f"{self.task.id}: {_status_line(self.task)}  {self._elapsed()}"
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()
        self._dirty = True

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._redraw()


# -- saving results -------------------------------------------------------------


def _save(client: Client, task: Task, output: str | None) -> list[Path]:
    """-o FILE: FILE, or FILE-1, FILE-2… for several results; -o DIR/ (or none):
    TASK_ID.png, or TASK_ID-1.png… in that directory."""
    from retouch.client._common import check_downloadable, result_names

    urls = check_downloadable(task)
    if output is None or _is_directory(output):
        folder, stem, suffix = Path(output or "."), task.id, ".png"
    else:
        path = Path(output)
        folder, stem, suffix = path.parent, path.stem, path.suffix or ".png"
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for url, name in zip(urls, result_names(task, stem, suffix), strict=True):
        target = folder / name
        fmt = _CONVERTED_SUFFIXES.get(suffix.lower())
        if fmt is None:
            saved.append(client.download_url(url, target))
            continue
        png = client.download_url(url, target.with_name(target.name + ".png.part"))
        try:
            _convert(png, target, fmt)
        finally:
            png.unlink(missing_ok=True)
        saved.append(target)
    return saved


def _convert(source: Path, target: Path, fmt: str) -> None:
    from PIL import Image

    with Image.open(source) as image:
        image.convert("RGB").save(target, format=fmt)


# -- commands --------------------------------------------------------------------


@click.command(epilog=_EXIT_CODES)
@click.argument("image")
@click.argument("prompt")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    callback=_check_output,
    help="Where to save the result: FILE.png (several results: FILE-1.png, FILE-2.png…), "
    "or DIR/ (TASK_ID.png there). Default: TASK_ID.png here.",
)
@click.option(
    "--image",
    "more_images",
    multiple=True,
    metavar="IMAGE",
    help="Another input image (file or URL); repeat for several (the model's limit applies).",
)
@click.option("--seed", type=click.IntRange(min=0), help="Random seed (same seed, same image).")
@click.option("-n", "--n", "n", type=click.IntRange(min=1), help="Number of results.")
@click.option("--negative-prompt", help="What to avoid.")
@click.option("--size", callback=_check_size, help="Output size WxH, e.g. 1024x1024.")
@click.option("--model", default="qwen-image-edit", show_default=True, help="Model name.")
@click.option(
    "--cancel-on-interrupt",
    is_flag=True,
    help="On Ctrl-C cancel the task without asking (default: ask on a terminal, "
    "else leave it running).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    help="Stop waiting after SECONDS (the task goes on; exit 1).",
)
@client_options
def edit(
    image: str,
    prompt: str,
    output: str | None,
    more_images: tuple[str, ...],
    seed: int | None,
    n: int | None,
    negative_prompt: str | None,
    size: str | None,
    model: str,
    cancel_on_interrupt: bool,
    timeout: float | None,
    base_url: str | None,
    api_key: str | None,
) -> None:
    """Edit IMAGE (a file or an http(s) URL) as PROMPT says and save the result.

    Local files are uploaded to the server. Progress goes to stderr; the task id
    to stdout.

    \b
    Example:
      retouch edit photo.jpg "put a red scarf on the cat" -o out.png
    """
    from retouch.client import RetouchError

    images = [image, *more_images]
    for item in images:
        if (
            not item.lower().startswith(("http://", "https://", "data:"))
            and not Path(item).is_file()
        ):
            raise click.BadParameter(
                f"{item!r} is neither an http(s) URL nor a file", param_hint="IMAGE"
            )
    client = _client(base_url, api_key)
    display = ProgressDisplay()
    task: Task | None = None
    try:
        try:
            task = client.edit(
                prompt,
                images,
                model=model,
                n=n,
                seed=seed,
                negative_prompt=negative_prompt,
                size=size,
            )
            click.echo(task.id)
            display.update(task)
            display.start()
            final = client.wait(task, timeout=timeout, on_progress=display.update)
            display.stop()
            _finish(client, final, output)
        except KeyboardInterrupt:
            display.stop()
            _interrupted(client, task, cancel_on_interrupt)
        except RetouchError as exc:
            display.stop()
            _fail(_explain(exc, task))
        except OSError as exc:  # reading an input, writing a result
            display.stop()
            _fail(str(exc))
    finally:
        display.stop()
        client.close()


def _finish(client: Client, task: Task, output: str | None) -> None:
    if task.status == "failed":
        _fail(f"task {task.id} failed: {task.error or 'no reason given'}")
    if task.status != "completed":
        _fail(f"task {task.id} was {task.status}")
    for path in _save(client, task, output):
        click.echo(f"saved {path}", err=True)


def _explain(exc: RetouchError, task: Task | None) -> str:
    from retouch.client import WaitTimeoutError

    if isinstance(exc, WaitTimeoutError) and task is not None:
        return (
            f"{exc}; `retouch tasks wait {task.id}` waits again, "
            f"`retouch tasks cancel {task.id}` cancels it"
        )
    return _describe(exc)


def _interrupted(client: Client, task: Task | None, cancel_on_interrupt: bool) -> NoReturn:
    from retouch.client import ConflictError, RetouchError

    if task is None:
        _fail("interrupted before the task was created", EXIT_INTERRUPTED)
    if cancel_on_interrupt:
        cancel = True
    elif sys.stdin.isatty() and sys.stderr.isatty():
        try:
            cancel = click.confirm(f"Cancel task {task.id} on the server?", default=True, err=True)
        except click.Abort:
            cancel = False
            click.echo("", err=True)
    else:
        cancel = False
    if not cancel:
        _fail(
            f"interrupted; task {task.id} goes on on the server: "
            f"`retouch tasks cancel {task.id}` cancels it, "
            f"`retouch tasks wait {task.id} -o FILE` waits for it and saves it",
            EXIT_INTERRUPTED,
        )
    try:
        cancelled = _cancel(client, task.id)
    except ConflictError:
        _fail(f"interrupted; task {task.id} had already finished", EXIT_INTERRUPTED)
    except RetouchError as exc:
        _fail(f"interrupted; cancelling task {task.id} failed: {exc}", EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        _fail(f"interrupted; task {task.id} is being cancelled", EXIT_INTERRUPTED)
    _fail(f"interrupted; task {task.id} is {_status_line(cancelled)}", EXIT_INTERRUPTED)


def _cancel(client: Client, task_id: str) -> Task:
    """Cancel, and give a running task the moment it takes to stop (within a step)."""
    from retouch.client import WaitTimeoutError

    task = client.tasks.cancel(task_id)
    if task.done:
        return task
    try:
        return client.wait(task, timeout=CANCEL_WAIT_SECONDS)
    except WaitTimeoutError as exc:
        return exc.task if exc.task is not None else task


@click.group()
def tasks() -> None:
    """Show, cancel or wait for edit tasks (on --base-url / RETOUCH_BASE_URL)."""


@tasks.command("show")
@click.argument("task_id")
@client_options
def tasks_show(task_id: str, base_url: str | None, api_key: str | None) -> None:
    """Print a task's detail as JSON."""
    task = _call(base_url, api_key, lambda client: client.tasks.get(task_id))
    click.echo(json.dumps(task.raw, indent=2))


@tasks.command("cancel")
@click.argument("task_id")
@client_options
def tasks_cancel(task_id: str, base_url: str | None, api_key: str | None) -> None:
    """Cancel a task: a pending one at once, a running one within a step (waited for,
    up to 15 s). Prints the task's status; exit 1 if it had already finished."""
    task = _call(base_url, api_key, lambda client: _cancel(client, task_id))
    suffix = "" if task.done else " (cancel requested)"
    click.echo(f"{task.id} {_status_line(task)}{suffix}")


@tasks.command("wait", epilog=_EXIT_CODES)
@click.argument("task_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    callback=_check_output,
    help="Save the results, as `retouch edit -o` does.",
)
@click.option("--timeout", type=click.FloatRange(min=0), help="Stop waiting after SECONDS.")
@client_options
def tasks_wait(
    task_id: str,
    output: str | None,
    timeout: float | None,
    base_url: str | None,
    api_key: str | None,
) -> None:
    """Wait until a task finishes (progress on stderr) and print its final status."""
    from retouch.client import RetouchError

    client = _client(base_url, api_key)
    display = ProgressDisplay()
    try:
        display.start()
        try:
            task = client.wait(task_id, timeout=timeout, on_progress=display.update)
        except KeyboardInterrupt:
            display.stop()
            _fail(f"interrupted; task {task_id} goes on on the server", EXIT_INTERRUPTED)
        except RetouchError as exc:
            display.stop()
            _fail(_describe(exc))
        display.stop()
        click.echo(f"{task.id} {_status_line(task)}")
        if task.status != "completed":
            sys.exit(EXIT_FAILED)
        if output is not None:
            try:
                for path in _save(client, task, output):
                    click.echo(f"saved {path}", err=True)
            except RetouchError as exc:
                _fail(_describe(exc))
    finally:
        display.stop()
        client.close()


T = TypeVar("T")


def _call(base_url: str | None, api_key: str | None, action: Callable[[Client], T]) -> T:
    from retouch.client import RetouchError

    client = _client(base_url, api_key)
    try:
        return action(client)
    except RetouchError as exc:
        _fail(_describe(exc))
    finally:
        client.close()
