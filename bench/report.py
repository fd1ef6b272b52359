"""Results of a bench run: per-path records, medians, the markdown table and the JSON file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from procs import ROOT, binaries

LATENCY_KEYS = ("p50", "p90", "p99", "max")
NOISE_PCT = 5.0  # above this share of the proxy core taken by others, a run is flagged noisy


@dataclass
class PathResult:
    """Everything measured for one path; `failed` means it could not run, `problems` taint it."""

    name: str
    failed: str | None = None
    halted: bool = False  # failed or answered wrongly: no further measurement
    problems: list[str] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)  # one per throughput round
    latency: dict | None = None  # microseconds, from k6: the rounds merged
    latency_runs: list[dict] = field(default_factory=list)  # one k6 run per latency round
    added: dict | None = None  # latency minus direct's, microseconds

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        return "invalid" if self.problems else "ok"

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    def spread(self, key: str) -> tuple[float, float] | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return (min(values), max(values)) if values else None


@dataclass
class Results:
    """One bench run: each test's per-path records, and the model-aware scenario."""

    main: dict[str, PathResult]  # 3 KB: throughput on one core, latency at --rate
    big: dict[str, PathResult]  # 600 KB: throughput on one core, latency at --rate
    fast: dict[str, PathResult]  # 3 KB: latency at --fast-rate
    workers: dict[str, PathResult]  # meshproxy --workers 1 and 2, not pinned: throughput
    models: dict = field(default_factory=dict)  # model_aware.run()
    grpc: dict = field(default_factory=dict)  # run.grpc_test(): {"paths": [...]} or {"failed": ...}

    @classmethod
    def empty(cls, paths: list[str], big: bool, fast: bool, workers: bool) -> "Results":
        def group(names):
            return {name: PathResult(name) for name in names}
        return cls(main=group(paths), big=group(paths if big else []),
                   fast=group(paths if fast else []),
                   workers=group(["meshproxy --workers 1", "meshproxy --workers 2"]
                                 if workers and "meshproxy" in paths else []))

    def all_ok(self) -> bool:
        groups = (self.main, self.big, self.fast, self.workers)
        return (all(r.status == "ok" for g in groups for r in g.values())
                and all("failed" not in m and not any(run["problems"] for run in m.values())
                        for m in self.models.values())
                and "failed" not in self.grpc
                and all(r["status_checked"] for r in self.grpc.get("paths", [])))


def add_latency_deltas(results: dict[str, PathResult]) -> None:
    """Fill `added` = path minus direct for each percentile, when direct was measured cleanly."""
    direct = results.get("direct")
    if not direct or not direct.latency or direct.status != "ok":
        return
    for r in results.values():
        if r.name != "direct" and r.latency:
            r.added = {k: r.latency[k] - direct.latency[k] for k in LATENCY_KEYS}


# -- machine and versions ---------------------------------------------------------------------

def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _version(name: str, argv_tail: list[str], pattern: str) -> str:
    exe = binaries()[name]
    if exe is None:
        return "missing"
    line = _first_line([str(exe), *argv_tail])
    found = re.search(pattern, line)
    return found.group(1) if found else line


def _meshproxy_version() -> str:
    try:
        from importlib.metadata import version
        pkg = version("meshproxy")
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        pkg = "not installed"
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return f"{pkg} (git {commit})"


def machine_info() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "versions": {
            "envoy": _version("envoy", ["--version"], r"/(\d+\.\d+\.\d+)/"),
            "nginx": _version("nginx", ["-v"], r"nginx/(\S+)"),
            "wrk": _version("wrk", ["-v"], r"^wrk (\S+)"),
            "k6": _version("k6", ["version"], r"^k6 (v\S+)"),
            "h2load": _version("h2load", ["--version"], r"nghttp2/(\S+)"),
            "python": platform.python_version(),
            "meshproxy": _meshproxy_version(),
        },
    }


# -- rendering --------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _cpu_cell(r: PathResult) -> str:
    med, spread = r.median("cpu_us_per_req"), r.spread("cpu_us_per_req")
    if med is None:
        return "-"
    return f"{med:.1f} ({spread[0]:.1f}-{spread[1]:.1f})" if len(r.runs) > 1 else f"{med:.1f}"


def _row(r: PathResult) -> list[str]:
    rss = r.median("rss_kib")
    lat = r.latency or {}
    added = r.added or {}
    return [r.name, r.status, _num(r.median("rps")), _cpu_cell(r), _num(rss and rss / 1024, 1),
            *(_num(lat.get(k)) for k in LATENCY_KEYS), *(_num(added.get(k), 0) for k in ("p50", "p90", "p99"))]


