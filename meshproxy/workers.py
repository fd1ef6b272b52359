"""`meshproxy proxy --workers N`: N proxy processes sharing the REST and gRPC ports (SO_REUSEPORT).

How it works. The parent has validated the config (bad config exits 64 before this module
runs, so nothing is bound). It spawns N fresh interpreters (`python -m meshproxy.workers`; no
fork, so no gRPC or event-loop state crosses a fork): worker 0 first, then, once it has bound
its ports, the others, told the ports worker 0 got when the config says port 0. Each worker is
a whole proxy: it loads the file itself, binds both listeners with SO_REUSEPORT, runs its own
snapshot, pools, health checks, ADS stream and file watcher, and writes two lines to a pipe
the parent reads: `meshproxy bound` once its ports are bound, `meshproxy ready` once it takes
connections. With dynamic_resources a worker listens only once its own first table is in
force (or initial_fetch_timeout passed), so the kernel, which spreads new connections over
the listening sockets alone, never gives one to a worker without a table. A connection stays
with the worker that accepted it.

Admin: only worker 0 binds the configured admin address (so /ready, /metrics, /clusters and
/config_dump there are worker 0's view); workers 1..N-1 serve their own admin on an ephemeral
port of 127.0.0.1, listed in the parent's ready line. Metrics are per worker until the
observability issue adds multiprocess collection. In sidecar mode only worker 0 reports the
local runtime (a runtime name can have one registration stream); the others learn it over ADS.

The parent forwards SIGTERM and SIGINT to every worker (each drains within drain_timeout) and
exits 0 once all workers exited 0; a signal while they start stops them once started (workers
begin with the signals blocked until their handlers are in place). It restarts nothing: a
worker that exits on its own makes the parent stop the others and exit non-zero, with that
worker's code, or 1 if that code was 0, so the supervisor above (Kubernetes, systemd
Restart=on-failure) restarts the whole proxy. Workers get SIGTERM if the parent dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import tempfile

from meshproxy import cli
from meshproxy.config import EXIT_CONFIG, Address, ConfigError, ProxyConfig, load_file

log = logging.getLogger("meshproxy.workers")
KILL_AFTER = 5.0  # seconds past drain_timeout before a worker that has not exited is killed
_PR_SET_PDEATHSIG = 1
PEERS_ENV = "MESHPROXY_WORKER_ADMINS_FILE"  # for worker 0: the others' admin addresses


def default_count() -> int:
    """One worker per core this process may use: CPU affinity, capped by a cgroup v2 quota
    (a container limited to 2 CPUs on a 64-core node gets 2, not 64)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota = cpu_quota(f.read())
    except OSError:
        quota = None
    return max(1, min(cores or 1, quota or cores or 1))


