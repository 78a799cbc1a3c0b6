"""The admin API (`/admin/v1`) over a live server and a real store, on each backend:
its token, accounts, credits, keys, their effect on users, and the ledger check."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text
from starlette.testclient import TestClient

from retouch.api.admin import AdminService
from retouch.api.app import create_app
from retouch.api.service import TaskService
from retouch.callbacks import webhook_secret
from retouch.clock import FakeClock
from retouch.errors import InvalidRequestError
from retouch.storage import LocalResultStorage
from retouch.store import Store
from tests.integration.conftest import ADMIN_TOKEN, SIGNING_KEY, SPEC, Api
from tests.integration.test_api import GENERATIONS, assert_error, edit
from tests.support import LiveServer

ADMIN = "/admin/v1"
ACCOUNT_ID = re.compile(r"acct_[0-9a-f]{16}")
KEY_ID = re.compile(r"key_[0-9a-f]{16}")
# Every admin route, with a body that would be valid if the token were.
ADMIN_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", f"{ADMIN}/accounts", None),
    ("POST", f"{ADMIN}/accounts", {"name": "mallory"}),
    ("GET", f"{ADMIN}/accounts/alice", None),
    ("PATCH", f"{ADMIN}/accounts/alice", {"user_group": "vip"}),
    ("POST", f"{ADMIN}/accounts/alice/credits", {"credits": 1000}),
    ("GET", f"{ADMIN}/accounts/alice/ledger", None),
    ("GET", f"{ADMIN}/keys", None),
    ("POST", f"{ADMIN}/keys", {"name": "mallory"}),
    ("POST", f"{ADMIN}/keys/key_0000000000000000/revoke", None),
    ("POST", f"{ADMIN}/keys/key_0000000000000000/rotate", None),
    ("GET", f"{ADMIN}/ledger/check", None),
]


def now(api: Api) -> int:
    return int(api.clock.now().timestamp())


def ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return dict(response.json())


def new_account(api: Api, **body: Any) -> dict[str, Any]:
    with api.admin() as admin:
        return ok(admin.post(f"{ADMIN}/accounts", json=body), 201)


def new_key(api: Api, **body: Any) -> dict[str, Any]:
    with api.admin() as admin:
        return ok(admin.post(f"{ADMIN}/keys", json=body), 201)


def usage(api: Api, secret: str) -> httpx.Response:
    with api.client(secret) as client:
        return client.get("/v1/usage")


def credits(balance: float, reserved: float = 0.0) -> dict[str, float]:
    return {"balance": balance, "reserved": reserved, "available": balance - reserved}


def limits(requests_per_minute: int | None, max_concurrent_tasks: int | None) -> dict[str, Any]:
    return {
        "requests_per_minute": requests_per_minute,
        "max_concurrent_tasks": max_concurrent_tasks,
    }


def corrupt(store: Store, statement: str) -> None:
    """Change the database behind Retouch's back, as only an outside hand could."""
    with store.engine.begin() as conn:
        conn.execute(text(statement))


# -- the admin token ----------------------------------------------------------


def test_every_admin_route_answers_401_without_the_admin_token(api: Api) -> None:
    with api.admin() as admin:
        alice = ok(admin.get(f"{ADMIN}/accounts/alice"))
    tokens = {"no header": None, "a user's key": api.secret, "a wrong token": "not-the-token"}
    for what, token in tokens.items():
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=api.url, headers=headers, timeout=10) as client:
            for method, path, body in ADMIN_ROUTES:
                response = client.request(method, path, json=body)
                error = assert_error(response, 401, "authentication_error")
                assert set(error) == {"code", "message", "type"}, (what, method, path)
                assert response.headers["www-authenticate"] == "Bearer"
    # Right token, wrong scheme; and the body is not even read before the token is checked.
    with httpx.Client(base_url=api.url, timeout=10) as client:
        basic = client.get(f"{ADMIN}/accounts", headers={"Authorization": f"Basic {ADMIN_TOKEN}"})
        garbage = client.post(f"{ADMIN}/accounts", content=b"{not json")
    assert_error(basic, 401, "authentication_error")
    assert_error(garbage, 401, "authentication_error")
    # Nothing of the above changed anything.
    with api.admin() as admin:
        assert ok(admin.get(f"{ADMIN}/accounts/alice")) == alice
        names = {account["name"] for account in ok(admin.get(f"{ADMIN}/accounts"))["data"]}
        assert names == {"alice"}
        assert [key["name"] for key in ok(admin.get(f"{ADMIN}/keys"))["data"]] == ["alice"]
    # And the admin token is no user key.
    assert_error(usage(api, ADMIN_TOKEN), 401, "authentication_error")


