"""What telemetry costs the REST hot path: CPU per request with tracing off, on at 1% and at
100%, and with the access log on, in one run (same upstream, same requests, interleaved).

Usage: .venv/bin/python bench/telemetry_bench.py [--seconds 6] [--rounds 3]
Tracing exports over OTLP/gRPC to a receiver started here that drops what it gets, so the
export work (BatchSpanProcessor thread, protobuf encoding, gRPC) is counted in the proxy.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import load
from paths import Env, INFER_PATH, start_upstream
from procs import Meter, Proc, binaries, free_port, wait_until, http_status

RECEIVER = """
import asyncio, grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb, trace_service_pb2_grpc as g
class R(g.TraceServiceServicer):
    async def Export(self, request, context):
        return pb.ExportTraceServiceResponse()
async def main():
    s = grpc.aio.server(); g.add_TraceServiceServicer_to_server(R(), s)
    s.add_insecure_port("127.0.0.1:{port}"); await s.start(); await s.wait_for_termination()
asyncio.run(main())
"""

VARIANTS = {
    "off": "",
    "access log": "telemetry: {{access_log: {{path: '{work}/access.log'}}}}\n",
    "tracing 1%": "telemetry: {{tracing: {{exporter: OTLP_GRPC, endpoint: '127.0.0.1:{otlp}', "
                  "sampling_ratio: 0.01}}}}\n",
    "tracing 100%": "telemetry: {{tracing: {{exporter: OTLP_GRPC, endpoint: '127.0.0.1:{otlp}', "
                    "sampling_ratio: 1.0}}}}\n",
}


def start_proxy(env: Env, name: str, extra: str) -> tuple[Proc, str]:
    port, admin = free_port(), free_port()
    conf = env.work / f"{name.replace(' ', '_').replace('%', 'pct')}.yaml"
    conf.write_text(textwrap.dedent(f"""\
        listeners: {{http_address: '127.0.0.1:{port}', grpc_address: disabled}}
        admin: {{address: '127.0.0.1:{admin}'}}
        static_resources:
          runtimes:
            - name: upstream
              http_address: 127.0.0.1:{env.upstream_port}
              models: [{{name: bench}}]
        """) + extra)
    argv = [str(binaries()["meshproxy"]), "proxy", "-c", str(conf)]
    if "--workers" in subprocess.run(argv[:2] + ["--help"], capture_output=True, text=True).stdout:
        argv += ["--workers", "1"]  # one process: CPU per request of one event loop
    proc = Proc(f"meshproxy-{conf.stem}", argv, env.work, env.proxy_cpu)
    wait_until(lambda: http_status(f"http://127.0.0.1:{admin}/ready")[0] == 200, 20,
               "meshproxy ready", proc.alive)
    return proc, f"http://127.0.0.1:{port}{INFER_PATH}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="meshproxy-telemetry-bench-"))
    body = work / "body.json"
    body.write_bytes(load.infer_body())
    otlp = free_port()
    receiver = Proc("otlp-receiver", [sys.executable, "-c", RECEIVER.format(port=otlp)], work, 0)
    upstream, port = start_upstream(work, 0)
    env = Env(work, port, 1)
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for rnd in range(args.rounds):
            for name, extra in VARIANTS.items():
                print(f"[round {rnd + 1}/{args.rounds}] {name}", flush=True)
                proc, url = start_proxy(env, name, extra.format(work=work, otlp=otlp))
                try:
                    load.run_wrk(url, body, 2, 32, 0)
                    meter = Meter(proc.pid, 1)
                    res = load.run_wrk(url, body, args.seconds, 32, 0)
                    used = meter.stop()
                    if res.problems():
                        raise RuntimeError(f"{name}: {res.problems()}")
                    results[name].append(used["cpu_s"] / res.requests * 1e6)
                finally:
                    proc.stop()
    finally:
        upstream.stop()
        receiver.stop()
    base = statistics.median(results["off"])
    lines = ["| telemetry | CPU us/request (median of %d) | runs | vs off |" % args.rounds,
             "|---|---|---|---|"]
    for name, runs in results.items():
        med = statistics.median(runs)
        lines.append(f"| {name} | {med:.1f} | {', '.join(f'{r:.1f}' for r in runs)} | "
                     f"{med / base:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(__file__).parent / "results" / "telemetry.md"
    out.write_text("# Telemetry cost on the REST hot path\n\nwrk -t1 -c32, 3 KB body, proxy "
                   f"pinned to cpu 1, {args.seconds} s per run, interleaved rounds.\n\n"
                   + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