def cpu_quota(cpu_max: str) -> int | None:
    """Whole CPUs allowed by a cgroup v2 `cpu.max` ("150000 100000" -> 2); None: no limit."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return max(1, math.ceil(int(parts[0]) / int(parts[1])))


def worker_config(config: ProxyConfig, index: int, http_port: int | None = None,
                  grpc_port: int | None = None) -> ProxyConfig:
    """Worker `index`'s view of the config: reserved ports filled in; only worker 0 keeps the
    admin address and the sidecar registration."""
    changes: dict = {}
    if http_port is not None:
        changes["http_address"] = Address(config.http_address.host, http_port)
    if grpc_port is not None and config.grpc_address is not None:
        changes["grpc_address"] = Address(config.grpc_address.host, grpc_port)
    if index > 0:
        changes["admin_address"] = Address("127.0.0.1", 0)
        if config.dynamic is not None and config.dynamic.sidecar is not None:
            changes["dynamic"] = dataclasses.replace(config.dynamic, sidecar=None)
    return dataclasses.replace(config, **changes)


def exit_code(worker_code: int, stopping: bool) -> int:
    """The parent's exit code for a worker's returncode: 128 + signo when a signal killed it,
    and never 0 for a worker that exited while the parent was not stopping it (a supervisor
    restarting on failure must bring the proxy back)."""
    code = worker_code if worker_code >= 0 else 128 - worker_code
    return code if stopping or code != 0 else 1


# --- the parent ----------------------------------------------------------------------------


def supervise(path: str, config: ProxyConfig, count: int) -> int:
    """Run `count` workers for the config file at `path` until they have all exited."""
    return asyncio.run(_Parent(path, config, count).run())


@dataclasses.dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process
    fields: dict[str, str] = dataclasses.field(default_factory=dict)  # of its bound line
    # set True by its `meshproxy bound` line (ports bound, not yet listening) and its
    # `meshproxy ready` line (taking connections); False when it exited first
    bound: asyncio.Future = dataclasses.field(default_factory=asyncio.Future)
    ready: asyncio.Future = dataclasses.field(default_factory=asyncio.Future)


class _Parent:
    def __init__(self, path: str, config: ProxyConfig, count: int):
        self.path, self.config, self.count = path, config, count
        self.ports: dict[str, str] = {}  # listeners configured with port 0: worker 0's ports
        self.workers: list[_Worker] = []
        self.stopping = False
        self.code = 0
        fd, self.admins_file = tempfile.mkstemp(prefix="meshproxy-workers-", suffix=".admins")
        os.close(fd)
        os.unlink(self.admins_file)  # created when every worker is ready

    async def run(self) -> int:
        cli.on_stop_signals(self.stop)
        exits = []
        first = await self._spawn(0, exits)
        # The others start once worker 0 has bound (they join its ports), not once it is
        # ready: each waits for its own first table before it listens.
        if await first.bound and not self.stopping:
            self._learn_ports(first.fields)
            for i in range(1, self.count):
                await self._spawn(i, exits)
            ready = await asyncio.gather(*(w.ready for w in self.workers))
            if all(ready) and not self.stopping:
                self._announce()
        await asyncio.gather(*exits)
        with contextlib.suppress(OSError):
            os.unlink(self.admins_file)
        return self.code

    def _learn_ports(self, fields: dict[str, str]) -> None:
        for key, addr, field in (("http", self.config.http_address, "rest"),
                                 ("grpc", self.config.grpc_address, "grpc")):
            if addr is not None and addr.port == 0:
                self.ports[key] = fields.get(field, "").rpartition(":")[2]

    async def _spawn(self, index: int, exits: list) -> _Worker:
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "meshproxy.workers", "--config", self.path,
               "--index", str(index), "--ready-fd", str(write_fd), "--parent", str(os.getpid()),
               "--log-level", logging.getLevelName(logging.getLogger().level).lower()]
        for key, port in self.ports.items():
            cmd += [f"--{key}-port", str(port)]
        env = dict(os.environ)
        if index == 0:
            env[PEERS_ENV] = self.admins_file
        # The worker starts with SIGTERM and SIGINT blocked (a mask survives exec), so one
        # sent before its handlers are installed waits for them instead of killing it half
        # started. The fork happens before the first await, so concurrent spawns cannot mix up
        # the parent's mask; it is unblocked again, not restored, for the same reason.
        signal.pthread_sigmask(signal.SIG_BLOCK, cli.STOP_SIGNALS)
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, pass_fds=(write_fd,), env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, cli.STOP_SIGNALS)
            os.close(write_fd)
        worker = _Worker(index, proc)
        self.workers.append(worker)
        self.workers.sort(key=lambda w: w.index)
        if self.stopping:  # a signal came while it was spawned: it stops once started
            proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        exits.append(loop.create_task(self._watch(worker)))
        exits.append(loop.create_task(self._read_lines(worker, read_fd)))
        return worker

    async def _read_lines(self, worker: _Worker, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb"))
        try:
            while not worker.ready.done():
                line = (await reader.readline()).decode()
                if line.startswith("meshproxy bound ") and not worker.bound.done():
                    worker.fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
                    worker.bound.set_result(True)
                elif line.startswith("meshproxy ready "):
                    worker.ready.set_result(True)
                elif not line:  # it exited first; _watch has the code
                    break
        finally:
            transport.close()
            for step in (worker.bound, worker.ready):
                if not step.done():
                    step.set_result(False)

    def _announce(self) -> None:
        first = self.workers[0].fields
        pids = ",".join(str(w.proc.pid) for w in self.workers)
        admins = ",".join(w.fields.get("admin", "?") for w in self.workers)
        with open(self.admins_file, "w", encoding="utf-8") as f:  # worker 0's /metrics reads it
            f.write("\n".join(w.fields.get("admin", "?") for w in self.workers) + "\n")
        print(f"meshproxy ready rest={first.get('rest')} admin={first.get('admin')} "
              f"grpc={first.get('grpc')} workers={self.count} pids={pids} worker_admins={admins}",
              flush=True)

    async def _watch(self, worker: _Worker) -> None:
        code = await worker.proc.wait()
        if self.code == 0:
            self.code = exit_code(code, self.stopping)
        if not self.stopping:
            log.error("worker %d (pid %d) exited with %d while the proxy was not stopping; "
                      "stopping the others", worker.index, worker.proc.pid, code)
            self.stop(signal.SIGTERM)

    def stop(self, sig: int) -> None:
        """Forward sig to every worker still running; kill what outlives its drain."""
        if not self.stopping:
            self.stopping = True
            asyncio.get_running_loop().call_later(
                self.config.drain_timeout + KILL_AFTER, self._kill_leftovers)
        for w in self.workers:
            if w.proc.returncode is None:
                w.proc.send_signal(sig)

    def _kill_leftovers(self) -> None:
        for w in self.workers:
            if w.proc.returncode is None:
                log.error("worker %d (pid %d) still running after drain; killing it",
                          w.index, w.proc.pid)
                w.proc.kill()


# --- a worker ------------------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m meshproxy.workers")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--http-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s")
    _die_with_parent(args.parent)
    try:
        config = load_file(args.config)
    except ConfigError as e:  # the file changed since the parent read it
        print(f"meshproxy: invalid config: {e}", file=sys.stderr)
        return EXIT_CONFIG
    config = worker_config(config, args.index, args.http_port, args.grpc_port)
    with os.fdopen(args.ready_fd, "w") as ready:
        return cli._run(cli.serve_proxy(config, args.config, reuse_port=True, announce=ready))


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) when the parent dies, so no worker outlives a killed parent."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: workers then outlive a SIGKILLed parent
        return
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
