"""`python -m crm_sync <command>`: the project's command line.

`check` runs the preflight (`crm_sync.preflight`). The demo and the dev server are developer
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
    return root


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
    if not args.verbose:
        # A refused login is a row of the report; the hook's own warning line would repeat it.
        logging.getLogger("crm_connectors").setLevel(logging.ERROR)
    from crm_sync.preflight import main as check

    return check(fix=args.fix, settings_file=args.settings)


if __name__ == "__main__":
    sys.exit(main())
