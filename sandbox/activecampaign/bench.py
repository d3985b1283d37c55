"""Throughput of the ActiveCampaign emulator with limits off: 100k bulk-imported, 100k paged.

Run: `python -m sandbox.activecampaign.bench [--contacts 100000]`. The server runs in its own
process (as under `python -m sandbox serve`), so client and server do not share a GIL.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

BATCH = 250
PAGE = 100


def _serve(data_dir: Path, port: int) -> None:
    import uvicorn

    from sandbox.activecampaign.app import create_app

    uvicorn.run(
        create_app(data_dir, limits=False), host="127.0.0.1", port=port, log_level="warning"
    )


def _wait_listening(session: requests.Session, url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            session.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError("emulator did not start")


def _summary(label: str, seconds: list[float], total: float) -> str:
    ordered = sorted(seconds)
    p95 = ordered[int(len(ordered) * 0.95)]
    return (
        f"| {label} | {len(ordered)} | {total:.1f} s | {statistics.median(ordered) * 1000:.1f} ms"
        f" | {p95 * 1000:.1f} ms | {ordered[-1] * 1000:.1f} ms |"
    )


def run(contacts: int, port: int) -> list[str]:
    """Import `contacts` in batches of 250 (each waited for), then read them back by keyset."""
    from sandbox.credentials import load_or_create

    data_dir = Path(tempfile.mkdtemp(prefix="ac-bench-"))
    token = load_or_create(data_dir).ac_api_token
    server = subprocess.Popen(
        [sys.executable, "-m", "sandbox.activecampaign.bench", "--serve", str(data_dir), str(port)]
    )
    session = requests.Session()
    session.trust_env = False
    session.headers["Api-Token"] = token
    base = f"http://127.0.0.1:{port}/api/3"
    try:
        _wait_listening(session, f"{base}/users/me")
        imported: list[float] = []
        started = time.perf_counter()
        for start in range(0, contacts, BATCH):
            batch = [
                {
                    "email": f"bench.{i}@example.com",
                    "first_name": "Bench",
                    "last_name": f"Contact {i}",
                    "tags": ["Bench"],
                }
                for i in range(start, min(start + BATCH, contacts))
            ]
            sent = time.perf_counter()
            batch_id = session.post(f"{base}/import/bulk_import", json={"contacts": batch}).json()[
                "batchId"
            ]
            while (
                session.get(f"{base}/import/info", params={"batchId": batch_id}).json()["status"]
                != "completed"
            ):
                time.sleep(0.002)
            imported.append(time.perf_counter() - sent)
        import_total = time.perf_counter() - started

        pages: list[float] = []
        last, seen = 0, 0
        started = time.perf_counter()
        while True:
            sent = time.perf_counter()
            page = session.get(
                f"{base}/contacts",
                params={"limit": PAGE, "orders[id]": "ASC", "id_greater": last},
            ).json()["contacts"]
            pages.append(time.perf_counter() - sent)
            if not page:
                break
            seen += len(page)
            last = int(page[-1]["id"])
        read_total = time.perf_counter() - started
        if seen != contacts:
            raise RuntimeError(f"read {seen} contacts, expected {contacts}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return [
        "| step | requests | total | median | p95 | max |",
        "|---|---|---|---|---|---|",
        _summary(f"bulk import, {BATCH}/request, submit -> completed", imported, import_total),
        _summary(f"keyset read, {PAGE}/page (`id_greater`)", pages, read_total),
    ]


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--port", type=int, default=18_099)
    parser.add_argument("--serve", nargs=2, metavar=("DATA_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(Path(args.serve[0]), int(args.serve[1]))
        return
    print("\n".join(run(args.contacts, args.port)))


if __name__ == "__main__":
    main()
