"""The `retouch keys|accounts|credits|ledger` commands, run as real processes
against a data directory of their own (SQLite)."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from pathlib import Path

from tests.support import retouch_cli

SECRET = re.compile(r"rt_[A-Za-z0-9_-]{43}")
CREATED = re.compile(r"Created key (key_[0-9a-f]{16}) for ")


def cli(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return retouch_cli(*args, "--data-dir", str(data_dir), check=check)


def create_key(data_dir: Path, *args: str) -> tuple[str, str, str]:
    """(key id, secret, what was said on stderr) of `keys create ARGS`."""
    result = cli(data_dir, "keys", "create", *args)
    secret = result.stdout.strip()
    assert SECRET.fullmatch(secret), result.stdout  # the secret alone on stdout
    found = CREATED.search(result.stderr)
    assert found, result.stderr
    assert secret not in result.stderr
    return found.group(1), secret, result.stderr


def key_rows(data_dir: Path) -> dict[str, list[str]]:
    """`keys list` as {key id: [name, prefix, account, status]}."""
    lines = cli(data_dir, "keys", "list").stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "PREFIX", "ACCOUNT", "CREATED", "STATUS"]
    rows = {}
    for line in lines[1:]:
        key_id, name, prefix, account, _day, _time, status = line.split(None, 6)
        rows[key_id] = [name, prefix, account, status]
    return rows


def test_keys_accounts_and_credits_from_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    alice_id, alice_secret, said = create_key(data, "--name", "alice", "--credits", "5")
    account = re.search(r"account 'alice', (acct_[0-9a-f]{16}), default, 5 credits available", said)
    assert account, said
    account_id = account.group(1)
    assert "whsec_" in said  # the account's webhook secret

    taken = cli(data, "keys", "create", "--name", "alice", check=False)
    assert taken.returncode == 1 and taken.stdout == ""
    assert "already exists" in taken.stderr and "--account 'alice'" in taken.stderr
    assert "Traceback" not in taken.stderr
    mixed = cli(
        data, "keys", "create", "--name", "x", "--account", "alice", "--credits", "3", check=False
    )
    assert mixed.returncode == 2 and "--credits" in mixed.stderr and mixed.stdout == ""

    bot_id, bot_secret, said = create_key(data, "--name", "bot", "--account", "alice")
    assert f"account 'alice', {account_id}, default, 5 credits available" in said
    assert bot_secret != alice_secret
    assert key_rows(data) == {
        alice_id: ["alice", alice_secret[:9] + "…", "alice", "active"],
        bot_id: ["bot", bot_secret[:9] + "…", "alice", "active"],
    }

    granted = cli(data, "credits", "grant", "alice", "3.5")
    assert granted.stderr.strip() == "alice: 8.5 credits (8.5 available)"
    # A negative amount takes credits back, written as the README shows it.
    taken = cli(data, "credits", "grant", "alice", "-1", "--note", "goodwill ended")
    assert taken.stderr.strip() == "alice: 7.5 credits (7.5 available)"
    updated = cli(
        data, "accounts", "update", "alice", "--group", "vip", "--rate", "5",
        "--concurrency", "default", "--models", "qwen-image-edit",
    )  # fmt: skip
    expected = [
        f"alice ({account_id}), vip",
        "credits: 7.5 balance, 0 reserved, 7.5 available",
        "models: qwen-image-edit",
        "limits: 5 tasks/minute, 50 unfinished tasks",  # the vip group's concurrency
    ]
    assert updated.stdout.splitlines() == expected
    shown = cli(data, "accounts", "show", account_id).stdout.splitlines()
    assert shown[:4] == expected
    assert shown[4] == "latest entries:"
    assert [line.split(None, 2)[2].split() for line in shown[5:]] == [
        ["grant", "-1", "(goodwill", "ended)"],
        ["grant", "3.5", "(granted", "from", "the", "CLI)"],
        ["grant", "5", "(starting", "credits)"],
    ]

    rotated = cli(data, "keys", "rotate", alice_id)
    new_secret = rotated.stdout.strip()
    assert SECRET.fullmatch(new_secret) and new_secret != alice_secret
    assert rotated.stderr.strip() == (
        f"Rotated {alice_id}: the old secret no longer works. Keep the new one safe."
    )

    unknown = cli(data, "keys", "revoke", "key_0000000000000000", check=False)
    assert unknown.returncode == 1
    assert "no active key with id 'key_0000000000000000'" in unknown.stderr
    assert cli(data, "keys", "revoke", bot_id).stderr.strip() == f"Revoked {bot_id}."

    rows = key_rows(data)
    assert rows[bot_id] == ["bot", bot_secret[:9] + "…", "alice", "revoked"]
    assert rows[alice_id][:3] == ["alice", new_secret[:9] + "…", "alice"]
    assert re.fullmatch(r"active \(rotated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", rows[alice_id][3])
    assert set(rows) == {alice_id, bot_id}
    listed = cli(data, "accounts", "list").stdout.splitlines()
    assert [line.split() for line in listed[1:]] == [
        [account_id, "alice", "vip", "7.5", "0", "7.5"]
    ]


def test_ledger_check_finds_damage_and_passes_once_it_is_repaired(tmp_path: Path) -> None:
    data = tmp_path / "data"
    create_key(data, "--name", "alice", "--credits", "5")
    clean = cli(data, "ledger", "check")
    assert clean.stdout == "" and clean.stderr.strip() == "The ledger is consistent."

    database = data / "retouch.db"
    with sqlite3.connect(database) as conn:
        (account_id,) = conn.execute("SELECT id FROM accounts WHERE name = 'alice'").fetchone()
        conn.execute("UPDATE accounts SET reserved_units = 3")
    try:
        damaged = cli(data, "ledger", "check", check=False)
    finally:
        with sqlite3.connect(database) as conn:
            conn.execute("UPDATE accounts SET reserved_units = 0")
    assert damaged.returncode == 1
    assert damaged.stdout.splitlines() == [
        f"account {account_id}: 0.003 credits reserved but its open reservations sum to 0.0"
    ]
    assert "the ledger has 1 problem(s)" in damaged.stderr

    repaired = cli(data, "ledger", "check")
    assert repaired.stderr.strip() == "The ledger is consistent."


def test_amounts_the_ledger_cannot_hold_are_refused_in_one_line(tmp_path: Path) -> None:
    """Like an amount finer than 0.001 credit, an amount beyond the ledger's 64-bit
    range (or not finite) is refused with a one-line error, never a traceback; so is a
    limit that only looks like digits (`"²".isdigit()` is true)."""
    data = tmp_path / "data"
    create_key(data, "--name", "alice", "--credits", "5")
    refusals = [
        ("credits", "grant", "alice", "0.0001"),
        ("credits", "grant", "alice", "1e16"),
        ("credits", "grant", "alice", "inf"),
        ("accounts", "update", "alice", "--rate", "²"),
        ("accounts", "update", "alice", "--concurrency", "1000001"),
    ]
    for args in refusals:
        result = cli(data, *args, check=False)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stderr.startswith(("Error: ", "Usage: ")), (args, result.stderr)
    shown = cli(data, "accounts", "show", "alice").stdout.splitlines()
    assert shown[1] == "credits: 5 balance, 0 reserved, 5 available"
    assert shown[3] == "limits: 60 tasks/minute, 10 unfinished tasks"


def test_an_account_may_be_given_only_models_the_settings_serve(tmp_path: Path) -> None:
    """A name the server does not serve (a typo) would leave the account unable to use
    the model it was meant to have: refused, as the admin API refuses it, naming what is
    served; the models come from the same settings as `retouch serve`'s."""
    data = tmp_path / "data"
    create_key(data, "--name", "alice")
    typo = cli(data, "accounts", "update", "alice", "--models", "qwen-image-edt", check=False)
    assert typo.returncode == 2 and typo.stdout == ""
    assert "Invalid value for '--models': no model qwen-image-edt is served" in typo.stderr
    assert "which serve qwen-image-edit;" in typo.stderr
    assert "--models-file or --model-name" in typo.stderr
    assert cli(data, "accounts", "show", "alice").stdout.splitlines()[2] == "models: all"

    models = tmp_path / "models.toml"
    models.write_text(
        '[models.qwen-image-edit]\ncheckpoint = "fixture"\n\n'
        '[models.qwen-image-edit-hd]\ncheckpoint = "fixture"\nprice = 2.5\n'
    )
    from_file = ("--models-file", str(models))
    hd = cli(data, "accounts", "update", "alice", "--models", "qwen-image-edit-hd", *from_file)
    assert hd.stdout.splitlines()[2] == "models: qwen-image-edit-hd"
    mixed = cli(
        data, "accounts", "update", "alice", "--models", "qwen-image-edit-hd,fast,edit",
        *from_file, check=False,
    )  # fmt: skip
    assert mixed.returncode == 2
    assert "no model edit, fast is served" in mixed.stderr
    assert "server's models file" in mixed.stderr
    renamed = cli(data, "accounts", "update", "alice", "--models", "mine", "--model-name", "mine")
    assert renamed.stdout.splitlines()[2] == "models: mine"
    # `all` needs no served names.
    assert cli(data, "accounts", "update", "alice", "--models", "all").stdout.splitlines()[2] == (
        "models: all"
    )
