"""``serve --workers N``: a supervisor and N worker processes, each a full Trio proxy.

- Workers bind the same listen addresses with ``SO_REUSEPORT``, so the kernel
  spreads new connections over them. A ``:0`` port is resolved once by the
  supervisor (a bound, non-listening ``SO_REUSEPORT`` socket holds it), so
  every worker listens on the same port.
- A worker that dies is restarted, with backoff (0.5 s doubling to 30 s; reset
  after a worker has run for 30 s).
- SIGHUP is passed to every worker that reported ready (each re-reads the
  config file); a worker still starting (or restarting) gets it once it
  reports ready, because its handler exists only then. SIGTERM and SIGINT go
  to every worker at once (each drains); the supervisor exits when all have.
  A second SIGTERM/SIGINT kills the workers at once. Should the supervisor
  itself fail, its workers get SIGTERM on the way out (none is left behind).
- The admin endpoint is served by the supervisor: ``/metrics`` is the sum over
  workers (each serves its own on a private loopback port, scraped on
  request; the config generation is the highest seen), plus
  ``proxycore_workers`` and ``proxycore_worker_restarts_total``; ``/readyz`` is
  200 while every worker is up. A scrape that can't be merged (a malformed
  worker page) is a 500 for that request (:mod:`proxycore.ops.admin`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ..config import Config, ConfigError
from ..net.client import fetch
from ..net.stream import CHUNK
from ..ops.admin import AdminApp, serve_admin
from ..ops.process import pid_file, signal_receiver
from ..ops.server import Server
from ..security.secrets import SecretError

__all__ = ["merged_metrics", "supervise"]

log: Final = logging.getLogger("proxycore.supervisor")

BACKOFF_START_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
HEALTHY_AFTER_S: Final = 30.0
READY_TIMEOUT_S: Final = 30.0


@dataclass(slots=True)
class _Worker:
    slot: int
    process: trio.Process | None = None
    admin: tuple[str, int] | None = None
    restarts: int = 0
    #: A SIGHUP came while the worker was not ready yet: pass it on once it is.
    reload_pending: bool = False


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reserve(host: str) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket on a free port of ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


class _Supervisor:
    def __init__(self, args: argparse.Namespace, config: Config, count: int) -> None:
        self.config = config
        self.reservations: list[socket.socket] = []
        listen = []
        for host, port in config.server.listen_addresses:
            if port == 0:
                sock = _reserve(host)
                self.reservations.append(sock)
                port = sock.getsockname()[1]
            listen.append(_format(host, port))
        self.listen = listen
        if args.config:
            source = ["--config", args.config]
        elif args.routes:
            source = ["--routes", args.routes]
        else:
            source = ["--upstream", args.upstream]
        self.base_cmd = [sys.executable, "-m", "proxycore", "serve", *source]
        self.base_cmd += ["--log-level", args.log_level, "--listen-override", ",".join(listen)]
        if args.no_access_log:
            self.base_cmd.append("--no-access-log")
        self.pid_path: str | None = args.pid_file
        self.workers = [_Worker(slot) for slot in range(count)]
        #: The workers' private directory (mode 0700): their tunnel relay sockets.
        self.relay_dir = tempfile.mkdtemp(prefix="proxycore-workers-")
        self.stopping = False
        self.forced = False

    def signal_all(self, signum: int) -> None:
        """``signum`` to every live worker; SIGHUP only to the ready ones (the others get it
        when they report ready: before that, their handler may not exist yet)."""
        for worker in self.workers:
            if worker.process is None or worker.process.returncode is not None:
                continue
            if signum == signal.SIGHUP and worker.admin is None:
                worker.reload_pending = True
            else:
                worker.process.send_signal(signum)

    async def run_worker(self, worker: _Worker) -> None:
        backoff = BACKOFF_START_S
        while not self.is_stopping():
            read_fd, write_fd = os.pipe()
            cmd = [*self.base_cmd, "--report-fd", str(write_fd)]
            worker.reload_pending = False  # a process started from now on reads the file anew
            try:
                env = {
                    **os.environ,
                    "PROXYCORE_WORKER_INDEX": str(worker.slot),
                    "PROXYCORE_WORKERS": str(len(self.workers)),
                    "PROXYCORE_WORKER_DIR": self.relay_dir,
                }
                process = await trio.lowlevel.open_process(cmd, pass_fds=(write_fd,), env=env)
            finally:
                os.close(write_fd)
            worker.process = process
            if self.is_stopping():  # the stop signal came while this worker was starting
                process.send_signal(signal.SIGKILL if self.forced else signal.SIGTERM)
            started = trio.current_time()
            async with trio.lowlevel.FdStream(read_fd) as report:
                with trio.move_on_after(READY_TIMEOUT_S):
                    line = b""
                    while not line.endswith(b"\n"):
                        chunk = await report.receive_some(CHUNK)
                        if not chunk:
                            break
                        line += chunk
                    if line:
                        admin = json.loads(line)["admin"]
                        worker.admin = (admin[0], int(admin[1]))
                        log.info("worker %d up (pid %d)", worker.slot, process.pid)
                        if worker.reload_pending and process.returncode is None:
                            worker.reload_pending = False
                            process.send_signal(signal.SIGHUP)
            code = await process.wait()
            worker.admin = None
            if self.is_stopping():
                return
            if trio.current_time() - started > HEALTHY_AFTER_S:
                backoff = BACKOFF_START_S
            log.warning(
                "worker %d (pid %d) exited with %s; restarting in %g s",
                worker.slot,
                process.pid,
                code,
                backoff,
            )
            worker.restarts += 1
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def is_stopping(self) -> bool:
        return self.stopping

    def ready(self) -> bool:
        return not self.stopping and all(w.admin is not None for w in self.workers)

    async def metrics(self) -> bytes:
        workers = self.workers
        admins = [w.admin for w in workers if w.admin is not None]
        return await merged_metrics(admins, restarts=sum(w.restarts for w in workers))


async def merged_metrics(admins: list[tuple[str, int]], *, restarts: int) -> bytes:
    """The workers' ``/metrics`` pages (scraped from their ``admins``) merged into one.

    A worker that can't be reached (5 s) or doesn't answer 200 is left out. Raises
    ``ValueError`` for a page that isn't the Prometheus text format.
    """
    texts = []
    for host, port in admins:
        with trio.move_on_after(5):
            try:
                res = await fetch(host, port, "/metrics")
            except OSError:
                continue
            if res.status == 200:
                texts.append(res.body.decode("utf-8", "replace"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(texts, len(admins), restarts))
    return generate_latest(registry)


class _Merged(Collector):
    """Every worker's samples summed by name and labels (the generation: the highest)."""

    def __init__(self, texts: list[str], up: int, restarts: int) -> None:
        self._texts = texts
        self._up = up
        self._restarts = restarts

    def collect(self) -> list[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for text in self._texts:
            for family in text_string_to_metric_families(text):
                if family.name not in families:
                    families[family.name] = Metric(family.name, family.documentation, family.type)
                    values[family.name] = {}
                merged = values[family.name]
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if family.name == "proxycore_config_generation":
                        merged[key] = max(merged.get(key, 0.0), sample.value)
                    else:
                        merged[key] = merged.get(key, 0.0) + sample.value
        out = []
        for name, family in families.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            out.append(family)
        workers = Metric("proxycore_workers", "Worker processes up.", "gauge")
        workers.add_sample("proxycore_workers", {}, self._up)
        restarts = Metric("proxycore_worker_restarts", "Worker restarts.", "counter")
        restarts.add_sample("proxycore_worker_restarts_total", {}, self._restarts)
        return [*out, workers, restarts]


async def _supervise(sup: _Supervisor) -> None:
    signums = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
    with signal_receiver(*signums) as signals, pid_file(sup.pid_path):
        try:
            await _run(sup, signals)
        finally:  # all have exited, unless the supervisor itself failed: then they drain
            sup.signal_all(signal.SIGTERM)


async def _run(sup: _Supervisor, signals: AsyncIterator[int]) -> None:
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading every worker")
                    sup.signal_all(signal.SIGHUP)
                elif sup.stopping:
                    log.warning("second signal: killing the workers")
                    sup.forced = True
                    sup.signal_all(signal.SIGKILL)
                else:
                    log.info("%s: stopping the workers", signal.Signals(signum).name)
                    sup.stopping = True
                    sup.signal_all(signal.SIGTERM)

        nursery.start_soon(watch)
        admin = sup.config.admin.address
        if admin is not None:
            app = AdminApp(sup.ready, sup.metrics)
            await nursery.start(serve_admin, app, *admin)
        async with trio.open_nursery() as workers:
            for worker in sup.workers:
                workers.start_soon(sup.run_worker, worker)
        nursery.cancel_scope.cancel()


def supervise(args: argparse.Namespace, config: Config, workers: int) -> int:
    """Run ``workers`` worker processes (0: one per core) until they have all stopped."""
    count = workers or os.cpu_count() or 1
    try:
        Server(config)  # refuse what a worker would refuse, before starting any
    except (ConfigError, SecretError) as exc:
        print(f"proxycore: {exc}", file=sys.stderr)
        return 2
    sup = _Supervisor(args, config, count)
    log.info("starting %d workers on %s", count, ", ".join(sup.listen))
    try:
        trio.run(_supervise, sup)
    finally:
        for sock in sup.reservations:
            sock.close()
        shutil.rmtree(sup.relay_dir, ignore_errors=True)
    return 0
