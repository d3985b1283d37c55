"""Every log record of a full run of both hooks: no token, secret, password or raw email."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import requests
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_connectors.dynamics365 import Dynamics365Hook
from crm_connectors.retry import RetryPolicy

pytestmark = pytest.mark.sandbox

EMAILS = ["ann.lee+vip@example.com", "Bob.O'Neil@example.org", "carla@example.net"]


def test_logs_hold_no_credential_token_or_email(
    sandbox_env, caplog, inject, monkeypatch, fast_retries: RetryPolicy
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "msal", "requests", "crm_connectors"):
        caplog.set_level(logging.DEBUG, logger=name)
    credentials = sandbox_env.credentials
    issued: list[str] = []

    def keep_token(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if response.url.endswith("/oauth2/v2.0/token") and response.ok:
            issued.append(response.json()["access_token"])

    with (
        ActiveCampaignHook(
            rate_limit=None, retry_policy=fast_retries, import_poll_interval=0.1
        ) as ac,
        Dynamics365Hook(retry_policy=fast_retries) as d365,
    ):
        d365.get_conn()
        assert d365.tokens is not None
        d365.tokens.http_client.hooks["response"].append(keep_token)

        inject("ac", path_prefix="/api/3/contacts", status=429, retry_after=1)
        contact = ac.sync_contact({"email": EMAILS[0], "firstName": "Ann"})
        assert ac.find_contact_by_email(EMAILS[0])["id"] == contact["id"]
        ac.bulk_import([{"email": email} for email in EMAILS[1:]] + [{"email": "broken@"}])
        inject("ac", kind="drop", path_prefix="/api/3/contacts")
        assert list(ac.list_contacts(email=EMAILS[1]))

        rows = [{"lastname": "Lee", "emailaddress1": email} for email in EMAILS]
        rows[2]["lastname"] = "x" * 51
        d365.create_multiple("leads", rows)
        inject("d365", path_prefix="/api/data/v9.2/leads", status=503)
        assert len(list(d365.find("leads", "emailaddress1", EMAILS[:2]))) == 2
        sandbox_env.admin("d365", "POST", "expire_tokens")
        d365.whoami()

    bad_token, bad_secret = "bad-token-0123456789", "bad-secret-0123456789"
    env = sandbox_env.connection_env()
    monkeypatch.setenv(
        "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT",
        env["AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT"].replace(credentials.ac_api_token, bad_token),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_DYNAMICS365_DEFAULT",
        env["AIRFLOW_CONN_DYNAMICS365_DEFAULT"].replace(credentials.client_secret, bad_secret),
    )
    with ActiveCampaignHook(retry_policy=fast_retries) as ac:
        assert ac.test_connection()[0] is False
    with Dynamics365Hook(retry_policy=fast_retries) as d365:
        assert d365.test_connection()[0] is False

    records = caplog.records
    text = "\n".join(f"{r.getMessage()} {json.dumps(vars(r), default=repr)}" for r in records)
    # The capture saw the run: our call lines, urllib3's request lines, MSAL's token requests.
    assert any("/api/3/contacts?email=<email>" in r.getMessage() for r in records)
    assert any("1 retry" in r.getMessage() for r in records if r.name == "crm_connectors.base")
    assert any(r.name.startswith("urllib3") for r in records)
    assert any(r.name.startswith("msal") for r in records)
    assert len(issued) == 2
    secrets = [credentials.ac_api_token, credentials.client_secret, bad_token, bad_secret, *issued]
    for secret in secrets:
        assert secret not in text
    lowered = text.lower()
    for email in EMAILS:
        local = email.split("@")[0].lower()
        for form in (email, requests.utils.quote(email, safe=""), local, local.replace("'", "''")):
            assert form.lower() not in lowered
