"""Shared-state test support: a real ``redis-server`` on a free 127.0.0.1 port (stoppable and
restartable on the same port) and ``proxycore serve`` processes sharing it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from tests.e2e.test_lifecycle import spawn_proxycore, wait_for_log
from tests.helpers import http_request

REDIS: Final = shutil.which("redis-server")
LISTENING: Final = re.compile(r"proxycore.server: listening on 127\.0\.0\.1:(\d+)")
SECRET: Final = "relay-secret-for-tests-0123456789"
#: The inbound bearer secrets of the tunnel tests: ``bearer:0`` owns the session.
OWNER_TOKEN: Final = "owner-token-abcdefghijklmnopqrstuvwxyz012345"
OTHER_TOKEN: Final = "other-token-abcdefghijklmnopqrstuvwxyz012345"


def free_port() -> int:
    """A port that was free a moment ago (a race with another process is possible and would
    fail a test at startup, loudly, never pass one wrongly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class RedisServer:
    """One ``redis-server`` (no persistence) in ``directory`` on ``port``."""

    def __init__(self, directory: Path) -> None:
        assert REDIS is not None
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None and self.process is None
        self.process = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited ({self.process.returncode})")
            time.sleep(0.05)  # blocking on purpose: also called from sync fixtures
        raise AssertionError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def command(self, *args: str) -> str:
        """Run one command (redis-cli-less: inline protocol) and return the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall((" ".join(args) + "\r\n").encode())
            return conn.recv(65536).decode()


@dataclass
class Proxy:
    process: trio.Process
    port: int
    admin: int
    log: Path

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def write_config(
    path: Path,
    redis_url: str,
    *,
    admin: int,
    rate: str = "",
    state: str = "",
    tunnel: bool = False,
    timeout: float = 0.2,
    upstream: str = "http://127.0.0.1:9/",
) -> None:
    secret_file = path.parent / "relay.secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    inbound = path.parent / "inbound.secret"
    inbound.write_text(f"{OWNER_TOKEN}\n{OTHER_TOKEN}\n", encoding="utf-8")
    inbound.chmod(0o600)
    lines = [
        '[server]\nlisten = "127.0.0.1:0"\nshutdown_grace = 1\n',
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n',
        f'[state]\nredis = "{redis_url}"\ntimeout = {timeout}\n{state}\n',
    ]
    if tunnel:  # the replica relay, on a port of its own choosing; the inbound tokens
        lines.append(f'relay_listen = "127.0.0.1:0"\nrelay_secret_file = "{secret_file}"\n')
        lines.append(f'[inbound]\nmode = "bearer"\nsecret_file = "{inbound}"\n')
        lines.append("[tunnel]\nenabled = true\n")
    if rate:
        lines.append(
            f'[[routes]]\nprefix = "/app/"\nupstream = "{upstream}"\nrate_limit = {rate}\n'
        )
    path.write_text("\n".join(lines), encoding="utf-8")


@contextlib.asynccontextmanager
async def run_proxy(config: Path, log: Path, admin: int) -> AsyncIterator[Proxy]:
    async with spawn_proxycore(["serve", "--config", str(config)], log) as process:
        port = int((await wait_for_log(log, LISTENING, process))[1])
        yield Proxy(process, port, admin, log)


async def metric(proxy: Proxy, name: str) -> float | None:
    status, _, body = await http_request("127.0.0.1", proxy.admin, "GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> None:
    """Poll ``check`` until it is true; fail after ``within`` seconds."""
    with trio.fail_after(within):
        while True:
            if await check():
                return
            await trio.sleep(0.05)
