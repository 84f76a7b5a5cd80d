"""`rtb serve --workers N`: N independent service processes on one port.

Each worker is a fresh interpreter (multiprocessing's spawn: no state forked from a parent
that may hold OpenMP or BLAS threads) that loads the model itself, binds its own socket with
SO_REUSEPORT, so that the kernel spreads connections across the processes, and runs the
same app as a single process: its own champion and A/B poll, so hot swap and the A/B file
work in every process. The parent only supervises: it waits until every worker has loaded
its model and listens (a worker that cannot is a one-line error and nothing keeps
serving), restarts a worker that dies, and stops them all on SIGTERM or SIGINT.

Metrics: the parent gives the workers a fresh `$PROMETHEUS_MULTIPROC_DIR` (removed at
exit), so a scrape of any worker reports the figures of all of them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from rtb.errors import RtbError
from rtb.serving.app import ServeOptions, build_app, uvicorn_server
from rtb.serving.metrics import MULTIPROC_ENV

log = logging.getLogger(__name__)

READY, FAILED = "ready", "failed"
STOP_SECONDS = 30.0
RESTART_BACKOFF_SECONDS = 5.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that shares `port` with the other workers' (SO_REUSEPORT)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise RtbError(f"could not listen on {host}:{port} ({exc.strerror or exc})") from exc
    return sock


def _worker(options: ServeOptions, log_format: str, report: Connection) -> None:
    """One worker process: load, bind, say so to the parent, serve until told to stop."""
    logging.basicConfig(level=logging.INFO, format=log_format)
    try:
        app = build_app(options)
        sock = reuse_port_socket(options.host, options.port)
    except RtbError as exc:
        report.send((FAILED, str(exc)))
        raise SystemExit(1) from None
    log.info("worker %d serving model %s on http://%s:%d", os.getpid(),
             app.handler.service.current.version, options.host, options.port)
    report.send((READY, os.getpid()))
    report.close()
    uvicorn_server(app, options.host, options.port).run(sockets=[sock])


class Supervisor:
    """The worker processes and the parent's loop that keeps N of them running."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[Any] = []
        self.stopping = False
        root = logging.getLogger().handlers
        formatter = root[0].formatter if root else None
        self.log_format = (formatter._fmt if formatter is not None and formatter._fmt
                           else "%(asctime)s %(levelname)s %(name)s: %(message)s")

    def spawn(self) -> Any:
        """Start one worker and wait until it listens; RtbError with its reason if it cannot."""
        return self._ready(*self._launch())

    def _launch(self) -> tuple[Any, Connection]:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_worker, args=(self.options, self.log_format, send),
                                       name="rtb-serve-worker", daemon=False)
        process.start()
        send.close()
        return process, receive

    def _ready(self, process: Any, receive: Connection) -> Any:
        kind, detail = FAILED, None
        try:
            while True:
                if receive in wait([receive, process.sentinel]):
                    with contextlib.suppress(EOFError):
                        kind, detail = receive.recv()
                    break
                if not process.is_alive():
                    break
        finally:
            receive.close()
        if kind != READY:
            process.join(STOP_SECONDS)
            raise RtbError(str(detail or f"worker {process.pid} exited with {process.exitcode}"))
        return process

    def start(self) -> None:
        """Start all workers at once (they load in parallel); fail if any cannot serve."""
        launched = [self._launch() for _ in range(self.options.workers)]
        for process, receive in launched:
            try:
                self.workers.append(self._ready(process, receive))
            except RtbError:
                self.workers.extend(p for p, _ in launched if p not in self.workers)
                raise
        log.info("%d workers serving on http://%s:%d (pids %s)", len(self.workers),
                 self.options.host, self.options.port, ", ".join(str(w.pid) for w in self.workers))

    def supervise(self) -> None:
        """Until asked to stop: replace any worker that died (its live gauges dropped)."""
        from rtb.serving.metrics import mark_process_dead

        while not self.stopping:
            wait([w.sentinel for w in self.workers], timeout=1.0)
            for index, worker in enumerate(self.workers):
                if self.stopping or worker.is_alive():
                    continue
                log.error("worker %d exited with %s; starting another", worker.pid,
                          worker.exitcode)
                mark_process_dead(worker.pid)
                try:
                    self.workers[index] = self.spawn()
                except RtbError as exc:
                    log.error("could not restart a worker (%s); retrying in %.0f s", exc,
                              RESTART_BACKOFF_SECONDS)
                    time.sleep(RESTART_BACKOFF_SECONDS)

    def stop(self) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        deadline = time.monotonic() + STOP_SECONDS
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()


def run_workers(options: ServeOptions) -> None:
    """Serve with `options.workers` processes until SIGTERM/SIGINT; clean the metrics dir."""
    metrics_dir = tempfile.mkdtemp(prefix="rtb-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # before any worker imports prometheus_client
    supervisor = Supervisor(options)

    def stop(signum: int, _: object) -> None:
        supervisor.stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        supervisor.start()
        supervisor.supervise()
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop(MULTIPROC_ENV, None)
