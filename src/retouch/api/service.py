"""What the API does with a request, apart from HTTP: create, read, cancel, render."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import timedelta
from typing import Any

from retouch.accounts import Admission, Limits, QueueFull, TooManyUnfinished, to_credits, to_units
from retouch.api.schemas import QwenImageEditRequest, parse_size
from retouch.clock import Clock
from retouch.errors import (
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RetouchError,
    ServiceUnavailableError,
)
from retouch.keys import ApiKey
from retouch.models import ModelSpec
from retouch.netguard import DestinationRefused, UrlRules
from retouch.prompts import PromptTokenCounter, ensure_prompt_fits
from retouch.storage import ResultStorage
from retouch.store import Store
from retouch.tasks import MAX_TASK_ID_LENGTH, EditParams, Task, TaskStatus, new_task_id
from retouch.uploads import Upload, Uploads, is_data_uri

DEFAULT_TASK_SECONDS = 30.0
_ESTIMATE_CACHE_SECONDS = 10.0


class TaskService:
    def __init__(
        self,
        store: Store,
        storage: ResultStorage,
        clock: Clock,
        models: list[ModelSpec],
        public_url: str | None = None,
        tokens: PromptTokenCounter | None = None,
        image_rules: UrlRules | None = None,
        callback_rules: UrlRules | None = None,
        limits: Limits | None = None,
        uploads: Uploads | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.clock = clock
        self.models = {model.name: model for model in models}
        self.public_url = public_url
        self.tokens = tokens
        self.image_rules = image_rules
        self.callback_rules = callback_rules
        self.limits = limits or Limits()
        self.uploads = uploads
        self._durations: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def create(
        self,
        key: ApiKey,
        request: QwenImageEditRequest,
        idempotency_key: str | None = None,
        base_url: str = "",
    ) -> tuple[Task, bool]:
        """A new task (or, for a repeated Idempotency-Key, the one it created) and
        whether it was replayed."""
        model = self._model(request.model)
        self._check_allowed(key, model, request)
        inline = self._check_data_uris(request.image_urls)
        image_urls = self._link_data_uris(request.image_urls, inline, base_url)
        task = self._new_task(key, model, request, image_urls, base_url)
        # Stored before the task exists (a worker may claim it at once) and deleted
        # again when it is refused or replayed, so neither leaves files behind. After
        # any other error (the database gone) the task may exist: the janitor's purge
        # of old uploads takes them instead.
        kept = self._keep(inline)
        try:
            task, replayed = self._admit(task, self._admission(key, request, idempotency_key))
        except RetouchError:
            self._discard(kept)
            raise
        if replayed:
            self._discard(kept)  # the replayed task reads the first request's uploads
        return task, replayed

    def _new_task(
        self,
        key: ApiKey,
        model: ModelSpec,
        request: QwenImageEditRequest,
        image_urls: list[str],
        base_url: str,
    ) -> Task:
        width, height = parse_size(request.size) if request.size else (None, None)
        now = self.clock.now()
        priority_at = now
        if key.user_group == "vip":
            priority_at -= timedelta(seconds=self.limits.vip_priority_seconds)
        return Task(
            id=new_task_id(int(now.timestamp())),
            key_id=key.id,
            account_id=key.account_id,
            model=model.name,
            status=TaskStatus.PENDING,
            progress=0,
            params=EditParams(
                prompt=request.prompt,
                image_urls=image_urls,
                callback_url=request.callback_url,
                n=request.n,
                seed=request.seed,
                negative_prompt=request.negative_prompt,
                width=width,
                height=height,
            ),
            created_at=now,
            priority_at=priority_at,
            user_group=key.user_group,
            credits_reserved=to_credits(to_units(model.price) * request.n),
            base_url=None if self.public_url or not base_url else base_url,
        )

    def _admission(
        self, key: ApiKey, request: QwenImageEditRequest, idempotency_key: str | None
    ) -> Admission:
        limits = self.limits.for_account(key.account)
        return Admission(
            requests_per_minute=limits.requests_per_minute,
            max_concurrent_tasks=limits.max_concurrent_tasks,
            max_queued_tasks=self.limits.max_queued_tasks,
            idempotency_key=idempotency_key,
            fingerprint=_fingerprint(request) if idempotency_key else None,
        )

    def _admit(self, task: Task, admission: Admission) -> tuple[Task, bool]:
        """Create the task if the account and the server may take it now."""
        try:
            return self.store.create_task(task, admission)
        except TooManyUnfinished as exc:
            raise RateLimitError(
                f"Rate limit exceeded: this account may have {exc.limit} unfinished tasks at "
                "a time; wait for one to finish",
                retry_after=self._first_finish(task.account_id),
            ) from None
        except QueueFull as exc:
            per_task = self._typical_seconds(task.model)
            drain = per_task * (exc.unfinished - exc.limit + 1) / max(1, exc.running)
            raise ServiceUnavailableError(
                f"Service temporarily unavailable: the queue is full ({exc.limit} unfinished "
                "tasks)",
                retry_after=drain,
            ) from None

    def _first_finish(self, account_id: str) -> float:
        """Seconds until the first of the account's unfinished tasks should be done.

        Of one model's pending tasks, the one nearest the head of the queue has the
        least ahead of it: one queue lookup per model, not one per task (an account
        may have thousands, and a client past its limit may retry in a loop)."""
        unfinished = self.store.unfinished_tasks(account_id)
        candidates = [task for task in unfinished if task.status is TaskStatus.PROCESSING]
        first_pending: dict[str, Task] = {}
        pending = (task for task in unfinished if task.status is TaskStatus.PENDING)
        for task in sorted(pending, key=lambda t: t.queue_order):
            first_pending.setdefault(task.model, task)
        candidates += first_pending.values()
        return min((self.estimated_time(task) for task in candidates), default=1)

    def usage(self, key: ApiKey) -> dict[str, Any]:
        """Extension: the caller's account, its credits, limits and tasks."""
        usage = self.store.usage(key.account_id)
        account = usage.account
        limits = self.limits.for_account(account)
        return {
            "object": "usage",
            "account": {"id": account.id, "name": account.name},
            "user_group": account.user_group,
            "credits": {
                "balance": account.balance,
                "reserved": account.reserved,
                "available": account.available,
            },
            "limits": {
                "requests_per_minute": limits.requests_per_minute,
                "max_concurrent_tasks": limits.max_concurrent_tasks,
            },
            "tasks": usage.tasks,
        }

    def served_models(self, key: ApiKey) -> list[ModelSpec]:
        """The models this key's account may use."""
        return [
            spec
            for spec in self.models.values()
            if key.user_group in spec.user_groups and key.account.may_use(spec.name)
        ]

    def _check_allowed(self, key: ApiKey, spec: ModelSpec, request: QwenImageEditRequest) -> None:
        """The per-model limits that the request schema alone cannot know."""
        if key.user_group not in spec.user_groups:
            raise PermissionDeniedError(
                f"Access denied for this model: {spec.name!r} is not available to the "
                f"{key.user_group!r} user group",
                param="model",
            )
        if not key.account.may_use(spec.name):
            raise PermissionDeniedError(
                f"Access denied for this model: account {key.account.name!r} may not use "
                f"{spec.name!r}",
                param="model",
            )
        if len(request.image_urls) > spec.max_images:
            raise InvalidRequestError(
                f"model {spec.name!r} takes at most {spec.max_images} image(s); "
                f"{len(request.image_urls)} were given",
                param="image_urls",
            )
        if request.size and max(parse_size(request.size)) > spec.max_output_side:
            raise InvalidRequestError(
                f"size {request.size!r} is larger than model {spec.name!r} allows: "
                f"each side at most {spec.max_output_side}",
                param="size",
            )
        self._check_urls(request)
        ensure_prompt_fits(self.tokens.count(spec, request.prompt) if self.tokens else None)

    def _check_data_uris(self, urls: list[str]) -> dict[int, tuple[Upload, bytes]]:
        """`data:` images by index, decoded and checked in memory (none is stored
        until every one has passed)."""
        if not any(is_data_uri(url) for url in urls):
            return {}
        uploads = self._data_uri_uploads()
        inline: dict[int, tuple[Upload, bytes]] = {}
        for i, url in enumerate(urls):
            if is_data_uri(url):
                param = f"image_urls[{i}]"
                data = uploads.decode_data_uri(url, param)
                inline[i] = (uploads.check(data, param), data)
        return inline

    def _link_data_uris(
        self, urls: list[str], inline: dict[int, tuple[Upload, bytes]], base_url: str
    ) -> list[str]:
        """The task keeps a link to each `data:` image's upload, not megabytes."""
        if not inline:
            return urls
        uploads, base = self._data_uri_uploads(), self.public_url or base_url
        return [
            uploads.link(base, inline[i][0]) if i in inline else url for i, url in enumerate(urls)
        ]

    def _keep(self, inline: dict[int, tuple[Upload, bytes]]) -> list[Upload]:
        """Store the checked `data:` images; all of them or, on a failure, none."""
        kept: list[Upload] = []
        if not inline:
            return kept
        uploads = self._data_uri_uploads()
        try:
            for upload, data in inline.values():
                uploads.keep(upload, data)
                kept.append(upload)
        except BaseException:
            uploads.discard(kept)
            raise
        return kept

    def _discard(self, kept: list[Upload]) -> None:
        if kept:
            self._data_uri_uploads().discard(kept)

    def _data_uri_uploads(self) -> Uploads:
        if self.uploads is None:
            raise InvalidRequestError(
                "this server does not accept data: URIs; send http(s) URLs", param="image_urls"
            )
        return self.uploads

    def _check_urls(self, request: QwenImageEditRequest) -> None:
        """What the URLs show by themselves; their addresses are checked again when
        the worker connects (a name may resolve anywhere). Our own upload links are
        checked by their signature and expiry instead."""
        checks = []
        for i, url in enumerate(request.image_urls):
            param = f"image_urls[{i}]"
            if is_data_uri(url):
                continue
            if self.uploads is not None and self.uploads.check_link(url, param):
                continue
            checks.append((url, param, self.image_rules))
        if request.callback_url:
            checks.append((request.callback_url, "callback_url", self.callback_rules))
        for url, param, rules in checks:
            if rules is None:
                continue
            try:
                rules.check(url)
            except DestinationRefused as exc:
                raise InvalidRequestError(f"`{param}`: {exc}", param=param) from None

    def get(self, key: ApiKey, task_id: str) -> Task:
        """The caller's task; another key's task is indistinguishable from none."""
        task = self.store.get_task(_possible_task_id(task_id), key.id)
        if task is None:
            raise _no_task(task_id)
        return task

    def cancel(self, key: ApiKey, task_id: str) -> Task:
        return self.store.request_cancel(_possible_task_id(task_id), key.id)

    def render_callback(self, task: Task, server_url: str) -> dict[str, Any]:
        """The task detail its callback carries: its links go through the public URL,
        else the address the task was created through (as a poll there shows them),
        else (a task older than that record) `server_url`."""
        return self.render(task, task.base_url or server_url)

    def render(self, task: Task, base_url: str, *, detail: bool = True) -> dict[str, Any]:
        """The seed's task object (and, for `detail`, results and error)."""
        body: dict[str, Any] = {
            "created": task.created,
            "id": task.id,
            "model": task.model,
            "object": "image.generation.task",
            "progress": task.progress,
            "status": task.status.value,
            "task_info": {
                "can_cancel": task.can_cancel,
                "estimated_time": self.estimated_time(task),
            },
            "type": "image",
            "usage": {
                "billing_rule": "per_call",
                "credits_reserved": task.credits_reserved,
                "user_group": task.user_group,
            },
        }
        if detail and task.status is TaskStatus.COMPLETED and task.results_expire_at:
            base = self.public_url or base_url
            body["results"] = [
                self.storage.link(base, key, task.results_expire_at) for key in task.result_keys
            ]
        if detail and task.params.callback_url:
            body["callback"] = self.callback_state(task)
        if detail and task.error is not None:
            error = task.error
            rendered = {"code": error.code, "message": error.message, "type": error.type}
            if error.param:
                rendered["param"] = error.param
            body["error"] = rendered
        return body

    def callback_state(self, task: Task) -> dict[str, Any]:
        """Extension: where the task's callback delivery stands."""
        delivery = self.store.latest_delivery(task.id)
        if delivery is None:
            return {"status": "waiting", "attempts": 0, "last_status_code": None}
        return {
            "status": delivery.status,
            "attempts": delivery.attempts,
            "last_status_code": delivery.last_status_code,
        }

    def redeliver(self, key: ApiKey, task_id: str) -> Task:
        return self.store.redeliver(_possible_task_id(task_id), key.id)

    def estimated_time(self, task: Task) -> int:
        """Seconds until done, from the model's recent run times: what is left of this
        task's run; for a task claimed ahead, also what is left of the run before it
        on its worker; for a pending one, also the tasks in hand and the queue ahead,
        shared among the workers holding tasks of its model."""
        if task.status.is_terminal:
            return 0
        per_task = self._typical_seconds(task.model)
        if task.status is TaskStatus.PROCESSING and task.run_started_at is not None:
            return round(per_task * (100 - task.progress) / 100)

        def left(other: Task) -> float:
            if other.run_started_at is None:
                return per_task
            return per_task * (100 - other.progress) / 100

        in_hand = [other for other in self.store.tasks_in_hand(task.model) if other.id != task.id]
        if task.status is TaskStatus.PROCESSING:
            running = (o for o in in_hand if o.lease_owner == task.lease_owner and o.run_started_at)
            return round(sum(map(left, running)) + per_task)
        workers = max(1, len({other.lease_owner for other in in_hand}))
        backlog = sum(map(left, in_hand)) + per_task * self.store.queue_position(task)
        return round(backlog / workers + per_task)

    def _typical_seconds(self, model: str) -> float:
        with self._lock:
            cached = self._durations.get(model)
        if cached and time.monotonic() - cached[1] < _ESTIMATE_CACHE_SECONDS:
            return cached[0]
        seconds = self.store.recent_task_seconds(model) or DEFAULT_TASK_SECONDS
        with self._lock:
            self._durations[model] = (seconds, time.monotonic())
        return seconds

    def _model(self, name: str) -> ModelSpec:
        model = self.models.get(name)
        if model is None:
            served = ", ".join(sorted(self.models))
            raise NotFoundError(
                f"Specified model not found: {name!r}; this server serves {served}",
                param="model",
                fallback_suggestion=next(iter(sorted(self.models))),
            )
        return model


def _possible_task_id(task_id: str) -> str:
    """`task_id`, unless it is longer than any task's (the column's length): a 404
    like any other unknown id. (A NUL in a path is refused before routing.)"""
    if len(task_id) > MAX_TASK_ID_LENGTH:
        raise _no_task(task_id)
    return task_id


def _no_task(task_id: str) -> NotFoundError:
    shown = task_id if len(task_id) <= 100 else task_id[:100] + "…"
    return NotFoundError(f"No task found with id {shown!r}", param="task_id")


def _fingerprint(request: QwenImageEditRequest) -> str:
    """What makes two create requests "the same" for an Idempotency-Key: every
    parameter, defaults filled in, whatever the JSON's spacing or key order."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
