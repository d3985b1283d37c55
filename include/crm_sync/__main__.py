"""`python -m crm_sync <command>`: the project's command line.

`check` runs the preflight (`crm_sync.preflight`); `alerts check` the stalled check of the
alerts (for a cron job), `alerts test` sends a test alert through every channel; `webhooks
install|status|remove` manages the ActiveCampaign webhook (`crm_sync.webhooks_admin`). The demo and the dev server are developer
tools outside the library: `python -m devtools.demo`, `python -m devtools.devserver`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m crm_sync", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True, metavar="command")
    check = commands.add_parser(
        "check",
        help="preflight: check the connections, accounts and settings a first run needs",
        description=(
            "Connects with the Airflow connections (activecampaign_default, dynamics365_default, "
            "crm_sync_state) and prints one row per check: both logins, the state store, the "
            "Dataverse privileges and mapped columns, record_criteria, the ActiveCampaign custom "
            "fields and tags, rate-limit headroom. Exits 1 when anything would fail a run."
        ),
    )
    check.add_argument(
        "--fix",
        action="store_true",
        help="create the mapped ActiveCampaign custom fields that are missing (text fields)",
    )
    check.add_argument(
        "--settings",
        type=Path,
        metavar="PATH",
        help="the settings file (default: $CRM_SYNC_SETTINGS or include/config/sync.yaml)",
    )
    check.add_argument("-v", "--verbose", action="store_true", help="log every API call to stderr")
    alerts = commands.add_parser(
        "alerts",
        help="alerts: check for stalled directions (for cron), or send a test alert",
        description=(
            "`alerts check` looks at both directions in the state store (crm_sync_state) and "
            "sends the stalled alert (alerts.stalled_after in sync.yaml) for each direction with "
            "no successful run for too long, at most once per job_frequency; it prints one row "
            "per direction and exits 1 when one is stalled. `alerts test` sends a test alert "
            "through every channel of alerts.channels and exits 1 when one fails."
        ),
    )
    alerts.add_argument("action", choices=["check", "test"])
    alerts.add_argument(
        "--settings",
        type=Path,
        metavar="PATH",
        help="the settings file (default: $CRM_SYNC_SETTINGS or include/config/sync.yaml)",
    )
    alerts.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    webhooks = commands.add_parser(
        "webhooks",
        help="webhooks: register, check or remove the ActiveCampaign webhook of the receiver",
        description=(
            "The receiver's URL comes from the connection activecampaign_webhook (host: the "
            "public https base URL of the Airflow API server, password: the secret). `install` "
            "registers the webhook through activecampaign_default, or replaces it when its URL "
            "or events changed (nothing when it is the same); `status` prints ActiveCampaign's "
            "view and the receiver's (crm_sync_state), exit 1 when not installed, posting to "
            "another URL or the connection is unfit; `remove` deletes it. Exit 2 when "
            "ActiveCampaign (or, for install, the connection) cannot be used. The secret is "
            "never printed."
        ),
    )
    webhooks.add_argument("action", choices=["install", "status", "remove"])
    webhooks.add_argument(
        "--force",
        action="store_true",
        help="install: replace it even when it looks the same (after ActiveCampaign "
        "deactivated it)",
    )
    webhooks.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    return root


def alerts_command(action: str, settings_file: Path | None) -> int:
    """`python -m crm_sync alerts check|test`: the report on stdout; 1 when stalled or failed,
    2 when the settings or the state store cannot be used."""
    from crm_sync import alerts
    from crm_sync.settings import SettingsError, load_settings
    from crm_sync.state import StateStore, state_url_from_connection, utcnow

    try:
        settings = load_settings(settings_file)
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    if not settings.alerts.channels:
        print("alerts: no channel in alerts.channels of sync.yaml: nothing is sent")
    if action == "test":
        outcome = alerts.send_test(settings)
        for channel, result in outcome.items():
            print(f"{channel}: {result}")
        return 0 if all(result == "sent" for result in outcome.values()) else 1
    if settings.alerts.stalled_after is None:
        print("alerts: alerts.stalled_after is null: the stalled check is off")
        return 0
    try:
        store = StateStore.from_url(state_url_from_connection())
    except Exception as error:
        print(f"the state store is not reachable: {type(error).__name__}", file=sys.stderr)
        return 2
    now = utcnow()
    paused = paused_dags()
    if paused is None:
        print("alerts: Airflow's metadata database is not reachable: a paused DAG is checked too")
    statuses = alerts.check_stalled(settings, store, paused=paused or (), now=now)
    for status in statuses:
        print(status.describe(now))
    return 1 if any(status.stalled for status in statuses) else 0


def paused_dags() -> set[str] | None:
    """The DAGs paused in Airflow (the global switch: a paused direction is not stalled), read
    from its metadata database; None when it cannot be read (not an Airflow host)."""
    try:
        from airflow.models.dag import DagModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            return set(session.scalars(select(DagModel.dag_id).where(DagModel.is_paused)))
    except Exception as error:
        logging.getLogger("crm_sync").warning("paused DAGs not read: %s", type(error).__name__)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Airflow sets up its logging (to stdout) when first imported: import it first, then send
    # every log line to stderr, so stdout holds only the report.
    import airflow.sdk  # noqa: F401

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
    if args.command == "alerts":
        return alerts_command(args.action, args.settings)
    if not args.verbose:
        # A refused login is a row of the report; the hook's own warning line would repeat it.
        logging.getLogger("crm_connectors").setLevel(logging.ERROR)
    if args.command == "webhooks":
        from crm_sync.webhooks_admin import main as webhooks

        return webhooks(args.action, force=args.force)
    from crm_sync.preflight import main as check

    return check(fix=args.fix, settings_file=args.settings)


if __name__ == "__main__":
    sys.exit(main())
