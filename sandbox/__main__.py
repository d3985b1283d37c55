"""Command line: `python -m sandbox serve | seed | env`."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path

DEFAULT_DATA_DIR = Path(".sandbox")


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from sandbox.activecampaign.app import create_app as create_ac_app
    from sandbox.credentials import RuntimeInfo, is_loopback, load_or_create
    from sandbox.dataverse.app import create_app as create_dataverse_app
    from sandbox.tls import ensure_certificates

    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    load_or_create(data_dir)
    tls = ensure_certificates(data_dir, hosts=[args.host, "localhost", "127.0.0.1"])
    limits = not args.no_limits
    ac_app = create_ac_app(data_dir, limits=limits, limit_scale=args.limit_scale)
    d365_app = create_dataverse_app(
        data_dir,
        limits=limits,
        limit_scale=args.limit_scale,
        token_lifetime=args.token_lifetime,
        base_url=f"https://{args.host}:{args.d365_port}",
    )
    # The real ActiveCampaign is https only, and the hooks send a credential over plain http
    # only to a loopback host: on any other address the AC emulator speaks TLS too.
    ac_tls = not is_loopback(args.host)
    ac_ssl = (
        {"ssl_certfile": str(tls.cert_path), "ssl_keyfile": str(tls.key_path)} if ac_tls else {}
    )
    # A stop does not wait for clients' idle keep-alive connections (the hooks' pools) to close.
    graceful = {"timeout_graceful_shutdown": 1}
    servers = [
        uvicorn.Server(
            uvicorn.Config(
                ac_app,
                host=args.host,
                port=args.ac_port,
                log_level=args.log_level,
                **ac_ssl,
                **graceful,
            )
        ),
        uvicorn.Server(
            uvicorn.Config(
                d365_app,
                host=args.host,
                port=args.d365_port,
                log_level=args.log_level,
                ssl_certfile=str(tls.cert_path),
                ssl_keyfile=str(tls.key_path),
                **graceful,
            )
        ),
    ]
    info = RuntimeInfo(
        host=args.host,
        ac_port=args.ac_port,
        d365_port=args.d365_port,
        ca_path=str(tls.ca_path),
        pid=os.getpid(),
        ac_tls=ac_tls,
    )
    info.save(data_dir)
    if args.env_file:
        _write_env_file(args.env_file, data_dir)
    print(f"ActiveCampaign API v3 emulator: {info.ac_url}/api/3", flush=True)
    print(f"Dataverse Web API emulator:     {info.d365_url}/api/data/v9.2", flush=True)
    print(f"Sandbox CA certificate:         {tls.ca_path}", flush=True)
    print(f"Rate limits: {'on' if limits else 'off'} (scale {args.limit_scale})", flush=True)
    print(f"Connections: python -m sandbox env --data-dir {shlex.quote(str(data_dir))}", flush=True)

    async def run_both() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    asyncio.run(run_both())


def _write_env_file(path: Path, data_dir: Path) -> None:
    """The two API connections as `export` lines for a shell to source (the Airflow image's
    entrypoint), readable by this user only; the state store's connection stays the deployment's."""
    from sandbox.credentials import connection_env

    env = connection_env(data_dir)
    env.pop("AIRFLOW_CONN_CRM_SYNC_STATE")
    partial = path.with_name(f".{path.name}.partial")
    handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(handle, 0o600)
    with os.fdopen(handle, "w") as out:
        out.writelines(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    os.replace(partial, path)  # a reader never sees half a file


def _seed(args: argparse.Namespace) -> None:
    from sandbox.activecampaign.seed import seed_activecampaign
    from sandbox.dataverse.seed import seed_dataverse

    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    ac = seed_activecampaign(data_dir, seed=args.seed, contacts=args.ac_contacts)
    dv = seed_dataverse(
        data_dir,
        seed=args.seed,
        leads=args.leads,
        contacts=args.contacts,
        accounts=args.accounts,
        opportunities=args.opportunities,
    )
    print(f"seeded ActiveCampaign: {ac}")
    print(f"seeded Dataverse: {dv}")


def _env(args: argparse.Namespace) -> None:
    from sandbox.credentials import connection_env

    for name, value in connection_env(args.data_dir.resolve(), args.state_url).items():
        print(f"export {name}={shlex.quote(value)}")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start both emulators")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--ac-port", type=int, default=8081)
    serve.add_argument("--d365-port", type=int, default=8443)
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    serve.add_argument("--no-limits", action="store_true", help="switch the rate limits off")
    serve.add_argument(
        "--limit-scale",
        type=float,
        default=1.0,
        help="multiply every rate limit by this factor (e.g. 10 for fast tests)",
    )
    serve.add_argument("--token-lifetime", type=int, default=3600, help="access token seconds")
    serve.add_argument("--log-level", default="warning")
    serve.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help="also write the AC and Dataverse AIRFLOW_CONN_* exports to this file (mode 600)",
    )
    serve.set_defaults(run=_serve)

    seed = commands.add_parser("seed", help="fill both emulators with deterministic fake data")
    seed.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    seed.add_argument("--seed", type=int, default=42)
    seed.add_argument("--ac-contacts", type=int, default=200)
    seed.add_argument("--leads", type=int, default=100)
    seed.add_argument("--contacts", type=int, default=100)
    seed.add_argument("--accounts", type=int, default=0)
    seed.add_argument("--opportunities", type=int, default=0)
    seed.set_defaults(run=_seed)

    env = commands.add_parser("env", help="print AIRFLOW_CONN_* exports for the running sandbox")
    env.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    env.add_argument("--state-url", default=None, help="SQLAlchemy URL of the sync state store")
    env.set_defaults(run=_env)

    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
