"""Load generators: the request body, wrk (throughput) and k6 (latency), and their parsers."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from procs import binaries

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk_post.lua"
K6_SCRIPT = HERE / "k6_latency.js"
K6_MODELS_SCRIPT = HERE / "k6_models.js"
BODY_BYTES = 3000
BIG_BODY_BYTES = 600_000  # a tensor body: one FP32 input of about 75,000 values as JSON
# Past its own duration, a load generator gets this long before it is killed.
OVERRUN_S = 30


def infer_body(size: int = BODY_BYTES) -> bytes:
    """A KServe v2 infer request of about `size` bytes: one FP32 tensor of deterministic values."""
    values: list[str] = []
    head = '{"inputs":[{"name":"input0","datatype":"FP32","shape":[1,%d],"data":['
    tail = "]}]}"
    length = 0  # of the values joined, with their commas
    while len(head) + 6 + len(tail) + length < size:
        values.append(f"{(len(values) * 0.618034) % 1:.6f}")
        length += len(values[-1]) + 1
    return ((head % len(values)) + ",".join(values) + tail).encode()


def _env(body_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "BENCH_BODY": str(body_path), **extra}


def _pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


# -- wrk --------------------------------------------------------------------------------------

@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = [f"{self.non_2xx} non-2xx/3xx responses"] if self.non_2xx else []
        errors = {k: v for k, v in self.socket_errors.items() if v}
        if errors:
            out.append("socket errors " + ", ".join(f"{k} {v}" for k, v in errors.items()))
        if self.requests == 0:
            out.append("no request completed")
        return out


_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_wrk(text: str) -> WrkResult:
    """Pull totals, rate and error counts out of wrk's plain-text report."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", text)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not done or not rate:
        raise RuntimeError(f"wrk output not understood:\n{text}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sockets.groups()))) if sockets else {}
    return WrkResult(requests=int(done.group(1)), seconds=float(done.group(2)) * _UNIT_S[done.group(3)],
                     rps=float(rate.group(1)), non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
                     socket_errors=errors)


def run_wrk(url: str, body_path: Path, seconds: int, connections: int, cpu: int | None) -> WrkResult:
    """One wrk run: one thread, `connections` keep-alive connections, for `seconds`."""
    argv = _pinned(cpu, [str(binaries()["wrk"]), "-t1", f"-c{connections}", f"-d{seconds}s",
                         "-s", str(WRK_SCRIPT), url])
    out = subprocess.run(argv, env=_env(body_path), capture_output=True, text=True,
                         timeout=seconds + OVERRUN_S)
    if out.returncode != 0:
        raise RuntimeError(f"wrk exited {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return parse_wrk(out.stdout)


# -- k6 ---------------------------------------------------------------------------------------

TREND_STATS = "p(50),p(90),p(99),max,min,avg,count"


@dataclass
class K6Result:
    us: dict[str, float]  # p50, p90, p99, max, min, avg of http_req_duration, microseconds
    count: int
    failed_rate: float
    checks_rate: float
    dropped: int
    forwarded_rate: float | None = None  # k6_models.js: share of answers that took an extra hop
    total: int = 0  # requests sent, warm-up included (what a process's CPU time over the run served)

    def problems(self) -> list[str]:
        out = []
        if self.count == 0:
            out.append("no request measured")
        if self.failed_rate > 0 or self.checks_rate < 1:
            out.append(f"{self.failed_rate:.1%} of requests failed (status not 200)")
        return out


def parse_k6_summary(data: dict) -> K6Result:
    """Read the measured (phase=measure) metrics from k6's handleSummary data."""
    metrics = data["metrics"]
    trend = metrics["http_req_duration{phase:measure}"]["values"]
    keys = {"p(50)": "p50", "p(90)": "p90", "p(99)": "p99", "max": "max", "min": "min", "avg": "avg"}
    dropped = metrics.get("dropped_iterations", {}).get("values", {}).get("count", 0)
    return K6Result(us={short: trend[k] * 1000.0 for k, short in keys.items()},
                    count=int(trend.get("count", 0)),
                    failed_rate=metrics["http_req_failed{phase:measure}"]["values"]["rate"],
                    checks_rate=metrics["checks{phase:measure}"]["values"]["rate"],
                    dropped=int(dropped),
                    forwarded_rate=metrics.get("forwarded{phase:measure}", {}).get("values", {}).get("rate"),
                    total=int(metrics.get("http_reqs", {}).get("values", {}).get("count", 0)))


def run_k6(url: str, body_path: Path, work: Path, name: str, rate: int, warmup_s: int, seconds: int,
           cpu: int | None, vus: int = 1, script: Path = K6_SCRIPT, **extra_env: str) -> K6Result:
    """One k6 run at `rate` requests/s with `vus` VUs (one keep-alive connection each);
    returns the measured part."""
    summary = work / f"k6-{name}.json"
    summary.unlink(missing_ok=True)
    argv = _pinned(cpu, [str(binaries()["k6"]), "run", "--quiet", "--no-color", "--no-usage-report",
                         "--summary-trend-stats", TREND_STATS, str(script)])
    env = _env(body_path, BENCH_URL=url, BENCH_RATE=str(rate), BENCH_WARMUP=str(warmup_s),
               BENCH_DURATION=str(seconds), BENCH_SUMMARY=str(summary), K6_NO_USAGE_REPORT="true",
               BENCH_VUS=str(vus),
               **extra_env)
    out = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True,
                         timeout=warmup_s + seconds + OVERRUN_S)
    # k6 exits 99 when a threshold fails; ours cannot, so any non-zero exit is a real error.
    if out.returncode != 0 or not summary.exists():
        raise RuntimeError(f"k6 exited {out.returncode}: {(out.stderr or out.stdout).strip()[-2000:]}")
    return parse_k6_summary(json.loads(summary.read_text()))


def merge_rounds(runs: list[dict], summed=("count", "dropped"), largest=("max", "failed_rate")) -> dict:
    """One figure set from interleaved rounds of k6 runs: percentiles and the other figures by
    their median, `largest` by the largest, `summed` summed, problems joined; each round's p50
    and p99 kept for the record (`rounds`)."""
    out = {k: statistics.median(run[k] for run in runs) for k, v in runs[0].items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({k: max(run[k] for run in runs) for k in largest})
    out.update({k: sum(run.get(k, 0) for run in runs) for k in summed})
    out["problems"] = sorted({p for run in runs for p in run["problems"]})
    out["rounds"] = [{"p50": run["p50"], "p99": run["p99"]} for run in runs]
    return out