def test_a_flood_of_failing_tokens_costs_no_database_work(api: Api) -> None:
    """A wrong admin token is refused by a constant-time comparison before any body is
    read or any statement runs: a flood of them cannot load the database (per-address
    rate limits are the proxy's, see docs/security.md)."""
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    event.listen(api.store.engine, "before_cursor_execute", count)
    try:
        with httpx.Client(base_url=api.url, timeout=10) as client:
            for attempt in range(40):
                token = f"{ADMIN_TOKEN[:-1]}{attempt % 10}" if attempt % 2 else "x" * (attempt + 1)
                for method, path, body in ADMIN_ROUTES:
                    response = client.request(
                        method, path, json=body, headers={"Authorization": f"Bearer {token}"}
                    )
                    assert response.status_code == 401
    finally:
        event.remove(api.store.engine, "before_cursor_execute", count)
    assert statements == []


def test_without_an_admin_token_the_admin_api_is_off(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    service = TaskService(
        store, LocalResultStorage(tmp_path / "results", SIGNING_KEY, clock), clock, [SPEC]
    )
    for admin in [AdminService(store, None), AdminService(store, ""), None]:
        server = LiveServer(create_app(service, admin=admin))
        try:
            for token in [ADMIN_TOKEN, ""]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
                    for method, path, body in ADMIN_ROUTES:
                        error = assert_error(
                            client.request(method, path, json=body), 403, "permission_error"
                        )
                        assert "admin API is off" in error["message"]
                        assert "RETOUCH_ADMIN_TOKEN" in error["message"]
        finally:
            server.close()
    assert store.list_accounts() == []


# -- accounts -------------------------------------------------------------------


def test_accounts_are_created_with_credits_group_models_and_limits(api: Api) -> None:
    carol = new_account(
        api,
        name="carol",
        user_group="vip",
        credits=12.5,
        allowed_models=["qwen-image-edit"],
        requests_per_minute=5,
    )
    assert ACCOUNT_ID.fullmatch(carol["id"])
    assert carol == {
        "object": "account",
        "id": carol["id"],
        "name": "carol",
        "user_group": "vip",
        "created": now(api),
        "credits": credits(12.5),
        "allowed_models": ["qwen-image-edit"],
        "limits": limits(5, 50),  # the vip group's concurrency
        "overrides": limits(5, None),
        "webhook_secret": webhook_secret(SIGNING_KEY, carol["id"]),
    }
    dave = new_account(api, name="dave")
    assert dave["user_group"] == "default"
    assert dave["credits"] == credits(100.0)  # the default starting credits
    assert dave["allowed_models"] is None
    assert dave["limits"] == limits(60, 10) and dave["overrides"] == limits(None, None)
    erin = new_account(api, name="erin", credits=0, max_concurrent_tasks=2)
    assert erin["credits"] == credits(0.0)
    assert erin["limits"] == limits(60, 2) and erin["overrides"] == limits(None, 2)

    with api.admin() as admin:
        assert ok(admin.get(f"{ADMIN}/accounts/{carol['id']}")) == carol
        assert ok(admin.get(f"{ADMIN}/accounts/carol")) == carol
        listed = ok(admin.get(f"{ADMIN}/accounts"))
        assert listed["object"] == "list"
        by_name = {account["name"]: account for account in listed["data"]}
        assert set(by_name) == {"alice", "carol", "dave", "erin"}
        assert by_name["carol"] == carol and by_name["dave"] == dave
        # Starting credits are a grant in the ledger; none at all is no entry.
        entries = ok(admin.get(f"{ADMIN}/accounts/carol/ledger"))["data"]
        assert [(e["kind"], e["credits"], e["note"]) for e in entries] == [
            ("grant", 12.5, "starting credits")
        ]
        assert ok(admin.get(f"{ADMIN}/accounts/erin/ledger"))["data"] == []


def test_account_creation_refusals(api: Api) -> None:
    new_account(api, name="carol")
    with api.admin() as admin:
        for name in ["alice", "carol"]:  # alice's account came with the fixture's key
            taken = admin.post(f"{ADMIN}/accounts", json={"name": name, "credits": 5})
            assert f"{name!r}" in assert_error(taken, 409, "conflict_error", "name")["message"]
        unknown_model = admin.post(
            f"{ADMIN}/accounts",
            json={"name": "erin", "allowed_models": ["qwen-image-edit", "dall-e-3"]},
        )
        error = assert_error(unknown_model, 400, "invalid_request_error", "allowed_models")
        assert "dall-e-3" in error["message"]
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"name": "erin", "balance": 5}, "balance"),  # no such field
            ({"name": "erin", "credits": -1}, "credits"),
            ({"name": "erin", "credits": 0.0001}, "credits"),  # finer than 0.001
            ({"name": "erin", "user_group": "gold"}, "user_group"),
            ({"name": "erin", "requests_per_minute": 0}, "requests_per_minute"),
            ({"name": ""}, "name"),
            ({}, "name"),
        ]
        for body, param in refusals:
            response = admin.post(f"{ADMIN}/accounts", json=body)
            assert_error(response, 400, "invalid_request_error", param)
        assert_error(admin.post(f"{ADMIN}/accounts"), 400, "invalid_request_error")
        # Nothing refused was created, not even half.
        assert_error(admin.get(f"{ADMIN}/accounts/erin"), 404, "not_found_error", "account")
        names = {account["name"] for account in ok(admin.get(f"{ADMIN}/accounts"))["data"]}
        assert names == {"alice", "carol"}


