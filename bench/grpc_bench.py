"""gRPC ModelInfer through meshproxy beside the direct path and beside Envoy, 3 KB requests.

    .venv/bin/python bench/grpc_bench.py [--seconds 8] [--profile] [--out bench/results/grpc.md]

`make bench` (bench/run.py) runs the same measurement as its test 4 (`run()`), into
latest.md and latest.json; this command runs it alone, with the py-spy profile if asked.

The proxy under test (meshproxy or Envoy, --concurrency 1) is pinned to core 1; the load
generator (h2load, C), the upstream and this script share core 0. The upstream is a grpc.aio
generic handler answering every ModelInfer with the same 3 KB ModelInferResponse, so it costs
little and never decodes. Per path: h2load for --seconds at full speed (CPU per request of the
proxy process from /proc, requests/s), then a Python grpc.aio client at 100 requests/s for the
latency percentiles (added p50 = path p50 - direct p50). h2load counts any HTTP 200 as a
success even when grpc-status says otherwise, so every run is checked against the upstream's
own count of calls it answered (and meshproxy's OK counter). --profile adds a py-spy sample of
the meshproxy process under load and prints where its time goes. Every process is started and
stopped by PID (bench/procs.py); the whole run takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import ROOT, Meter, Proc, binaries, free_port, wait_until  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
COUNT_METHOD = "/bench.Upstream/Count"
PROXY_CPU, LOAD_CPU = 1, 0


# -- the upstream (runs as `grpc_bench.py --upstream PORT` in its own process) -----------------

def request_bytes() -> bytes:
    """A ModelInferRequest for model `bench` carrying one FP32 tensor of 768 values (3 KB)."""
    from meshproxy._proto.inference import grpc_service_pb2 as pb
    msg = pb.ModelInferRequest(model_name="bench", id="bench")
    msg.inputs.add(name="input0", datatype="FP32", shape=[1, 768])
    msg.raw_input_contents.append(bytes(range(256)) * 12)
    return msg.SerializeToString()


def response_bytes() -> bytes:
    from meshproxy._proto.inference import grpc_service_pb2 as pb
    msg = pb.ModelInferResponse(model_name="bench", model_version="1", id="bench")
    msg.outputs.add(name="output0", datatype="FP32", shape=[1, 768])
    msg.raw_output_contents.append(bytes(range(256)) * 12)
    return msg.SerializeToString()


async def serve_upstream(port: int) -> None:
    import grpc
    answer, served = response_bytes(), [0]

    async def infer(request: bytes, context) -> bytes:
        served[0] += 1
        return answer

    async def count(request: bytes, context) -> bytes:
        return str(served[0]).encode()

    handlers = {METHOD: grpc.unary_unary_rpc_method_handler(infer),
                COUNT_METHOD: grpc.unary_unary_rpc_method_handler(count)}

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return handlers.get(details.method)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((Handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"upstream ready on {port}", flush=True)
    await server.wait_for_termination()


# -- the paths --------------------------------------------------------------------------------

ENVOY_YAML = """\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: grpc
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: grpc
          codec_type: HTTP2
          generate_request_id: false
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/", grpc: {{}}}}
                route: {{cluster: runtime, timeout: 60s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true
  clusters:
  - name: runtime
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: runtime
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}
"""

MESHPROXY_YAML = """\
listeners: {{http_address: '127.0.0.1:{http}', grpc_address: '127.0.0.1:{port}'}}
admin: {{address: '127.0.0.1:{admin}'}}
static_resources:
  runtimes:
    - name: runtime
      http_address: 127.0.0.1:{http}
      grpc_address: 127.0.0.1:{upstream}
      models: [{{name: bench}}]
"""


def grpc_ready(port: int) -> bool:
    import grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            grpc.channel_ready_future(ch).result(timeout=0.5)
            return True
        except grpc.FutureTimeoutError:
            return False


def start_envoy(work: Path, upstream: int) -> tuple[Proc, int]:
    port, admin = free_port(), free_port()
    conf = work / "envoy-grpc.yaml"
    conf.write_text(ENVOY_YAML.format(port=port, admin=admin, upstream=upstream))
    proc = Proc("envoy-grpc", [str(binaries()["envoy"]), "-c", str(conf), "--concurrency", "1",
                               "--disable-hot-restart", "--log-level", "warning"], work, PROXY_CPU)
    wait_until(lambda: grpc_ready(port), 20, "envoy", proc.alive)
    return proc, port


def start_meshproxy(work: Path, upstream: int) -> tuple[Proc, int]:
    port, admin, http = free_port(), free_port(), free_port()
    conf = work / "meshproxy-grpc.yaml"
    conf.write_text(MESHPROXY_YAML.format(port=port, admin=admin, http=http, upstream=upstream))
    proc = Proc("meshproxy-grpc", [str(binaries()["meshproxy"]), "proxy", "-c", str(conf),
                                   "--workers", "1"], work,
                PROXY_CPU)
    wait_until(lambda: grpc_ready(port), 20, "meshproxy", proc.alive)
    proc.admin = admin
    return proc, port


# -- load and measurement ---------------------------------------------------------------------

def upstream_count(port: int) -> int:
    import grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return int(ch.unary_unary(COUNT_METHOD)(b"", timeout=5))


def h2load(port: int, body: Path, seconds: int, clients: int, streams: int) -> dict:
    argv = ["taskset", "-c", str(LOAD_CPU), "h2load", "-c", str(clients), "-m", str(streams),
            "-D", str(seconds), "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-d", str(body), f"http://127.0.0.1:{port}{METHOD}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed",
                  out)
    if m is None:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    return {"done": int(m.group(2)), "succeeded": int(m.group(3)), "failed": int(m.group(4))}


async def paced_latencies(port: int, message: bytes, rate: int, seconds: float) -> list[float]:
    """Latency of each call sent at a fixed rate (a call that fails raises)."""
    import grpc
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(METHOD)
        for _ in range(20):
            await call(message, timeout=5)
        loop = asyncio.get_running_loop()
        out: list[float] = []

        async def one():
            t0 = time.perf_counter()
            await call(message, timeout=5)
            out.append(time.perf_counter() - t0)

        start, tasks = loop.time(), []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        return out


def meshproxy_ok(admin: int) -> float:
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("meshproxy_requests_total{") and 'protocol="grpc"' in line
               and 'code="OK"' in line)


def measure(name: str, proc: Proc | None, port: int, upstream: int, body: Path, message: bytes,
            args) -> dict:
    h2load(port, body, 1, args.clients, args.streams)  # warm-up: connections, caches
    # Latency on a warm but quiet proxy, then throughput.
    lat = asyncio.run(paced_latencies(port, message, 100, args.latency_seconds))
    before = upstream_count(upstream)
    ok_before = meshproxy_ok(proc.admin) if name == "meshproxy" else 0
    meter = Meter(proc.pid if proc else None, PROXY_CPU)
    load = h2load(port, body, args.seconds, args.clients, args.streams)
    used = meter.stop()
    served = upstream_count(upstream) - before
    result = {"path": name, "requests": load["succeeded"], "rps": load["succeeded"] / used["wall_s"],
              "h2load_failed": load["failed"], "upstream_served": served,
              "us_per_request": used["cpu_s"] / max(load["succeeded"], 1) * 1e6 if proc else None,
              "core_other_pct": used["proxy_core_other_pct"]}
    if name == "meshproxy":
        result["proxy_ok"] = meshproxy_ok(proc.admin) - ok_before
    # grpc-status is in trailers h2load does not read: the upstream's count must agree.
    result["status_checked"] = abs(served - load["succeeded"]) <= args.clients * args.streams
    q = statistics.quantiles(lat, n=100)
    result.update(p50_ms=statistics.median(lat) * 1e3, p99_ms=q[98] * 1e3)
    return result


def profile(proc: Proc, port: int, body: Path, args, work: Path) -> str:
    """Sample meshproxy under load with py-spy; the functions that hold the most samples."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return "py-spy not installed (pip install py-spy)"
    out = work / "pyspy.txt"
    rec = subprocess.Popen(["taskset", "-c", str(LOAD_CPU), spy, "record", "-p", str(proc.pid),
                            "-d", "6", "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        h2load(port, body, 6, args.clients, args.streams)
        rec.wait(30)
    finally:
        if rec.poll() is None:
            rec.kill()
    return summarize_profile(out)


def summarize_profile(path: Path) -> str:
    """Self time by layer (from each sample's innermost frame) and the top functions."""
    layers: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n, frame = int(n), stack.split(";")[-1]
        total += n
        name, _, where = frame.partition(" (")
        leaf[name] += n
        if name == "Thread.run":
            layers["grpc poller thread (C, outside the loop)"] += n
        elif name == "Runner.run" or where.startswith(("asyncio/", "uvloop/")):
            layers["event loop: uvloop + grpc cython/C-core callbacks"] += n
        elif where.startswith("meshproxy/"):
            layers["meshproxy frames (with the grpc cython calls they make)"] += n
        elif where.startswith("grpc/"):
            layers["grpc.aio Python layer"] += n
        else:
            layers["other"] += n
    if not total:
        return "py-spy recorded nothing"
    return "\n".join([
        f"py-spy, {total} samples of the meshproxy process under load (busy samples only)",
        "self time by layer: " + "; ".join(f"{k} {v / total:.0%}" for k, v in layers.most_common()),
        "top functions (self): " + "; ".join(f"{f} {v / total:.0%}" for f, v in leaf.most_common(6)),
    ])


def table(results: list[dict]) -> list[str]:
    """The markdown table of one run, and meshproxy against Envoy."""
    by = {r["path"]: r for r in results}
    lines = ["| path | requests/s | CPU us/request (proxy) | p50 ms | p99 ms | added p50 ms | "
             "grpc-status checked |", "|---|---|---|---|---|---|---|"]
    direct = by.get("direct")
    for r in results:
        added = r["p50_ms"] - direct["p50_ms"] if direct else float("nan")
        us = f"{r['us_per_request']:.0f}" if r["us_per_request"] is not None else "-"
        lines.append(f"| {r['path']} | {r['rps']:,.0f} | {us} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {added:+.2f} | "
                     f"{'yes' if r['status_checked'] else 'NO'} ({r['upstream_served']} served"
                     + (f", {r['proxy_ok']:.0f} OK counted" if "proxy_ok" in r else "") + ") |")
    if "envoy" in by and "meshproxy" in by:
        m, e = by["meshproxy"], by["envoy"]
        lines += ["", f"meshproxy / Envoy CPU per request: {m['us_per_request'] / e['us_per_request']:.2f}x; "
                  f"capacity on one core (1e6 / us per request): meshproxy "
                  f"{1e6 / m['us_per_request']:,.0f}/s, Envoy {1e6 / e['us_per_request']:,.0f}/s; "
                  f"added p50 meshproxy - Envoy: {m['p50_ms'] - e['p50_ms']:+.2f} ms."]
    return lines


def settings_line(args) -> str:
    return (f"h2load -c {args.clients} -m {args.streams} for {args.seconds} s on core "
            f"{LOAD_CPU} with the upstream; proxy pinned to core {PROXY_CPU}; latency from a "
            f"grpc.aio client at 100 requests/s for {args.latency_seconds:g} s.")


def report(results: list[dict], prof: str, args) -> str:
    lines = ["# gRPC ModelInfer, 3 KB request and response, proxy on one core", "",
             f"`.venv/bin/python bench/grpc_bench.py --seconds {args.seconds}`: "
             + settings_line(args), "", *table(results)]
    if prof:
        lines += ["", "```", prof, "```"]
    return "\n".join(lines) + "\n"


def missing_tools() -> list[str]:
    """What this measurement needs and the machine lacks."""
    found = binaries()
    return [n for n in ("h2load", "taskset", "envoy", "meshproxy") if found[n] is None]


def run(work: Path, args, prof: bool = False) -> tuple[list[dict], str]:
    """Measure direct, Envoy and meshproxy in turn: ([one result per path], py-spy summary).
    This process is pinned to the load core meanwhile (its grpc.aio client makes the paced
    calls), and every process it starts is stopped by its PID before it returns."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {LOAD_CPU})
    message = request_bytes()
    body = work / "request.grpc"
    body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    upstream_port = free_port()
    procs: list[Proc] = []
    results, summary = [], ""
    try:
        upstream = Proc("grpc-upstream", [sys.executable, __file__, "--upstream",
                                          str(upstream_port)], work, LOAD_CPU)
        procs.append(upstream)
        wait_until(lambda: grpc_ready(upstream_port), 20, "upstream", upstream.alive)
        results.append(measure("direct", None, upstream_port, upstream_port, body, message, args))
        for name, start in (("envoy", start_envoy), ("meshproxy", start_meshproxy)):
            proc, port = start(work, upstream_port)
            procs.append(proc)
            results.append(measure(name, proc, port, upstream_port, body, message, args))
            if name == "meshproxy" and prof:
                summary = profile(proc, port, body, args, work)
            proc.stop()
    finally:
        for p in reversed(procs):
            p.stop()
        os.sched_setaffinity(0, affinity)
    return results, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--latency-seconds", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--streams", type=int, default=32, help="concurrent calls per connection")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "grpc.md"))
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import uvloop
    if args.upstream:
        uvloop.run(serve_upstream(args.upstream))
        return
    missing = missing_tools()
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (bash bench/setup.sh installs them)")
    work = Path(tempfile.mkdtemp(prefix="grpc-bench-"))
    results, prof = run(work, args, args.profile)
    text = report(results, prof, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"logs in {work}")


if __name__ == "__main__":
    main()
