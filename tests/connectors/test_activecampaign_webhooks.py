"""ActiveCampaignHook's webhook methods against the running AC emulator."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_connectors.errors import ClientError
from crm_connectors.retry import RetryPolicy

pytestmark = pytest.mark.sandbox

SECRET = "s3cr3t-in-the-path-0123456789"
URL = f"https://hooks.example.com/crm-sync-webhooks/activecampaign/{SECRET}"


@pytest.fixture
def ac(sandbox_env, fast_retries: RetryPolicy) -> Iterator[ActiveCampaignHook]:
    hook = ActiveCampaignHook(rate_limit=None, retry_policy=fast_retries)
    yield hook
    hook.close()


def test_create_list_by_name_and_url_then_delete(
    ac: ActiveCampaignHook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = ac.create_webhook("ours", URL, ("update", "subscribe"), ("public", "admin"))
    assert (created["name"], created["url"], created["listid"]) == ("ours", URL, "0")
    assert (created["events"], created["sources"]) == (["update", "subscribe"], ["public", "admin"])
    other = ac.create_webhook("ours-too", URL, ["update"], ["api"])
    same_name = ac.create_webhook("ours", "https://elsewhere.example.com/h", ["update"], ["api"])
    assert [w["id"] for w in ac.list_webhooks()] == [created["id"], other["id"], same_name["id"]]
    assert [w["id"] for w in ac.list_webhooks(name="ours")] == [created["id"], same_name["id"]]
    assert [w["id"] for w in ac.list_webhooks(name="ours", url=URL)] == [created["id"]]
    assert [w["id"] for w in ac.list_webhooks(url=URL)] == [created["id"], other["id"]]
    assert ac.delete_webhook(created["id"]) is True
    assert ac.delete_webhook(created["id"]) is False  # already gone: 404
    assert [w["id"] for w in ac.list_webhooks(name="ours")] == [same_name["id"]]
    # The URL is compared here, never sent in a (logged) query string.
    assert "GET /api/3/webhooks?filters[name]=ours" in caplog.text
    assert SECRET not in caplog.text


def test_https_on_another_port_is_refused(ac: ActiveCampaignHook) -> None:
    with pytest.raises(ClientError) as refused:
        ac.create_webhook("x", "https://hooks.example.com:8443/h", ["update"], ["public"])
    assert refused.value.status == 422
    assert "port 443" in refused.value.message
    assert ac.list_webhooks() == []