def test_unknown_accounts_are_404(api: Api) -> None:
    with api.admin() as admin:
        for response in [
            admin.get(f"{ADMIN}/accounts/nobody"),
            admin.get(f"{ADMIN}/accounts/acct_0000000000000000"),
            admin.patch(f"{ADMIN}/accounts/nobody", json={"user_group": "vip"}),
            admin.post(f"{ADMIN}/accounts/nobody/credits", json={"credits": 1}),
            admin.get(f"{ADMIN}/accounts/nobody/ledger"),
            admin.get(f"{ADMIN}/keys", params={"account": "nobody"}),
            admin.post(f"{ADMIN}/keys", json={"name": "bot", "account": "nobody"}),
        ]:
            error = assert_error(response, 404, "not_found_error", "account")
            assert re.search(r"'(nobody|acct_0{16})'", error["message"]), error["message"]


def test_patch_changes_the_group_and_limits_and_null_resets_an_override(api: Api) -> None:
    carol = new_account(
        api,
        name="carol",
        credits=3,
        allowed_models=["qwen-image-edit"],
        requests_per_minute=5,
        max_concurrent_tasks=3,
    )
    secret = new_key(api, name="carol-key", account="carol")["secret"]

    def patch(body: dict[str, Any]) -> dict[str, Any]:
        with api.admin() as admin:
            changed = ok(admin.patch(f"{ADMIN}/accounts/carol", json=body))
            assert ok(admin.get(f"{ADMIN}/accounts/{carol['id']}")) == changed
        # The user sees the same limits at once.
        seen = ok(usage(api, secret))
        assert seen["user_group"] == changed["user_group"]
        assert seen["limits"] == changed["limits"]
        return changed

    vip = patch({"user_group": "vip"})
    assert vip["user_group"] == "vip"
    assert vip["limits"] == limits(5, 3) and vip["overrides"] == limits(5, 3)
    assert vip["allowed_models"] == ["qwen-image-edit"] and vip["credits"] == credits(3.0)

    rate_reset = patch({"requests_per_minute": None})
    assert rate_reset["overrides"] == limits(None, 3)
    assert rate_reset["limits"] == limits(600, 3)  # the vip group's rate
    assert rate_reset["allowed_models"] == ["qwen-image-edit"]

    changed = patch({"max_concurrent_tasks": 7, "allowed_models": None})
    assert changed["overrides"] == limits(None, 7) and changed["limits"] == limits(600, 7)
    assert changed["allowed_models"] is None

    back = patch({"user_group": "default", "max_concurrent_tasks": None})
    assert back["user_group"] == "default"
    assert back["overrides"] == limits(None, None) and back["limits"] == limits(60, 10)

    assert patch({}) == back  # fields left out stay as they are
    assert patch({"allowed_models": []})["allowed_models"] == []

    with api.admin() as admin:
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"requests_per_minute": 0}, "requests_per_minute"),
            ({"max_concurrent_tasks": -2}, "max_concurrent_tasks"),
            ({"allowed_models": ["qwen-image-edit", "nope"]}, "allowed_models"),
            ({"user_group": "gold"}, "user_group"),
            ({"credits": 5}, "credits"),  # credits are granted, not patched
            ({"name": "caroline"}, "name"),
            # Types are not guessed at: `true` is no number, "5" no integer.
            ({"max_concurrent_tasks": True}, "max_concurrent_tasks"),
            ({"requests_per_minute": "5"}, "requests_per_minute"),
            # Beyond what a limit column holds: 400, not 500.
            ({"requests_per_minute": 10**21}, "requests_per_minute"),
            ({"max_concurrent_tasks": 1_000_001}, "max_concurrent_tasks"),
        ]
        for body, param in refusals:
            response = admin.patch(f"{ADMIN}/accounts/carol", json=body)
            assert_error(response, 400, "invalid_request_error", param)
        after = ok(admin.get(f"{ADMIN}/accounts/carol"))
    assert after == {**back, "allowed_models": []}


