"""`python -m crm_sync webhooks install|status|remove`: the ActiveCampaign webhook of the receiver.

The receiver's URL comes from the Airflow connection `activecampaign_webhook` (host = the public
base URL of the Airflow API server, password = the secret, see `crm_sync.webhooks`); the webhook
is registered through `activecampaign_default`. Ours is the one named `WEBHOOK_NAME`. Output is
rows like the preflight's; the secret is never printed or logged (URLs are shown masked).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from crm_sync.preflight import FAIL, OK, WARN, Row, describe, render
from crm_sync.webhooks import (
    EVENTS,
    MIN_SECRET_LENGTH,
    SOURCES,
    WEBHOOK_CONN_ID,
    WEBHOOK_NAME,
    masked_url,
    receiver_url,
)

if TYPE_CHECKING:
    from crm_connectors.activecampaign import ActiveCampaignHook

#: How to create the connection, with a generated secret (printed when it is missing or unfit).
HOW_TO_CONNECT = (
    f"airflow connections add {WEBHOOK_CONN_ID} --conn-type http "
    "--conn-host https://<public host of the Airflow API server> "
    "--conn-password \"$(python -c 'import secrets; print(secrets.token_urlsafe(32))')\""
)
_SECRET_CHARACTERS = re.compile(r"[A-Za-z0-9._~-]+")


class WebhookSetupError(Exception):
    """The webhook connection cannot give a receiver URL (the message names the fix)."""


class StoreUnavailable(Exception):
    """The state store (the receiver's queue) cannot be opened."""


@dataclass(frozen=True)
class Target:
    """Where ActiveCampaign should post: the receiver's URL, which holds the secret."""

    url: str
    secret: str

    @property
    def shown(self) -> str:
        return masked_url(self.url)


def target_from_connection(conn_id: str = WEBHOOK_CONN_ID) -> Target:
    """The receiver's URL from the Airflow connection; `WebhookSetupError` says what to fix."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException
    from crm_connectors.base import secure_url
    from crm_connectors.errors import ConnectionSettingsError

    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise WebhookSetupError(
            f"no Airflow connection '{conn_id}': create it with its host the public https:// "
            f"base URL of the Airflow API server and its password a secret: {HOW_TO_CONNECT}"
        ) from None
    secret = connection.password or ""
    if len(secret) < MIN_SECRET_LENGTH or not _SECRET_CHARACTERS.fullmatch(secret):
        raise WebhookSetupError(
            f"connection '{conn_id}': the password (the secret in the receiver's URL) must be "
            f"at least {MIN_SECRET_LENGTH} letters, digits, '-' or '_': set a new one with "
            f"`airflow connections delete {conn_id}` then {HOW_TO_CONNECT}"
        )
    try:
        base = secure_url(
            connection.host or "",
            what=f"connection '{conn_id}'",
            schema=connection.schema,
            port=connection.port,
        )
    except ConnectionSettingsError as error:
        raise WebhookSetupError(str(error)) from None
    parts = urlsplit(base)
    if parts.scheme == "https" and parts.port not in (None, 443):
        raise WebhookSetupError(
            f"connection '{conn_id}': ActiveCampaign posts to https URLs on port 443 only, not "
            f"{parts.port}: serve the Airflow API server (or a proxy in front of it) on 443 and "
            "set the host without a port"
        )
    if parts.query or parts.fragment:
        raise WebhookSetupError(
            f"connection '{conn_id}': the host must be a base URL without '?' or '#'"
        )
    return Target(receiver_url(base, secret), secret)


def ours(hook: ActiveCampaignHook) -> list[dict[str, Any]]:
    """Our webhooks in ActiveCampaign (by name; more than one only after an interrupted run)."""
    return hook.list_webhooks(name=WEBHOOK_NAME)


def differences(webhook: dict[str, Any], target: Target) -> list[str]:
    """How a registered webhook differs from the one `install` registers (empty: the same)."""
    url = (
        [] if webhook.get("url") == target.url else ["another URL (the secret or the host changed)"]
    )
    return url + _setting_differences(webhook)


def _setting_differences(webhook: dict[str, Any]) -> list[str]:
    found = []
    if set(webhook.get("events") or ()) != set(EVENTS):
        found.append(f"other events ({_names(webhook.get('events'))})")
    if set(webhook.get("sources") or ()) != set(SOURCES):
        found.append(f"other sources ({_names(webhook.get('sources'))})")
    if str(webhook.get("listid") or "0") != "0":
        found.append(f"limited to list {webhook.get('listid')}")
    return found


def _names(values: Iterable[str] | None) -> str:
    return ", ".join(values or ()) or "none"


def _describe(webhook: dict[str, Any]) -> str:
    return (
        f"id {webhook.get('id')}: {masked_url(str(webhook.get('url', '')))}; events "
        f"{_names(webhook.get('events'))}; sources {_names(webhook.get('sources'))}"
    )


def install(hook: ActiveCampaignHook, target: Target, *, force: bool = False) -> list[Row]:
    """Register ours, unless the same one is there (`force`: replace it anyway).

    A replacement is created before the old one is deleted, so no event goes unsent between.
    """
    existing = ours(hook)
    keep = next((w for w in existing if not force and not differences(w, target)), None)
    rows = []
    if keep is None:
        created = hook.create_webhook(WEBHOOK_NAME, target.url, EVENTS, SOURCES)
        rows.append(Row("webhook", OK, f"installed, {_describe(created)}"))
    else:
        rows.append(Row("webhook", OK, f"already installed, {_describe(keep)}: nothing to do"))
    for old in existing:
        if old is keep:
            continue
        why = "; ".join(differences(old, target)) or (
            "a second copy of ours" if keep is not None else "replaced on request (--force)"
        )
        hook.delete_webhook(old["id"])
        rows.append(Row("previous webhook", OK, f"deleted id {old.get('id')}: {why}"))
    return rows


def status(
    hook: ActiveCampaignHook,
    target: Target | WebhookSetupError,
    stats: Callable[[], dict[str, Any]],
) -> tuple[list[Row], bool]:
    """ActiveCampaign's view and the receiver's (`stats`: `StateStore.webhook_stats`); true
    when ours is installed and posts to the connection's URL."""
    existing = ours(hook)
    rows = []
    if isinstance(target, WebhookSetupError):
        rows.append(Row("webhook connection", FAIL, str(target)))
    if not existing:
        rows.append(
            Row("webhook", FAIL, "not installed: run `python -m crm_sync webhooks install`")
        )
    for webhook in existing:
        rows.append(Row("webhook", OK, f"installed, {_describe(webhook)}"))
    if len(existing) > 1:
        rows.append(
            Row(
                "webhook copies",
                WARN,
                f"{len(existing)} webhooks are named '{WEBHOOK_NAME}': every event is posted "
                "to each (the receiver stores it once); `install` keeps one",
            )
        )
    matches = isinstance(target, Target) and any(w.get("url") == target.url for w in existing)
    if isinstance(target, Target) and existing:
        if matches:
            rows.append(Row("webhook url", OK, f"matches connection '{WEBHOOK_CONN_ID}'"))
        else:
            rows.append(
                Row(
                    "webhook url",
                    FAIL,
                    f"connection '{WEBHOOK_CONN_ID}' gives {target.shown}, which ActiveCampaign "
                    "does not post to (the secret or the host changed): run "
                    "`python -m crm_sync webhooks install` to replace the webhook",
                )
            )
        other = [d for w in existing for d in _setting_differences(w)]
        if other:
            rows.append(
                Row(
                    "webhook events",
                    WARN,
                    f"{'; '.join(dict.fromkeys(other))}; the sync listens to {_names(EVENTS)} "
                    f"from {_names(SOURCES)}: run `python -m crm_sync webhooks install`",
                )
            )
    try:
        rows.append(_receiver_row(stats(), installed=bool(existing)))
    except StoreUnavailable as error:
        rows.append(Row("receiver", WARN, f"{error}: the receiver's view is not shown"))
    return rows, bool(existing) and matches


def _receiver_row(stats: dict[str, Any], *, installed: bool) -> Row:
    pending, oldest = int(stats["pending"]), stats["oldest_pending"]
    waiting = f"; {pending} pending (oldest {_when(oldest)})" if pending else "; none pending"
    detail = (
        f"{stats['received_24h']} events received in the last 24 h "
        f"({stats['duplicates_24h']} duplicates), last {_when(stats['last_received'])}{waiting}"
    )
    if installed and not stats["received_24h"]:
        return Row(
            "receiver",
            WARN,
            f"{detail}. If contacts changed in ActiveCampaign since, check that it can reach "
            "the receiver (public https on 443) and that it did not deactivate the webhook "
            "(it does after a 410): `python -m crm_sync webhooks install --force` registers it "
            "again",
        )
    return Row("receiver", OK, detail)


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else "never"


def remove(hook: ActiveCampaignHook) -> list[Row]:
    """Delete ours (every copy)."""
    existing = ours(hook)
    if not existing:
        return [Row("webhook", OK, "not installed: nothing to remove")]
    for webhook in existing:
        hook.delete_webhook(webhook["id"])
    return [Row("webhook", OK, f"removed, {_describe(w)}") for w in existing]


def receiver_stats() -> dict[str, Any]:
    """`StateStore.webhook_stats()` of the `crm_sync_state` store."""
    from airflow.sdk.exceptions import AirflowException
    from sqlalchemy.exc import SQLAlchemyError

    from crm_sync.state import STATE_CONN_ID, StateStore, state_url_from_connection

    try:
        store = StateStore.from_url(state_url_from_connection())
    except (SQLAlchemyError, ValueError, AirflowException) as error:
        raise StoreUnavailable(
            f"the state store (connection '{STATE_CONN_ID}') cannot be opened: {describe(error)}"
        ) from None
    try:
        return store.webhook_stats()
    finally:
        store.engine.dispose()


def main(action: str, *, force: bool = False) -> int:
    """Run one action and print its rows. Exit 0 when done; `status`: 1 when not installed,
    posting to another URL, or the webhook connection is unfit; 2 when ActiveCampaign cannot be
    used (or, for `install`, the webhook connection)."""
    from crm_connectors.activecampaign import ActiveCampaignHook
    from crm_connectors.retry import RetryPolicy

    try:
        target: Target | WebhookSetupError = target_from_connection()
    except WebhookSetupError as error:
        target = error
    secret = target.secret if isinstance(target, Target) else ""
    if isinstance(target, WebhookSetupError) and action == "install":
        print(render([Row("webhook connection", FAIL, str(target))]))
        return 2
    hook = ActiveCampaignHook(
        retry_policy=RetryPolicy(max_attempts=3, backoff_max=5.0, max_retry_after=30.0)
    )
    try:
        if isinstance(target, Target) and action == "install":
            rows, code = install(hook, target, force=force), 0
        elif action == "remove":
            rows, code = remove(hook), 0
        else:
            rows, good = status(hook, target, receiver_stats)
            code = 0 if good else 1
    except Exception as error:
        # An API's message may echo the URL it refused: the secret is cut out of it.
        text = describe(error).replace(secret, "***") if secret else describe(error)
        rows, code = [Row(f"webhooks {action}", FAIL, text)], 2
    finally:
        hook.close()
    print(render(rows))
    return code