HEADER = ["path", "status", "req/s", "CPU us/req (min-max)", "RSS MiB",
          "p50 us", "p90 us", "p99 us", "max us", "added p50 us", "added p90 us", "added p99 us"]


def table(results: dict[str, PathResult]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results.values()]
    return "\n".join(lines)


def notes(results: dict[str, PathResult]) -> str:
    out = []
    for r in results.values():
        if r.failed:
            lines = [ln for ln in r.failed.splitlines() if ln.strip()]
            last = f" (log: `{lines[-1].strip()}`)" if len(lines) > 1 else ""
            out.append(f"- **{r.name} failed**: {lines[0]}{last}")
        for p in dict.fromkeys(r.problems):  # dedupe, keep order
            out.append(f"- **{r.name} invalid**: {p}")
        measured = r.runs + ([r.latency] if r.latency else [])
        other = max((m["proxy_core_other_pct"] for m in measured), default=0.0)
        steal = max((m["proxy_core_steal_pct"] for m in measured), default=0.0)
        if r.latency and r.latency["dropped"]:
            out.append(f"- {r.name}: k6 dropped {r.latency['dropped']} of its requests (a response took "
                       f"longer than the 1/rate interval, so the one VU fell behind)")
        if other > NOISE_PCT or steal > NOISE_PCT:
            out.append(f"- {r.name}: noisy, during a run other processes used up to {other:.0f}% "
                       f"and the hypervisor stole up to {steal:.0f}% of the proxy's core")
    return "\n".join(out)


def markdown(results: Results, machine: dict, settings: dict) -> str:
    import sections  # the other tests' tables; it uses this module's cells
    v = machine["versions"]
    head = [
        f"# meshproxy bench, {machine['date']}",
        "",
        f"{machine['nproc']} x {machine['cpu_model']}, Linux {machine['kernel']}; "
        f"envoy {v['envoy']}, nginx {v['nginx']}, wrk {v['wrk']}, k6 {v['k6']}, "
        f"h2load {v.get('h2load', 'missing')}, "
        f"python {v['python']}, meshproxy {v['meshproxy']}.",
        "",
        f"Throughput: wrk -t1 -c{settings['connections']} for {settings['duration_s']} s "
        f"(after {settings['warmup_s']} s warm-up), median of {settings['rounds']} interleaved rounds; "
        f"proxy pinned to cpu {settings['proxy_cpu']}, wrk and upstream to cpu {settings['load_cpu']}. "
        f"Latency: k6 at {settings['rate']} req/s over one connection for {settings['latency_duration_s']} s "
        f"in {settings['latency_rounds']} interleaved rounds (each path started afresh, "
        f"{settings['latency_warmup_s']} s warm-up each; percentiles are the medians over the "
        "rounds, max the largest), proxy "
        f"{'pinned as above' if settings['latency_proxy_pinned'] else 'not pinned'}; added = path minus direct. "
        "See bench/README.md.",
        "",
        f"## REST, {settings['body_bytes']:,}-byte body",
        "",
        table(results.main),
    ]
    extra = notes(results.main)
    parts = head + (["", extra] if extra else [])
    parts += sections.fast(results.fast, settings) + sections.big(results.big, settings)
    parts += sections.workers(results.workers, settings)
    parts += sections.models(results.models, settings)
    parts += sections.grpc(results.grpc, settings)
    parts += ["", "Plots: `latency.png` (percentiles per path and test), `cpu.png` (CPU per request "
              "per path)."]
    return "\n".join(parts) + "\n"


def _group_json(group: dict[str, PathResult]) -> dict:
    keys = ("rps", "cpu_us_per_req", "core_us_per_req", "rss_kib")
    return {name: {**asdict(r), "status": r.status, "median": {k: r.median(k) for k in keys}}
            for name, r in group.items()}


def write(results: Results, machine: dict, settings: dict, out_dir: Path) -> str:
    """Write latest.md and latest.json into `out_dir`; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(results, machine, settings)
    (out_dir / "latest.md").write_text(md)
    doc = {"machine": machine, "settings": settings, "paths": _group_json(results.main),
           "fast_rate": _group_json(results.fast), "big_body": _group_json(results.big),
           "workers": _group_json(results.workers), "model_aware": results.models,
           "grpc": results.grpc}
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    return md
