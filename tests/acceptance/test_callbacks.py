"""A callback end to end: `retouch serve` sends a signed task detail to an HTTPS
receiver whose CA it trusts through SSL_CERT_FILE."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import trustme
from standardwebhooks.webhooks import Webhook

from tests.integration.test_callbacks import Receiver
from tests.support import ImageHost, ServeProcess, png_bytes, retouch_cli, wait_for

pytestmark = pytest.mark.acceptance


def test_a_finished_task_calls_back_signed(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    receiver = Receiver(ca)
    images = ImageHost()
    data_dir = tmp_path / "data"
    created = retouch_cli("keys", "create", "--name", "alice", "--data-dir", str(data_dir))
    secret = re.search(r"whsec_\S+", created.stderr)
    assert secret is not None, created.stderr
    server = ServeProcess(
        data_dir,
        "--model", "fixture", "--allow-private-networks",
        "--fetch-ports", "any", "--callback-ports", "any",
        env={"SSL_CERT_FILE": str(ca_file)},
    )  # fmt: skip
    server.start()
    try:
        headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
        body = {
            "model": "qwen-image-edit",
            "prompt": "make it blue",
            "image_urls": [images.add("/a.png", png_bytes())],
            "callback_url": receiver.url,
        }
        # Created through another name for the server than the one it listens on: with
        # no --public-url, the callback's links use the address the client used.
        url = server.url.replace("127.0.0.1", "localhost")
        task = httpx.post(f"{url}/v1/images/generations", json=body, headers=headers).json()
        wait_for(lambda: receiver.received, timeout=30, what="the callback")
        payload = Webhook(secret[0]).verify(receiver.received[0].body, receiver.received[0].headers)
        assert payload["id"] == task["id"] and payload["status"] == "completed"
        assert payload["results"][0].startswith(f"{url}/v1/files/")
        detail = wait_for(
            lambda: (
                (d := httpx.get(f"{url}/v1/tasks/{task['id']}", headers=headers).json())[
                    "callback"
                ]["status"]
                == "delivered"
                and d
            ),
            timeout=10,
        )
        assert detail["callback"] == {"status": "delivered", "attempts": 1, "last_status_code": 200}
        assert payload["results"] == detail["results"], "the callback's links are the poll's"
        assert httpx.get(payload["results"][0]).status_code == 200
    finally:
        server.stop()
        receiver.close()
        images.close()
