"""Where the hooks send credentials (issue 13, items 6 and 7): https unless the host is this
machine, a scheme-less host means https, and a host that does not exist fails at once. No
network: nothing here reaches a server."""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

import pytest
import requests
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_connectors.base import is_loopback
from crm_connectors.dynamics365 import Dynamics365Hook
from crm_connectors.errors import (
    ApiConnectionError,
    ConnectionSettingsError,
    InsecureConnectionError,
    UnknownHostError,
)
from crm_connectors.retry import RetryPolicy

AC = "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT"
DV = "AIRFLOW_CONN_DYNAMICS365_DEFAULT"
TOKEN = "ac-token-never-sent-in-clear"
SECRET = "client-secret-never-sent"


def ac_connection(monkeypatch: pytest.MonkeyPatch, host: str, **fields: Any) -> None:
    monkeypatch.setenv(
        AC, json.dumps({"conn_type": "http", "host": host, "password": TOKEN, **fields})
    )


def dv_connection(monkeypatch: pytest.MonkeyPatch, host: str, **extra: Any) -> None:
    connection = {
        "conn_type": "http",
        "host": host,
        "login": "client-id",
        "password": SECRET,
        "extra": {"tenant_id": "tenant", **extra},
    }
    monkeypatch.setenv(DV, json.dumps(connection))


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL a session tried to send to (the send itself fails as if the network were down)."""
    urls: list[str] = []

    def send(self: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        urls.append(str(request.url))
        raise requests.ConnectionError("no network in this test")

    monkeypatch.setattr(requests.Session, "send", send)
    return urls


@pytest.mark.parametrize(
    ("host", "fields", "expected"),
    [
        ("myaccount.api-us1.com", {}, "https://myaccount.api-us1.com"),
        ("myaccount.api-us1.com/api/3", {}, "https://myaccount.api-us1.com"),
        ("https://myaccount.api-us1.com", {}, "https://myaccount.api-us1.com"),
        ("myaccount.api-us1.com", {"schema": "https"}, "https://myaccount.api-us1.com"),
        ("myaccount.api-us1.com", {"port": 8443}, "https://myaccount.api-us1.com:8443"),
        ("http://127.0.0.1:8081", {}, "http://127.0.0.1:8081"),
        ("localhost", {"schema": "http", "port": 8081}, "http://localhost:8081"),
    ],
)
def test_the_base_url_is_https_unless_the_host_is_loopback(
    monkeypatch: pytest.MonkeyPatch, host: str, fields: dict[str, Any], expected: str
) -> None:
    ac_connection(monkeypatch, host, **fields)
    with ActiveCampaignHook(rate_limit=None) as hook:
        hook.get_conn()
        assert hook.base_url == expected


@pytest.mark.parametrize(
    ("host", "fields"),
    [
        ("http://example.com", {}),
        ("http://myaccount.api-us1.com/api/3", {}),
        ("myaccount.api-us1.com", {"schema": "http"}),
        ("http://10.0.0.5:8080", {}),
        ("http://127.0.0.1.example.com", {}),
    ],
)
def test_plain_http_to_another_host_fails_before_any_request(
    monkeypatch: pytest.MonkeyPatch, sent: list[str], host: str, fields: dict[str, Any]
) -> None:
    ac_connection(monkeypatch, host, **fields)
    with (
        ActiveCampaignHook(rate_limit=None) as hook,
        pytest.raises(InsecureConnectionError) as caught,
    ):
        hook.request("GET", "/api/3/users/me")
    assert sent == []
    message = str(caught.value)
    assert "activecampaign_default" in message and "https://" in message
    assert TOKEN not in message


def test_plain_http_to_loopback_says_so_in_the_log(
    monkeypatch: pytest.MonkeyPatch, sent: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crm_connectors")
    ac_connection(monkeypatch, "http://127.0.0.1:9")
    with ActiveCampaignHook(rate_limit=None, retry_policy=RetryPolicy(max_attempts=1)) as hook:
        with pytest.raises(ApiConnectionError):
            hook.request("GET", "/api/3/users/me")
        with pytest.raises(ApiConnectionError):
            hook.request("GET", "/api/3/users/me")
    assert sent == ["http://127.0.0.1:9/api/3/users/me"] * 2
    notes = [r for r in caplog.records if "plain http to loopback host" in r.getMessage()]
    assert len(notes) == 1 and "127.0.0.1:9 (sandbox)" in notes[0].getMessage()


def test_a_link_off_https_is_not_followed_with_the_credentials(
    monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    ac_connection(monkeypatch, "myaccount.api-us1.com")
    with ActiveCampaignHook(rate_limit=None) as hook, pytest.raises(InsecureConnectionError):
        hook.request("GET", "http://myaccount.api-us1.com/api/3/contacts?offset=100")
    assert sent == []


def test_dataverse_and_its_token_authority_are_https_too(
    monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    dv_connection(monkeypatch, "org.crm.dynamics.com", authority_host="login.example.com")
    with Dynamics365Hook() as hook:
        hook.get_conn()
        assert hook.base_url == "https://org.crm.dynamics.com"
        assert hook.tokens is not None
        assert hook.tokens._authority == "https://login.example.com/tenant"
    dv_connection(monkeypatch, "org.crm.dynamics.com")
    with Dynamics365Hook() as hook:
        hook.get_conn()
        assert hook.tokens._authority == "https://login.microsoftonline.com/tenant"
    for host, authority in (
        ("http://org.crm.dynamics.com", None),
        ("org.crm.dynamics.com", "http://login.example.com"),
    ):
        dv_connection(monkeypatch, host, **({"authority_host": authority} if authority else {}))
        with Dynamics365Hook() as hook, pytest.raises(InsecureConnectionError) as caught:
            hook.whoami()
        assert SECRET not in str(caught.value)
    assert sent == []


@pytest.mark.parametrize(
    ("host", "fields", "message"),
    [
        ("", {}, "has no host"),
        ("myaccount.api-us1.com", {"schema": "api/3"}, "not a URL scheme"),
        ("ftp://myaccount.api-us1.com", {}, "not an https:// URL"),
        ("https://myaccount.api-us1.com", {"extra": {"ca_bundle": "/no/such/ca.pem"}}, "ca_bundle"),
    ],
)
def test_an_unusable_connection_is_named_before_any_request(
    monkeypatch: pytest.MonkeyPatch,
    sent: list[str],
    host: str,
    fields: dict[str, Any],
    message: str,
) -> None:
    ac_connection(monkeypatch, host, **fields)
    with (
        ActiveCampaignHook(rate_limit=None) as hook,
        pytest.raises(ConnectionSettingsError, match=message),
    ):
        hook.request("GET", "/api/3/users/me")
    assert sent == []


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["10.0.0.1", "example.com", "localhost.example.com", ""]))


def _resolver(errno: int) -> Any:
    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(errno, "Name or service not known")

    return getaddrinfo


def test_an_unknown_host_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _resolver(socket.EAI_NONAME))
    ac_connection(monkeypatch, "https://nonexistent.invalid")
    # The default policy: a retried call would back off for seconds before giving up.
    with ActiveCampaignHook(rate_limit=None) as hook:
        started = time.monotonic()
        with pytest.raises(UnknownHostError) as caught:
            hook.request("GET", "/api/3/users/me")
        assert time.monotonic() - started < 1
        assert hook.stats.retries == 0
    assert "nonexistent.invalid" in str(caught.value)
    assert caught.value.connection == "activecampaign_default"
    assert not caught.value.retryable


def test_an_unknown_token_authority_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _resolver(socket.EAI_NONAME))
    dv_connection(monkeypatch, "org.crm.dynamics.com", authority_host="login.nowhere.invalid")
    with Dynamics365Hook() as hook:
        started = time.monotonic()
        with pytest.raises(UnknownHostError) as caught:
            hook.whoami()
        assert time.monotonic() - started < 1
    assert caught.value.service == "entra-id" and "login.nowhere.invalid" in str(caught.value)


def test_a_temporary_dns_failure_is_still_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _resolver(socket.EAI_AGAIN))
    ac_connection(monkeypatch, "https://myaccount.api-us1.com")
    policy = RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_max=0.02)
    with ActiveCampaignHook(rate_limit=None, retry_policy=policy) as hook:
        with pytest.raises(ApiConnectionError):
            hook.request("GET", "/api/3/users/me")
        assert hook.stats.retries == 2
