"""`python -m crm_sync webhooks install|status|remove` against the running AC emulator."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_sync.state import StateStore
from crm_sync.webhooks import EVENTS, RECEIVER_PATH, SOURCES, WEBHOOK_NAME, parse_form

from tests.unit.test_alerts import cli

pytestmark = pytest.mark.sandbox

HOST = "https://airflow.example.com"
SECRET = secrets.token_urlsafe(32)
ROTATED = secrets.token_urlsafe(32)


class Records(logging.Handler):
    """Every log record of the project's loggers, formatted, whatever the CLI does to the root."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def seen(sandbox_env: Any, capsys: pytest.CaptureFixture[str]) -> Iterator[list[str]]:
    """What the commands printed and logged (read it after the commands ran)."""
    records = Records()
    loggers = [logging.getLogger(n) for n in ("crm_connectors", "crm_sync", "airflow")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(records)
    text: list[str] = []
    yield text
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(records)
        lg.setLevel(level)
    captured = capsys.readouterr()
    text += [captured.out, captured.err, *records.lines]
    assert SECRET not in "\n".join(text)
    assert ROTATED not in "\n".join(text)


def connect(monkeypatch: pytest.MonkeyPatch, host: str = HOST, secret: str = SECRET) -> None:
    conn = {"conn_type": "http", "host": host, "password": secret}
    monkeypatch.setenv("AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK", json.dumps(conn))


def run(seen: list[str], capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """One command with -v (every log line on stderr); its output is kept in `seen`."""
    code = cli(["webhooks", *argv, "-v"])
    captured = capsys.readouterr()
    seen += [captured.out, captured.err]
    return code, " ".join(captured.out.split()), captured.err  # the table's wrapping undone


def registered() -> list[dict[str, Any]]:
    hook = ActiveCampaignHook(rate_limit=None)
    try:
        return hook.list_webhooks()
    finally:
        hook.close()


def test_install_is_idempotent_and_replaces_a_rotated_secret_create_first(
    seen: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    connect(monkeypatch)
    code, out, _ = run(seen, capsys, "install")
    assert code == 0, out
    masked = f"{HOST}{RECEIVER_PATH}/***"
    assert f"installed, id 1: {masked}" in out
    [hook] = registered()
    assert (hook["name"], hook["url"]) == (WEBHOOK_NAME, f"{HOST}{RECEIVER_PATH}/{SECRET}")
    assert (set(hook["events"]), set(hook["sources"])) == (set(EVENTS), set(SOURCES))

    code, out, err = run(seen, capsys, "install")
    assert code == 0
    assert "already installed, id 1" in out and "nothing to do" in out
    assert "POST /api/3/webhooks" not in err
    assert [w["id"] for w in registered()] == ["1"]

    connect(monkeypatch, secret=ROTATED)
    code, out, err = run(seen, capsys, "install")
    assert code == 0, out
    assert f"installed, id 2: {HOST}{RECEIVER_PATH}/***" in out
    assert "deleted id 1: another URL (the secret or the host changed)" in out
    # The new one exists before the old one goes: no event is missed in between.
    assert err.index("POST /api/3/webhooks ->") < err.index("DELETE /api/3/webhooks/1 ->")
    assert [(w["id"], w["url"]) for w in registered()] == [
        ("2", f"{HOST}{RECEIVER_PATH}/{ROTATED}")
    ]


def test_install_replaces_other_events_and_extra_copies(
    seen: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    connect(monkeypatch)
    url = f"{HOST}{RECEIVER_PATH}/{SECRET}"
    hook = ActiveCampaignHook(rate_limit=None)
    hook.create_webhook(WEBHOOK_NAME, url, ["update"], SOURCES)
    hook.create_webhook("someone else's", url, ["update"], ["api"])
    code, out, _ = run(seen, capsys, "install")
    assert code == 0, out
    assert "deleted id 1: other events (update)" in out
    hook.create_webhook(WEBHOOK_NAME, url, EVENTS, SOURCES)  # a copy, as after an interruption
    code, out, _ = run(seen, capsys, "install")
    assert "already installed, id 3" in out and "deleted id 4: a second copy of ours" in out
    code, out, _ = run(seen, capsys, "install", "--force")
    assert "installed, id 5" in out and "deleted id 3: replaced on request (--force)" in out
    assert [w["id"] for w in hook.list_webhooks()] == ["2", "5"]  # not someone else's
    hook.close()


def test_status_reports_both_views_and_exits_1_unless_installed_at_the_right_url(
    seen: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    connect(monkeypatch)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv(
        "AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps({"conn_type": "generic", "host": state})
    )
    code, out, _ = run(seen, capsys, "status")
    assert code == 1, out
    assert "not installed: run `python -m crm_sync webhooks install`" in out
    run(seen, capsys, "install")
    code, out, _ = run(seen, capsys, "status")
    assert code == 0, out
    assert "installed, id 1" in out and "events contact_tag_added" in out
    assert "webhook url ok matches connection 'activecampaign_webhook'" in out
    # The receiver's view (StateStore.webhook_stats): nothing received yet is a warning.
    assert "receiver warn 0 events received in the last 24 h (0 duplicates), last never" in out
    store = StateStore.from_url(state)
    event = parse_form([("type", "update"), ("date_time", "2026-12-06T10:00:00-06:00"),
                        ("contact[id]", "7")])  # fmt: skip
    store.enqueue_webhook(event)
    store.enqueue_webhook(event)  # delivered twice
    store.engine.dispose()
    code, out, _ = run(seen, capsys, "status")
    assert code == 0, out
    assert "receiver ok 1 events received in the last 24 h (1 duplicates), last 20" in out
    assert "; 1 pending (oldest 20" in out
    connect(monkeypatch, host="https://moved.example.com")
    code, out, _ = run(seen, capsys, "status")
    assert code == 1
    assert "gives https://moved.example.com/crm-sync-webhooks/activecampaign/" in out
    assert "does not post to" in out


def test_remove_deletes_ours_and_is_fine_when_there_is_none(
    seen: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    connect(monkeypatch)
    run(seen, capsys, "install")
    code, out, _ = run(seen, capsys, "remove")
    assert (code, "removed, id 1" in out) == (0, True)
    assert registered() == []
    monkeypatch.delenv("AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK")  # remove does not need it
    code, out, _ = run(seen, capsys, "remove")
    assert (code, "not installed: nothing to remove" in out) == (0, True)


@pytest.mark.parametrize(
    ("host", "secret", "expected"),
    [
        (None, None, "secrets.token_urlsafe(32)"),
        (HOST, "short-but-secret", "at least 24"),
        (HOST, SECRET + "/x", "at least 24"),
        ("https://airflow.example.com:8443", SECRET, "port 443 only, not 8443"),
        ("http://airflow.example.com", SECRET, "plain http"),
    ],
    # Named, not by value: the random secret would differ between xdist workers' collections.
    ids=["no connection", "short", "not url-safe", "https port", "plain http"],
)
def test_an_unfit_connection_is_refused_clearly_without_the_secret(
    seen: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    host: str | None,
    secret: str | None,
    expected: str,
) -> None:
    if host is None:
        monkeypatch.delenv("AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK", raising=False)
    else:
        connect(monkeypatch, host, secret or "")
    code, out, _ = run(seen, capsys, "install")
    assert code == 2
    assert expected in out
    if host is None:
        assert "airflow connections add activecampaign_webhook" in out
    assert registered() == []
    code, out, _ = run(seen, capsys, "status")
    assert code == 1 and expected in out


def test_an_installed_webhook_posts_to_the_receiver_path_with_the_secret(
    seen: list[str],
    sandbox_env: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    posts: list[tuple[str, list[tuple[str, str]]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"])).decode()
            posts.append((self.path, parse_qsl(body, keep_blank_values=True)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
    try:
        connect(monkeypatch, host=f"http://127.0.0.1:{server.server_address[1]}")
        assert run(seen, capsys, "install")[0] == 0
        hook = ActiveCampaignHook(rate_limit=None)
        contact = hook.sync_contact({"email": "hooked@example.com"})  # source api: not heard
        hook.close()
        body = {"contact_ids": [contact["id"]], "type": "lead"}
        sandbox_env.admin("ac", "POST", "automation", json=body)  # source system
        deadline = time.monotonic() + 5
        while len(posts) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        server.shutdown()
    assert [path for path, _ in posts] == [f"{RECEIVER_PATH}/{SECRET}"] * 2
    events = [parse_form(form) for _, form in posts]
    assert [(e.event_type, e.contact_id) for e in events] == [
        ("contact_tag_added", contact["id"])
    ] * 2


def test_activecampaign_refusing_is_exit_2_and_keeps_the_old_webhook(
    seen: list[str],
    sandbox_env: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    connect(monkeypatch)
    run(seen, capsys, "install")
    connect(monkeypatch, secret=ROTATED)
    fault = {"status": 500, "count": 10, "path_prefix": "/api/3/webhooks", "method": "POST"}
    sandbox_env.admin("ac", "POST", "faults", json=fault)
    code, out, _ = run(seen, capsys, "install")
    assert code == 2
    assert "webhooks install fail" in out and "500" in out
    assert [w["url"] for w in registered()] == [f"{HOST}{RECEIVER_PATH}/{SECRET}"]