# -- credits and the ledger ---------------------------------------------------------


def test_credits_are_granted_and_taken_back_with_a_ledger_newest_first(api: Api) -> None:
    carol = new_account(api, name="carol", credits=10)
    with api.admin() as admin:
        granted = ok(
            admin.post(f"{ADMIN}/accounts/carol/credits", json={"credits": 2.5, "note": "bonus"})
        )
        assert granted == {**carol, "credits": credits(12.5)}
        api.clock.advance(60)
        taken = ok(admin.post(f"{ADMIN}/accounts/{carol['id']}/credits", json={"credits": -4}))
        assert taken["credits"] == credits(8.5)
        too_much = admin.post(f"{ADMIN}/accounts/carol/credits", json={"credits": -8.501})
        error = assert_error(too_much, 400, "invalid_request_error", "credits")
        assert "8.5" in error["message"]
        too_fine = admin.post(f"{ADMIN}/accounts/carol/credits", json={"credits": 0.0005})
        assert_error(too_fine, 400, "invalid_request_error", "credits")
        missing = admin.post(f"{ADMIN}/accounts/carol/credits", json={"note": "no amount"})
        assert_error(missing, 400, "invalid_request_error", "credits")
        assert ok(admin.get(f"{ADMIN}/accounts/carol"))["credits"] == credits(8.5)

    # A task reserves its price: only what is neither spent nor held can be taken back.
    secret = new_key(api, name="carol-key", account="carol")["secret"]
    api.clock.advance(60)
    with api.client(secret) as client:
        created = client.post(GENERATIONS, json=edit(["https://example.com/a.png"]))
    task = ok(created)
    assert task["usage"]["credits_reserved"] == SPEC.price
    with api.admin() as admin:
        assert ok(admin.get(f"{ADMIN}/accounts/carol"))["credits"] == credits(8.5, 1.5)
        held = admin.post(f"{ADMIN}/accounts/carol/credits", json={"credits": -7.5})
        assert_error(held, 400, "invalid_request_error", "credits")
        emptied = ok(admin.post(f"{ADMIN}/accounts/carol/credits", json={"credits": -7}))
        assert emptied["credits"] == credits(1.5, 1.5)

        ledger = ok(admin.get(f"{ADMIN}/accounts/carol/ledger"))
        assert ledger["object"] == "list"
        entries = ledger["data"]
        start = now(api) - 120
        assert [
            (e["kind"], e["credits"], e["task_id"], e["note"], e["created"]) for e in entries
        ] == [
            ("grant", -7.0, None, "granted through the admin API", start + 120),
            ("reserve", 1.5, task["id"], None, start + 120),
            ("grant", -4.0, None, "granted through the admin API", start + 60),
            ("grant", 2.5, None, "bonus", start),
            ("grant", 10.0, None, "starting credits", start),
        ]
        assert all(e["object"] == "ledger_entry" for e in entries)
        ids = [e["id"] for e in entries]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)

        newest_two = ok(admin.get(f"{ADMIN}/accounts/carol/ledger", params={"limit": 2}))
        assert newest_two["data"] == entries[:2]
        for limit in ["0", "1001", "-1", "ten", ""]:
            bad = admin.get(f"{ADMIN}/accounts/carol/ledger", params={"limit": limit})
            assert_error(bad, 400, "invalid_request_error", "limit")
        # Other accounts' entries are not in carol's ledger.
        alice = ok(admin.get(f"{ADMIN}/accounts/alice/ledger"))["data"]
        assert [(e["kind"], e["credits"]) for e in alice] == [("grant", 100.0)]


