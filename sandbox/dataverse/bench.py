"""Throughput of the Dataverse emulator with limits off: bulk writes, 100k paged reads, export.

Run: `python -m sandbox.dataverse.bench [--leads 100000]`. The server runs in its own process over
HTTPS (as under `python -m sandbox serve`), so client and server do not share a GIL.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

NS = "Microsoft.Dynamics.CRM"


def _serve(data_dir: Path, port: int) -> None:
    import uvicorn

    from sandbox.dataverse.app import create_app
    from sandbox.tls import ensure_certificates

    tls = ensure_certificates(data_dir, ["127.0.0.1"])
    app = create_app(data_dir, limits=False, base_url=f"https://127.0.0.1:{port}")
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ssl_certfile=str(tls.cert_path),
        ssl_keyfile=str(tls.key_path),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _row(label: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return (
        f"| {label} | {len(ordered)} | {sum(ordered):.2f} s | "
        f"{statistics.median(ordered) * 1000:.0f} ms | {p95 * 1000:.0f} ms | "
        f"{ordered[-1] * 1000:.0f} ms |"
    )


def _timed(call: Callable[[], requests.Response], expect: int) -> tuple[float, requests.Response]:
    started = time.perf_counter()
    response = call()
    elapsed = time.perf_counter() - started
    if response.status_code != expect:
        raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
    return elapsed, response


def _page_all(http: requests.Session, url: str, page: int) -> list[float]:
    times: list[float] = []
    while url:
        elapsed, response = _timed(
            lambda u=url: http.get(u, headers={"Prefer": f"odata.maxpagesize={page}"}), 200
        )
        times.append(elapsed)
        url = response.json().get("@odata.nextLink", "")
    return times


def run(leads: int) -> list[str]:
    """Seed `leads` leads, then time bulk writes, paged reads and the admin export."""
    from sandbox.credentials import load_or_create
    from sandbox.dataverse.seed import seed_dataverse

    data_dir = Path(tempfile.mkdtemp(prefix="dataverse-bench-"))
    port = _free_port()
    creds = load_or_create(data_dir)
    started = time.perf_counter()
    seed_dataverse(data_dir, seed=1, leads=leads, contacts=0)
    seed_seconds = time.perf_counter() - started
    server = subprocess.Popen(
        [sys.executable, "-m", "sandbox.dataverse.bench", "--serve", str(data_dir), str(port)]
    )
    base = f"https://127.0.0.1:{port}"
    http = requests.Session()
    http.verify = str(data_dir / "tls" / "ca.pem")
    http.trust_env = False
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                token = http.post(
                    f"{base}/{creds.tenant_id}/oauth2/v2.0/token",
                    data={
                        "grant_type": "client_credentials",
                        "client_id": creds.client_id,
                        "client_secret": creds.client_secret,
                        "scope": f"{base}/.default",
                    },
                    timeout=5,
                ).json()["access_token"]
                break
            except (requests.ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        http.headers["Authorization"] = f"Bearer {token}"
        api = f"{base}/api/data/v9.2/"
        lines = [
            f"Seeded {leads:,} leads with `seed_dataverse` in {seed_seconds:.1f} s.",
            "",
            "| step | requests | total | median | p95 | max |",
            "|---|---|---|---|---|---|",
        ]
        creates, ids = [], []
        for batch in range(10):
            targets = [
                {"@odata.type": f"{NS}.lead", "lastname": f"Bench {batch}-{i}",
                 "emailaddress1": f"bench.{batch}.{i}@example.com"}
                for i in range(1000)
            ]  # fmt: skip
            elapsed, response = _timed(
                lambda t=targets: http.post(f"{api}leads/{NS}.CreateMultiple", json={"Targets": t}),
                200,
            )
            creates.append(elapsed)
            ids += response.json()["Ids"]
        lines.append(_row("CreateMultiple, 1,000 leads each", creates))
        updates = []
        for batch in range(10):
            targets = [
                {"@odata.type": f"{NS}.lead", "leadid": i, "jobtitle": "Benchmarked"}
                for i in ids[batch * 1000 : (batch + 1) * 1000]
            ]
            elapsed, _ = _timed(
                lambda t=targets: http.post(f"{api}leads/{NS}.UpdateMultiple", json={"Targets": t}),
                204,
            )
            updates.append(elapsed)
        lines.append(_row("UpdateMultiple, 1,000 leads each", updates))
        lines.append(_row("read all columns, 5,000/page", _page_all(http, f"{api}leads", 5000)))
        select = f"{api}leads?$select=emailaddress1,fullname,modifiedon"
        lines.append(_row("read 3 columns, 5,000/page", _page_all(http, select, 5000)))
        watermark = (
            f"{api}leads?$select=emailaddress1,modifiedon&$filter=modifiedon ge "
            "2000-01-01T00:00:00Z&$orderby=modifiedon asc,leadid asc"
        )
        lines.append(
            _row("modifiedon watermark read, 5,000/page", _page_all(http, watermark, 5000))
        )
        lookup = f"{api}leads?$filter=emailaddress1 eq 'BENCH.3.{{}}@example.com'"
        lookups = [_timed(lambda i=i: http.get(lookup.format(i)), 200)[0] for i in range(200)]
        lines.append(_row("lookup by emailaddress1 (any case)", lookups))
        exports = [_timed(lambda: http.get(f"{base}/_sandbox/export/leads"), 200)[0]]
        lines.append(_row("admin export, every column", exports))
        narrow = f"{base}/_sandbox/export/leads?columns=leadid,emailaddress1,modifiedon"
        lines.append(_row("admin export, 3 columns", [_timed(lambda: http.get(narrow), 200)[0]]))
        return lines
    finally:
        http.close()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leads", type=int, default=100_000)
    parser.add_argument("--serve", nargs=2, metavar=("DATA_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(Path(args.serve[0]), int(args.serve[1]))
        return
    print("\n".join(run(args.leads)))


if __name__ == "__main__":
    main()
