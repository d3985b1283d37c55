"""The sandbox as a child process: start `python -m sandbox serve`, wait for it, call its admin API.

Used by the test suite and the benchmarks, which each run their own server on free ports.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

PROJECT_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class SandboxProcess:
    """One `python -m sandbox serve` on 127.0.0.1 with its own data folder."""

    data_dir: Path
    ac_port: int = field(default_factory=free_port)
    d365_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    admin_timeout: float = 60
    process: subprocess.Popen[bytes] | None = None

    @property
    def ac_url(self) -> str:
        return f"http://127.0.0.1:{self.ac_port}"

    @property
    def d365_url(self) -> str:
        return f"https://127.0.0.1:{self.d365_port}"

    @property
    def ca_path(self) -> str:
        """The CA the sandbox generated for its TLS certificate."""
        from sandbox.credentials import RuntimeInfo

        return RuntimeInfo.load(self.data_dir).ca_path

    def start(self) -> None:
        """Start the server and wait until both emulators listen."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / "serve.log"
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "sandbox", "serve",
                    "--data-dir", str(self.data_dir),
                    "--ac-port", str(self.ac_port),
                    "--d365-port", str(self.d365_port),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the sandbox exited: {log_path.read_text()[-2000:]}")
            if _listening(self.ac_port) and _listening(self.d365_port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the sandbox did not start within {START_TIMEOUT} s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

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