# -- keys ---------------------------------------------------------------------------


def test_keys_are_created_once_listed_revoked_and_rotated(api: Api) -> None:
    carol = new_key(api, name="carol", credits=7)
    secret = carol.pop("secret")
    assert secret.startswith("rt_")
    assert KEY_ID.fullmatch(carol["id"]) and ACCOUNT_ID.fullmatch(carol["account"]["id"])
    assert carol == {
        "object": "api_key",
        "id": carol["id"],
        "name": "carol",
        "prefix": secret[:9],
        "account": {"id": carol["account"]["id"], "name": "carol"},
        "created": now(api),
        "revoked": None,
        "rotated": None,
    }
    account_id = carol["account"]["id"]
    seen = ok(usage(api, secret))
    assert seen["account"] == {"id": account_id, "name": "carol"}
    assert seen["credits"] == credits(7.0) and seen["user_group"] == "default"

    # A second key joins the account (by name or by id) and shares its credits.
    bot = new_key(api, name="carol-bot", account="carol")
    by_id = new_key(api, name="carol-ci", account=account_id)
    assert bot["account"] == by_id["account"] == carol["account"]
    with api.admin() as admin:
        ok(admin.post(f"{ADMIN}/accounts/carol/credits", json={"credits": 3}))
    for key_secret in [secret, bot["secret"], by_id["secret"]]:
        assert ok(usage(api, key_secret))["credits"] == credits(10.0)
    assert ok(usage(api, api.secret))["credits"] == credits(100.0)  # alice's, untouched

    with api.admin() as admin:
        taken = admin.post(f"{ADMIN}/keys", json={"name": "carol"})  # a new account "carol"
        assert_error(taken, 409, "conflict_error", "name")
        assert_error(admin.post(f"{ADMIN}/keys", json={}), 400, "invalid_request_error", "name")
        extra = admin.post(f"{ADMIN}/keys", json={"name": "x", "secret": "rt_mine"})
        assert_error(extra, 400, "invalid_request_error", "secret")

        # Listing never shows a secret.
        listed = admin.get(f"{ADMIN}/keys")
        assert ok(listed)["object"] == "list"
        for key_secret in [api.secret, secret, bot["secret"], by_id["secret"]]:
            assert key_secret not in listed.text
        rows = listed.json()["data"]
        assert all("secret" not in row for row in rows)
        assert {row["name"] for row in rows} == {"alice", "carol", "carol-bot", "carol-ci"}
        mine = ok(admin.get(f"{ADMIN}/keys", params={"account": "carol"}))["data"]
        assert {row["id"] for row in mine} == {carol["id"], bot["id"], by_id["id"]}
        assert next(row for row in mine if row["id"] == carol["id"]) == carol

        # Revoking takes effect at once, for that key only.
        assert ok(usage(api, bot["secret"]))["account"]["id"] == account_id
        api.clock.advance(5)
        revoked = ok(admin.post(f"{ADMIN}/keys/{bot['id']}/revoke"))
        assert revoked == {**{k: v for k, v in bot.items() if k != "secret"}, "revoked": now(api)}
        assert_error(usage(api, bot["secret"]), 401, "authentication_error")
        assert ok(usage(api, secret))["account"]["id"] == account_id
        unknown = admin.post(f"{ADMIN}/keys/key_0000000000000000/revoke")
        assert_error(unknown, 404, "not_found_error", "key_id")

        # Rotating: the key gets a new secret, the old one stops at once, and the key
        # keeps its id, its account and what it reaches.
        api.clock.advance(5)
        rotated = ok(admin.post(f"{ADMIN}/keys/{carol['id']}/rotate"))
        new_secret = rotated.pop("secret")
        assert new_secret.startswith("rt_") and new_secret != secret
        assert rotated == {**carol, "prefix": new_secret[:9], "rotated": now(api)}
        assert_error(usage(api, secret), 401, "authentication_error")
        assert ok(usage(api, new_secret))["account"] == {"id": account_id, "name": "carol"}
        assert ok(usage(api, new_secret))["credits"] == credits(10.0)

        # A key may be rotated again (its latest secret alone works), a revoked one not.
        api.clock.advance(5)
        again = ok(admin.post(f"{ADMIN}/keys/{carol['id']}/rotate"))
        newest = again.pop("secret")
        assert again == {**rotated, "prefix": newest[:9], "rotated": now(api)}
        assert_error(usage(api, new_secret), 401, "authentication_error")
        assert ok(usage(api, newest))["account"]["id"] == account_id
        assert_error(
            admin.post(f"{ADMIN}/keys/{bot['id']}/rotate"), 409, "conflict_error", "key_id"
        )
        unknown = admin.post(f"{ADMIN}/keys/key_0000000000000000/rotate")
        assert_error(unknown, 404, "not_found_error", "key_id")

        states = {
            row["id"]: row["revoked"]
            for row in ok(admin.get(f"{ADMIN}/keys", params={"account": account_id}))["data"]
        }
    assert states == {carol["id"]: None, bot["id"]: now(api) - 10, by_id["id"]: None}


