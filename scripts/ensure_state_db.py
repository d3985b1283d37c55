"""Creates the sync state database named by CRM_SYNC_STATE_URL if it is PostgreSQL and missing."""

from __future__ import annotations

import contextlib
import os
import sys

import psycopg2
from psycopg2 import sql
from sqlalchemy.engine import make_url


def ensure_state_db(state_url: str) -> bool:
    """Create the database of `state_url` on its server; True if it was created."""
    url = make_url(state_url)
    if url.get_backend_name() != "postgresql" or not url.database:
        return False
    server = psycopg2.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname="postgres",
    )
    with contextlib.closing(server) as conn:
        # CREATE DATABASE cannot run inside a transaction.
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
            if cur.fetchone() is not None:
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
    return True


def main() -> int:
    """Entry point for the airflow-init service."""
    url = os.environ.get("CRM_SYNC_STATE_URL", "")
    if not url:
        print("CRM_SYNC_STATE_URL is not set", file=sys.stderr)
        return 1
    created = ensure_state_db(url)
    print("sync state database created" if created else "sync state database: nothing to create")
    return 0


if __name__ == "__main__":
    sys.exit(main())
