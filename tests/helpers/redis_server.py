"""An own `redis-server` on a free port for tests that kill or restart Redis.

The shared Redis must never be restarted or flushed, so fault tests start their own: durable
(`--appendonly yes --appendfsync always`, a kill -9 loses nothing) or volatile (no persistence, a
restart comes back empty, like the shared server). `kill()` is SIGKILL; `restart()` brings the
server back on the same port and folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> str | None:
    """Path of `redis-server`, or None when it is not installed."""
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port nobody listens on right now (the usual small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process under `workdir`; start, kill -9, restart, stop."""

    def __init__(
        self,
        workdir: Path,
        *,
        durable: bool,
        password: str | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.durable = durable
        self.password = password
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
            "--save", "",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--appendonly", "yes" if self.durable else "no",
            "--appendfsync", "always",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(
            port=self.port, password=self.password, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited early: {self.log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer: {self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """kill -9, then start again on the same port and folder."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Terminate politely, or kill after a few seconds."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        log = self.workdir / "redis.log"
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class RedisServerFactory:
    """Starts servers in folders under `workdir` and stops all of them in `stop_all()`; the shape
    of a fixture: `factory = RedisServerFactory(tmp_path); yield factory; factory.stop_all()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[RedisServer] = []

    def __call__(self, *, durable: bool, password: str | None = None) -> RedisServer:
        server = RedisServer(
            self.workdir / f"redis-{len(self.servers)}", durable=durable, password=password
        )
        self.servers.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()