def test_a_key_for_an_existing_account_refuses_new_account_fields(api: Api) -> None:
    """`credits` and `user_group` describe a new account (the CLI refuses them with
    `--account`); given with `account`, they must not be dropped without a word."""
    with api.admin() as admin:
        with_credits = admin.post(
            f"{ADMIN}/keys", json={"name": "bot", "account": "alice", "credits": 50}
        )
        assert_error(with_credits, 400, "invalid_request_error", "credits")
        with_group = admin.post(
            f"{ADMIN}/keys", json={"name": "bot", "account": "alice", "user_group": "vip"}
        )
        assert_error(with_group, 400, "invalid_request_error", "user_group")
        alice = ok(admin.get(f"{ADMIN}/accounts/alice"))
        assert alice["credits"] == credits(100.0) and alice["user_group"] == "default"
        assert [key["name"] for key in ok(admin.get(f"{ADMIN}/keys"))["data"]] == ["alice"]


# -- the effect on users --------------------------------------------------------------


def test_allowed_models_apply_to_the_users_requests_at_once(api: Api) -> None:
    with api.client() as client:
        assert [m["id"] for m in ok(client.get("/v1/models"))["data"]] == ["qwen-image-edit"]
    with api.admin() as admin:
        changed = admin.patch(
            f"{ADMIN}/accounts/alice", json={"allowed_models": ["qwen-image-edit-single"]}
        )
        assert ok(changed)["allowed_models"] == ["qwen-image-edit-single"]
    with api.client() as client:
        refused = client.post(GENERATIONS, json=edit(["https://example.com/a.png"]))
        error = assert_error(refused, 403, "permission_error", "model")
        assert "'alice'" in error["message"] and "'qwen-image-edit'" in error["message"]
        # The single-image model is vip-only: alice (default group) now sees no model.
        assert ok(client.get("/v1/models"))["data"] == []
        assert ok(client.get("/v1/usage"))["credits"] == credits(100.0)  # nothing reserved
    with api.admin() as admin:
        ok(admin.patch(f"{ADMIN}/accounts/alice", json={"allowed_models": None}))
    with api.client() as client:
        assert [m["id"] for m in ok(client.get("/v1/models"))["data"]] == ["qwen-image-edit"]
        ok(client.post(GENERATIONS, json=edit(["https://example.com/a.png"])))
        assert ok(client.get("/v1/usage"))["credits"] == credits(100.0, SPEC.price)


