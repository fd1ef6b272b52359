"""The bench: direct, Envoy, meshproxy and nginx side by side on one upstream, in one bounded run.

How it works: one nginx upstream is started (pinned with the load generators). Test 1 runs
`rounds` rounds; each round visits the paths in a fixed order, and for each path starts the
proxy fresh on its own core, sends one checked request, warms up with wrk, then measures wrk's
requests/s and the proxy's CPU seconds (from /proc) over the timed run, and stops the proxy;
the same again with the 600 KB body, and for meshproxy with 1 and 2 workers, not pinned.
Test 2, in interleaved rounds, starts each path once more and drives it with k6 at a fixed rate
(3 KB at 100 requests/s over one connection and at 1,000 over four); the 600 KB latency run at
100 follows its throughput runs. Test 3 is the model-aware scenario (model_aware.py), test 4
gRPC ModelInfer through Envoy and meshproxy (grpc_bench.py). A path that cannot start is
recorded as failed and the others carry on; a path that answers anything but 200 is recorded
as invalid. Results go to stdout and
bench/results/latest.{md,json}, plots to bench/results/*.png.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import grpc_bench
import load
import model_aware
import plots
import report
from paths import PATHS, UPSTREAM_RESPONSE, WORKER_PATHS, Env, start_upstream
from procs import Meter, binaries, http_status, rss_kib

HERE = Path(__file__).resolve().parent

# (throughput s, wrk warm-up s, rounds, latency s, k6 warm-up s,
#  600 KB and workers: throughput s and rounds, other latency runs s, model-aware s)
PROFILES = {"default": (6, 1, 5, 20, 1, 6, 2, 8, 30), "quick": (4, 1, 3, 8, 1, 3, 1, 5, 6)}
MODEL_ROUNDS = 3  # the model-aware runs: their seconds split into interleaved rounds
LATENCY_ROUNDS = 3  # the 3 KB latency runs (test 2), likewise


class InvalidPath(Exception):
    """The path runs but does not answer the bench request correctly."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated subset of: " + ",".join(PATHS))
    p.add_argument("--quick", action="store_true", help="short durations (about 1.5 minutes in all)")
    p.add_argument("--duration", type=int, help="seconds of each measured wrk run (default 10, quick 4)")
    p.add_argument("--warmup", type=int, help="seconds of wrk warm-up before each run (default 1)")
    p.add_argument("--rounds", type=int, help="interleaved throughput rounds (default 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--latency-duration", type=int, help="seconds of measured k6 load (default 20, quick 8)")
    p.add_argument("--latency-warmup", type=int, help="seconds of k6 warm-up in each latency round (default 1)")
    p.add_argument("--rate", type=int, default=100, help="k6 requests per second (default 100)")
    p.add_argument("--fast-rate", type=int, default=1000,
                   help="second k6 rate, 3 KB body (default 1000; 0: skip)")
    p.add_argument("--fast-vus", type=int, default=4,
                   help="k6 VUs (connections) at --fast-rate (default 4: one VU cannot keep up)")
    p.add_argument("--big-body-bytes", type=int, default=load.BIG_BODY_BYTES,
                   help="second body size (default 600000; 0: skip)")
    p.add_argument("--extra-duration", type=int, help="seconds of each 600 KB / workers wrk run "
                   "(default 6, quick 3)")
    p.add_argument("--extra-rounds", type=int, help="rounds of the 600 KB and workers runs (default 2)")
    p.add_argument("--extra-latency-duration", type=int,
                   help="seconds of the 1,000 req/s and 600 KB k6 runs (default 8, quick 5)")
    p.add_argument("--model-duration", type=int, help="seconds of each model-aware k6 run at --rate (default 30)")
    p.add_argument("--no-workers", action="store_true", help="skip meshproxy --workers 1 vs 2")
    p.add_argument("--no-model-aware", action="store_true", help="skip the model-aware scenario")
    p.add_argument("--no-grpc", action="store_true", help="skip gRPC ModelInfer (test 4)")
    p.add_argument("--load-cpu", type=int, default=0, help="core for wrk, k6 and the upstream (default 0)")
    p.add_argument("--proxy-cpu", type=int, default=1, help="core for the proxy under test (default 1)")
    p.add_argument("--latency-unpinned", action="store_true",
                   help="do not pin the proxy during the latency test (default: pinned as in test 1)")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs of the started processes")
    args = p.parse_args(argv)
    defaults = PROFILES["quick" if args.quick else "default"]
    names = ("duration", "warmup", "rounds", "latency_duration", "latency_warmup",
             "extra_duration", "extra_rounds", "extra_latency_duration", "model_duration")
    for name, value in zip(names, defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    wanted = [name for name in args.paths.split(",") if name]
    if not wanted or any(name not in PATHS for name in wanted):
        p.error(f"--paths takes names from: {', '.join(PATHS)}")
    args.paths = [name for name in PATHS if name in wanted]  # always the canonical order
    return args


def settings_of(args: argparse.Namespace) -> dict:
    return {"paths": args.paths, "duration_s": args.duration, "warmup_s": args.warmup,
            "rounds": args.rounds, "connections": args.connections,
            "latency_duration_s": args.latency_duration, "latency_warmup_s": args.latency_warmup,
            "rate": args.rate, "load_cpu": args.load_cpu, "proxy_cpu": args.proxy_cpu,
            "latency_proxy_pinned": not args.latency_unpinned,
            "body_bytes": load.BODY_BYTES, "big_body_bytes": args.big_body_bytes,
            "fast_rate": args.fast_rate, "fast_vus": args.fast_vus,
            "extra_duration_s": args.extra_duration, "extra_rounds": args.extra_rounds,
            "extra_latency_duration_s": args.extra_latency_duration,
            "model_duration_s": args.model_duration, "workers": not args.no_workers,
            "model_aware": not args.no_model_aware, "model_rounds": MODEL_ROUNDS,
            "latency_rounds": LATENCY_ROUNDS,
            "grpc": grpc_settings(args).__dict__ if not args.no_grpc else None}


@contextmanager
def running(name: str, env: Env, body: bytes):
    """Start path `name`, check one request end to end, yield (proc or None, url), stop it."""
    proc, url = {**PATHS, **WORKER_PATHS}[name](env)
    try:
        status, answer = http_status(url, body, timeout=5.0)
        if status != 200 or answer != UPSTREAM_RESPONSE.encode():
            raise InvalidPath(f"check request answered {status}: {answer[:200]!r}")
        yield proc, url
    finally:
        if proc is not None:
            proc.stop()


def throughput_run(name: str, env: Env, body: bytes, body_path: Path, args,
                   duration: int | None = None) -> dict:
    """Warm up, then one timed wrk run; the proxy's CPU is read from /proc before and after."""
    with running(name, env, body) as (proc, url):
        load.run_wrk(url, body_path, args.warmup, args.connections, args.load_cpu)
        meter = Meter(proc and proc.pid, args.proxy_cpu)
        wrk = load.run_wrk(url, body_path, duration or args.duration, args.connections,
                           args.load_cpu)
        check_alive(name, proc)
        used = meter.stop()
        run = {"rps": wrk.rps, "requests": wrk.requests, "seconds": wrk.seconds, "non_2xx": wrk.non_2xx,
               "socket_errors": wrk.socket_errors, "problems": wrk.problems(), **used}
        if proc is not None and wrk.requests:
            run.update(cpu_us_per_req=used["cpu_s"] / wrk.requests * 1e6,
                       core_us_per_req=used["core_busy_s"] / wrk.requests * 1e6, rss_kib=rss_kib(proc.pid))
        return run


def latency_runs(name: str, env: Env, body: bytes, cases: list, work: Path, args) -> None:
    """Start the path once; one k6 run per case (result, body file, rate, VUs, warm-up, s)."""
    if args.latency_unpinned:
        env = Env(work=env.work, upstream_port=env.upstream_port, proxy_cpu=None)
    with running(name, env, body) as (proc, url):
        for result, body_path, rate, vus, warmup, seconds in cases:
            if result.halted:
                continue
            print(f"[latency {rate}/s {body_path.stem}] {name}", file=sys.stderr, flush=True)
            run = guarded(result, _k6_run, name, proc, url, body_path, work, rate, vus, warmup,
                          seconds, args)
            if run:
                result.latency_runs.append(run)
                result.problems += [p for p in run["problems"] if p not in result.problems]


def merge_latency(group: dict[str, report.PathResult]) -> None:
    """Each path's latency from its rounds (load.merge_rounds)."""
    for r in group.values():
        if r.latency_runs:
            r.latency = load.merge_rounds(
                r.latency_runs, summed=("count", "dropped", "wall_s", "cpu_s", "core_busy_s"),
                largest=("max", "failed_rate", "proxy_core_other_pct", "proxy_core_steal_pct"))


def _k6_run(name, proc, url, body_path, work, rate, vus, warmup, seconds, args) -> dict:
    meter = Meter(proc and proc.pid, args.proxy_cpu)
    k6 = load.run_k6(url, body_path, work, f"{name}-{rate}-{body_path.stem}", rate, warmup,
                     seconds, args.load_cpu, vus=vus)
    check_alive(name, proc)
    return {**k6.us, "count": k6.count, "failed_rate": k6.failed_rate, "dropped": k6.dropped,
            "problems": k6.problems(), **meter.stop()}


def check_alive(name: str, proc) -> None:
    if proc is not None and not proc.alive():
        raise RuntimeError(f"{name} exited during the run:\n{proc.log_tail()}")


def guarded(result: report.PathResult, step, *a):
    """Run one step for a path; turn its failure into the path's record instead of aborting."""
    try:
        return step(*a)
    except InvalidPath as e:
        result.problems.append(str(e))
        result.halted = True
    except Exception as e:  # noqa: BLE001 - any failure of one path must not stop the others
        result.failed = f"{type(e).__name__}: {e}"
        result.halted = True
    return None


def throughput_rounds(results: dict[str, report.PathResult], rounds: int, env: Env,
                      body: bytes, body_path: Path, args, duration: int, label: str) -> None:
    for rnd in range(rounds):
        for name, r in results.items():
            if r.halted:
                continue
            print(f"[throughput {label} {rnd + 1}/{rounds}] {name}", file=sys.stderr, flush=True)
            run = guarded(r, throughput_run, name, env, body, body_path, args, duration)
            if run:
                r.runs.append(run)
                r.problems += run["problems"]


def big_throughput_and_latency(res: report.Results, env: Env, body: bytes, big_path: Path,
                               work: Path, args) -> None:
    """The 600 KB tests, against the upstream that reads the whole body before answering."""
    throughput_rounds(res.big, args.extra_rounds, env, body, big_path, args, args.extra_duration,
                      "600 KB")
    for name, r in res.big.items():
        if not r.halted:
            cases = [(r, big_path, args.rate, 1, 1, args.extra_latency_duration)]
            guarded(r, latency_runs, name, env, body, cases, work, args)


def grpc_settings(args) -> SimpleNamespace:
    """Test 4's h2load run and paced latency run, as long as test 1's throughput runs."""
    return SimpleNamespace(seconds=args.duration, latency_seconds=4.0 if not args.quick else 2.0,
                           clients=8, streams=32)


def grpc_test(work: Path, args) -> dict:
    """gRPC ModelInfer, direct / Envoy / meshproxy: {"paths": [...]} or {"failed": why}."""
    grpc_bench.PROXY_CPU, grpc_bench.LOAD_CPU = args.proxy_cpu, args.load_cpu
    print("[grpc] direct, envoy, meshproxy", file=sys.stderr, flush=True)
    try:
        paths, _ = grpc_bench.run(work, grpc_settings(args))
    except Exception as e:  # noqa: BLE001 - recorded, so the rest of the report is written
        return {"failed": f"{type(e).__name__}: {e}"}
    return {"paths": paths}


def measure(args, work: Path, body: bytes, body_path: Path, big_path: Path | None) -> report.Results:
    res = report.Results.empty(args.paths, big_path is not None, args.fast_rate > 0,
                               not args.no_workers)
    upstream, port = start_upstream(work, args.load_cpu)
    env = Env(work=work, upstream_port=port, proxy_cpu=args.proxy_cpu)
    try:
        throughput_rounds(res.main, args.rounds, env, body, body_path, args, args.duration, "3 KB")
        if big_path is not None:
            reading, big_port = start_upstream(work, args.load_cpu, reading=True)
            try:
                big_env = Env(work=work, upstream_port=big_port, proxy_cpu=args.proxy_cpu)
                big_throughput_and_latency(res, big_env, body, big_path, work, args)
            finally:
                reading.stop()
        unpinned = Env(work=work, upstream_port=port, proxy_cpu=None)
        throughput_rounds(res.workers, args.extra_rounds, unpinned, body, body_path, args,
                          args.extra_duration, "workers")
        # Test 2 in interleaved rounds, each path started afresh in each, so a slow stretch
        # of the machine falls on every path rather than on whichever ran then.
        def share(seconds: int) -> int:
            return max(1, round(seconds / LATENCY_ROUNDS))

        for _ in range(LATENCY_ROUNDS):
            for name, r in res.main.items():
                cases = [(r, body_path, args.rate, 1, args.latency_warmup,
                          share(args.latency_duration))]
                if name in res.fast:
                    cases.append((res.fast[name], body_path, args.fast_rate, args.fast_vus, 1,
                                  share(args.extra_latency_duration)))
                if not all(c[0].halted for c in cases):
                    guarded(r, latency_runs, name, env, body, cases, work, args)
                    for other in (c[0] for c in cases[1:]):
                        other.failed = other.failed or r.failed  # could not start: none ran
        if not args.no_model_aware:
            rates = [(args.rate, 1, 1, args.model_duration)]
            if args.fast_rate:
                rates.append((args.fast_rate, args.fast_vus, 1, args.extra_latency_duration))
            res.models = model_aware.run(env, body, body_path, rates, args.load_cpu,
                                         args.proxy_cpu, rounds=MODEL_ROUNDS)
        if not args.no_grpc:
            res.grpc = grpc_test(work, args)
    finally:
        upstream.stop()
    for group in (res.main, res.big, res.fast):
        merge_latency(group)
        report.add_latency_deltas(group)
    return res


def check_tools(args) -> None:
    found = binaries()
    envoy = "envoy" in args.paths or not args.no_model_aware  # the model-aware envoy-front
    needed = ["wrk", "k6", "nginx", "taskset"] + (["envoy"] if envoy else [])
    missing = [n for n in needed if found[n] is None]
    if not args.no_grpc:
        missing += [n for n in grpc_bench.missing_tools() if n not in missing]
    if missing:
        sys.exit(f"missing: {', '.join(missing)}; run `bash bench/setup.sh` (or `make bench`)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_tools(args)
    # A SIGTERM unwinds like Ctrl-C does, so every started process is stopped by its PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    body = load.infer_body()
    work = Path(tempfile.mkdtemp(prefix="meshproxy-bench-"))
    work.chmod(0o755)  # nginx workers run as nobody
    body_path = work / "body.json"
    body_path.write_bytes(body)
    big_path = None
    if args.big_body_bytes:
        big_path = work / "body-big.json"
        big_path.write_bytes(load.infer_body(args.big_body_bytes))
    try:
        results = measure(args, work, body, body_path, big_path)
    finally:
        if args.keep_tmp:
            print(f"configs and logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "body.json").write_bytes(body)
    print(report.write(results, report.machine_info(), settings_of(args), args.results_dir))
    for png in plots.draw(results, args.results_dir):
        print(f"plot: {png}", file=sys.stderr)
    sys.exit(0 if results.all_ok() else 1)


if __name__ == "__main__":
    main()
