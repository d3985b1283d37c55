"""TLS (issue 9): verification is on by default, a wrong CA fails at once with a clear message,
and no connection extra or environment variable switches it off or overrides the pinned CA."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_connectors.dynamics365 import Dynamics365Hook
from crm_connectors.errors import TlsError

from tests.conftest import PROJECT_ROOT, Sandbox

pytestmark = pytest.mark.sandbox

DV = "AIRFLOW_CONN_DYNAMICS365_DEFAULT"
AC = "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT"


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A certificate authority that did not sign the sandbox's certificate."""
    from sandbox.tls import ensure_certificates

    return str(ensure_certificates(tmp_path_factory.mktemp("other-ca"), ["127.0.0.1"]).ca_path)


def _dv_connection(sandbox: Sandbox, **extra: Any) -> str:
    connection = json.loads(sandbox.connection_env()[DV])
    extras = {**connection["extra"], **extra}
    return json.dumps({**connection, "extra": {k: v for k, v in extras.items() if v is not None}})


def _refused(hook: Any, call: Any) -> str:
    """Run `call`; it must fail with a clear TLS message, at once (no retries)."""
    started = time.monotonic()
    with pytest.raises(TlsError) as caught:
        call(hook)
    assert time.monotonic() - started < 5, "a certificate failure must not be retried"
    message = str(caught.value)
    assert "TLS certificate verification failed" in message
    assert "ca_bundle" in message and "cannot be switched off" in message
    assert re.search(r"certificate verify failed|doesn't match", message), message
    return message


@pytest.mark.parametrize(
    ("extra", "env"),
    [
        ({"ca_bundle": None}, {}),
        ({"ca_bundle": "OTHER"}, {}),
        ({"ca_bundle": "OTHER"}, {"REQUESTS_CA_BUNDLE": "SANDBOX", "CURL_CA_BUNDLE": "SANDBOX"}),
        ({"ca_bundle": None, "verify": False}, {"CURL_CA_BUNDLE": "", "PYTHONHTTPSVERIFY": "0"}),
        ({"ca_bundle": False}, {}),
        ({"ca_bundle": ""}, {}),
    ],
    ids=[
        "no-ca-given", "wrong-ca", "env-cannot-override-the-pinned-ca",
        "verify-false-is-ignored", "ca-bundle-false", "ca-bundle-empty",
    ],
)  # fmt: skip
def test_dataverse_refuses_a_certificate_it_cannot_verify(
    extra: dict[str, Any],
    env: dict[str, str],
    sandbox: Sandbox,
    other_ca: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolve = {"OTHER": other_ca, "SANDBOX": sandbox.ca_path}
    extra = {k: resolve.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
    monkeypatch.setenv(DV, _dv_connection(sandbox, **extra))
    for name, value in env.items():
        monkeypatch.setenv(name, resolve.get(value, value))
    with Dynamics365Hook() as hook:
        message = _refused(hook, lambda h: h.whoami())
        assert "127.0.0.1" in message
        ok, text = hook.test_connection()
    assert not ok and "TLS certificate verification failed" in text


def test_activecampaign_refuses_a_certificate_it_cannot_verify(
    sandbox: Sandbox, other_ca: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ActiveCampaign emulator speaks plain HTTP: point the connection at an HTTPS server.
    token = sandbox.credentials.ac_api_token
    for extra in ({}, {"ca_bundle": other_ca}, {"ca_bundle": False}):
        monkeypatch.setenv(
            AC, json.dumps({"conn_type": "http", "host": sandbox.d365_url, "password": token, "extra": extra})
        )  # fmt: skip
        with ActiveCampaignHook(rate_limit=None) as hook:
            _refused(hook, lambda h: h.request("GET", "/api/3/users/me"))


def test_the_right_ca_works_and_is_the_only_one_trusted(
    sandbox: Sandbox, other_ca: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pinned: the environment's bundle (another CA) does not replace the connection's.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", other_ca)
    monkeypatch.setenv(DV, _dv_connection(sandbox))
    with Dynamics365Hook() as hook:
        assert hook.whoami()["UserId"]


TLS_OFF = re.compile(
    r"verify\s*=\s*False|CERT_NONE|_create_unverified_context|check_hostname\s*=\s*False"
    r"|disable_warnings|PYTHONHTTPSVERIFY|CURL_CA_BUNDLE|InsecureRequestWarning"
)


def tls_switches(root: Path) -> list[str]:
    """Places in the shipped code that could switch certificate verification off."""
    found = []
    for folder in ("dags", "include", "plugins"):
        for path in sorted((root / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if TLS_OFF.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_shipped_code_switches_verification_off(tmp_path: Path) -> None:
    assert tls_switches(PROJECT_ROOT) == []
    # The check itself finds such a switch.
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "hook.py").write_text("session.get(url, verify=False)\n")
    assert tls_switches(tmp_path) == ["plugins/hook.py:1: session.get(url, verify=False)"]