# -- the ledger check -------------------------------------------------------------------


def test_the_ledger_check_finds_a_balance_changed_behind_its_back(api: Api) -> None:
    alice = api.store.get_account("alice")
    with api.admin() as admin:
        clean = ok(admin.get(f"{ADMIN}/ledger/check"))
        assert clean == {"object": "ledger_check", "ok": True, "problems": []}
        corrupt(api.store, "UPDATE accounts SET balance_units = balance_units + 1")
        try:
            damaged = ok(admin.get(f"{ADMIN}/ledger/check"))
        finally:
            corrupt(api.store, "UPDATE accounts SET balance_units = balance_units - 1")
        assert damaged["object"] == "ledger_check" and damaged["ok"] is False
        [problem] = damaged["problems"]
        # (PostgreSQL's sum() is a decimal: its total prints as "100", SQLite's as "100.0".)
        expected = rf"account {alice.id}: balance 100\.001 but its entries sum to 100(\.0)?"
        assert re.fullmatch(expected, problem), problem
        assert ok(admin.get(f"{ADMIN}/ledger/check")) == clean


# -- the OpenAPI document -------------------------------------------------------------


def test_openapi_documents_the_admin_routes_with_the_admin_token(api: Api) -> None:
    spec = httpx.get(f"{api.url}/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["adminToken"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    documented = {
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        if path.startswith(ADMIN)
        for method in operations
    }
    expected = {
        (method, re.sub(r"/alice\b", "/{account}", re.sub(r"/key_0+", "/{key_id}", path)))
        for method, path, _body in ADMIN_ROUTES
    }
    assert documented == expected
    for method, path in expected:
        operation = spec["paths"][path][method.lower()]
        assert operation["security"] == [{"adminToken": []}], (method, path)
        assert operation["tags"] == ["Admin"]
        assert {"401", "403"} <= set(operation["responses"]) and "422" not in operation["responses"]
    # Every body is documented, required, and described by a schema in the components.
    schemas = spec["components"]["schemas"]
    for method, path, body in ADMIN_ROUTES:
        path = re.sub(r"/alice\b", "/{account}", re.sub(r"/key_0+", "/{key_id}", path))
        operation = spec["paths"][path][method.lower()]
        if body is None:
            assert "requestBody" not in operation, (method, path)
            continue
        request_body = operation["requestBody"]
        assert request_body["required"] is True
        ref = request_body["content"]["application/json"]["schema"]["$ref"]
        schema = schemas[ref.rsplit("/", 1)[1]]
        assert set(body) <= set(schema["properties"]), (method, path)
        assert schema["additionalProperties"] is False
    ledger = spec["paths"][f"{ADMIN}/accounts/{{account}}/ledger"]["get"]
    assert [p["name"] for p in ledger["parameters"]] == ["account", "limit"]
    assert "400" in ledger["responses"]


# -- refusals that must not be 500 ------------------------------------------------------
#
# These go through the same app in process: the live server logs an unexpected error's
# traceback from its own thread after answering, and CPython 3.11 (3.11.7 at least) can
# fail with "SystemError: AST constructor recursion depth mismatch" when that thread
# and pytest, reporting the failed test, build tracebacks at once (an INTERNALERROR
# that would end the whole session).


def in_process_admin(api: Api) -> TestClient:
    admin = AdminService(
        api.store,
        ADMIN_TOKEN,
        models=list(api.service.models),
        signing_key=SIGNING_KEY,
    )
    return TestClient(
        create_app(api.service, admin=admin),
        raise_server_exceptions=False,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )


