"""The sandbox as a child process: start `python -m sandbox serve`, wait for it, seed it, call its
admin API, stop it.

The one way Python code starts the sandbox: the test suite, the benchmarks, `make demo` and
`make up` (`devtools`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from sandbox.credentials import RUNTIME_FILE, is_loopback

PROJECT_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60


class SandboxStartError(RuntimeError):
    """The sandbox exited while starting, or did not listen in time."""


def free_port(preferred: int | None = None) -> int:
    """A TCP port nobody listens on right now: `preferred` when it is free."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port")


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@dataclass
class SandboxProcess:
    """One `python -m sandbox serve` on `host` (127.0.0.1 unless set) with its own data folder.

    `own_session` starts it in a session of its own, so that a Ctrl-C in the terminal reaches only
    the parent, which then stops it in order.
    """

    data_dir: Path
    ac_port: int = field(default_factory=free_port)
    d365_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    admin_timeout: float = 60
    process: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    start_timeout: float = START_TIMEOUT
    own_session: bool = False

    @property
    def ac_url(self) -> str:
        """Plain http on a loopback host, https (the sandbox's CA) on any other, as `serve` does."""
        scheme = "http" if is_loopback(self.host) else "https"
        return f"{scheme}://{self.host}:{self.ac_port}"

    @property
    def d365_url(self) -> str:
        return f"https://{self.host}:{self.d365_port}"

    @property
    def log_path(self) -> Path:
        """The server's output."""
        return self.data_dir / "serve.log"

    @property
    def ca_path(self) -> str:
        """The CA the sandbox generated for its TLS certificate."""
        from sandbox.credentials import RuntimeInfo

        return RuntimeInfo.load(self.data_dir).ca_path

    def start(self) -> None:
        """Start the server (output in `log_path`) and wait until both emulators listen; raises
        `SandboxStartError` when it exits or does not listen within `start_timeout` seconds."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "sandbox", "serve",
                    "--host", self.host,
                    "--data-dir", str(self.data_dir),
                    "--ac-port", str(self.ac_port),
                    "--d365-port", str(self.d365_port),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                start_new_session=self.own_session,
            )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise SandboxStartError(
                    f"the sandbox exited ({code}); see {self.log_path}:\n"
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            if (
                (self.data_dir / RUNTIME_FILE).exists()
                and _listening(self.host, self.ac_port)
                and _listening(self.host, self.d365_port)
            ):
                return
            time.sleep(0.1)
        self.stop()
        raise SandboxStartError(
            f"the sandbox did not listen within {self.start_timeout:.0f} s; see {self.log_path}"
        )

    def poll(self) -> int | None:
        """The server's exit code once it exited; None while it runs (or before `start`)."""
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s; with `own_session`, then its whole
        process group too)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self.own_session:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    def seed(self, **options: int) -> None:
        """Fill both emulators with deterministic fake data, server running or not:
        `python -m sandbox seed`, e.g. `seed(seed=7, leads=120)` for `--seed 7 --leads 120`."""
        args = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
        subprocess.run(
            [sys.executable, "-m", "sandbox", "seed", "--data-dir", str(self.data_dir), *args],
            check=True,
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
        )

    def restart(self) -> None:
        """Stop and start again on the same ports and data."""
        self.stop()
        self.start()

    def admin(self, service: str, method: str, path: str, **kwargs: Any) -> Any:
        """Call `/_sandbox/<path>` on the `ac` or `d365` emulator and return its JSON."""
        base = self.ac_url if service == "ac" else self.d365_url
        response = requests.request(
            method,
            f"{base}/_sandbox/{path.lstrip('/')}",
            verify=self.ca_path,
            timeout=self.admin_timeout,
            **kwargs,
        )
        response.raise_for_status()
        return response.json()