def test_amounts_beyond_the_ledgers_range_are_400_not_500(api: Api) -> None:
    """Credits are stored as integer thousandths in a 64-bit column: an amount that
    does not fit (or is not finite: Python's JSON reader takes `Infinity`) is a bad
    request, like an amount finer than 0.001 credit, not an internal error."""
    with in_process_admin(api) as admin:
        for amount in [b"1e16", b"Infinity", b"-Infinity"]:
            granted = admin.post(
                f"{ADMIN}/accounts/alice/credits", content=b'{"credits": %s}' % amount
            )
            assert_error(granted, 400, "invalid_request_error", "credits")
            created = admin.post(
                f"{ADMIN}/accounts", content=b'{"name": "rich", "credits": %s}' % amount
            )
            assert_error(created, 400, "invalid_request_error", "credits")
        assert ok(admin.get(f"{ADMIN}/accounts/alice"))["credits"] == credits(100.0)
        assert_error(admin.get(f"{ADMIN}/accounts/rich"), 404, "not_found_error", "account")


def test_admin_bodies_refuse_coerced_types_and_limits_beyond_range(api: Api) -> None:
    with in_process_admin(api) as admin:
        for body, param in [
            ({"credits": False}, "credits"),
            ({"credits": "5"}, "credits"),
        ]:
            granted = admin.post(f"{ADMIN}/accounts/alice/credits", json=body)
            assert_error(granted, 400, "invalid_request_error", param)
        for body, param in [
            ({"name": "x", "requests_per_minute": 3 * 10**24}, "requests_per_minute"),
            ({"name": "x", "max_concurrent_tasks": 2165218889210}, "max_concurrent_tasks"),
            ({"name": "x", "credits": True}, "credits"),
        ]:
            created = admin.post(f"{ADMIN}/accounts", json=body)
            assert_error(created, 400, "invalid_request_error", param)
        edge = ok(
            admin.post(
                f"{ADMIN}/accounts",
                json={"name": "edge", "requests_per_minute": 1_000_000, "max_concurrent_tasks": 1},
            ),
            201,
        )
        assert edge["limits"] == limits(1_000_000, 1)
        assert ok(admin.get(f"{ADMIN}/accounts/alice"))["credits"] == credits(100.0)
        assert_error(admin.get(f"{ADMIN}/accounts/x"), 404, "not_found_error", "account")


def test_a_ledger_limit_that_only_looks_like_digits_is_400_not_500(api: Api) -> None:
    """`"²".isdigit()` is true but `int("²")` fails."""
    with in_process_admin(api) as admin:
        for limit in ["²", "1²"]:
            response = admin.get(f"{ADMIN}/accounts/alice/ledger", params={"limit": limit})
            assert_error(response, 400, "invalid_request_error", "limit")


@pytest.mark.parametrize("bad", ["red\x1b[31m", "two\nlines", "nul\x00", "x" * 201])
def test_names_and_notes_are_printable_text_on_every_backend(api: Api, bad: str) -> None:
    """Names and notes end up in terminals (`retouch keys list`) and in PostgreSQL, which
    refuses NUL: control characters are refused alike on each backend, and so is a
    name past its column."""
    with api.admin() as admin:
        assert_error(
            admin.post(f"{ADMIN}/keys", json={"name": bad}), 400, "invalid_request_error", "name"
        )
        refused = admin.post(f"{ADMIN}/accounts", json={"name": bad})
        assert_error(refused, 400, "invalid_request_error", "name")
        if len(bad) <= 200:  # a control character: a note may not hold one either
            grant = {"credits": 1, "note": bad}
            refused = admin.post(f"{ADMIN}/accounts/alice/credits", json=grant)
            assert_error(refused, 400, "invalid_request_error", "note")
    with pytest.raises(InvalidRequestError, match="`name`"):
        api.store.create_key(bad)
    assert [key.name for key in api.store.list_keys()] == ["alice"]
    assert api.store.get_account("alice").balance == 100.0
