"""The REST hot path in one process, no sockets: Python time per proxied request.

Drives the real HttpConnection, Exchange and UpstreamConnection with in-memory transports:
each round feeds one wrk-like request (3 KB JSON body) to the client side, checks the bytes
that reached the upstream transport, feeds the runtime's answer back and checks what the
client got. What it measures is the proxy's own Python and llhttp work per request, without
the event loop and the kernel; `make bench` measures the whole. Use it (with py-spy or
cProfile: `--profile`) before and after a change to the hot path.

`--cold` measures what a request costs when the proxy's memory is not in the CPU caches, as at
100 requests/s on these VMs, where 10 ms of idle leaves the caches as cold as a full eviction
does: before each client read and each runtime read it writes a 64 MiB buffer (evicting every
cache level), then copies the bytes to be read into a fresh buffer (as recv does, so the input
itself is warm), and times the read. It reports the medians of the request side (client read
to upstream write) and of the response side (runtime read to client write, with the
bookkeeping after it). Warm, the cost is instructions; cold, it is the distinct cache lines of
code and data a request touches.

    .venv/bin/python bench/hotpath.py [--requests 200000] [--repeat 5] [--vary | --models N]
                                      [--profile | --cold]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load  # noqa: E402
from paths import UPSTREAM_RESPONSE  # noqa: E402

from meshproxy.app import ProxyApp  # noqa: E402
from meshproxy.config import load_text  # noqa: E402
from meshproxy.ingress.http import HttpConnection  # noqa: E402
from meshproxy.upstream.http_pool import UpstreamConnection  # noqa: E402

CONFIG = """\
listeners: {http_address: '127.0.0.1:0', grpc_address: disabled}
static_resources:
  runtimes:
    - name: upstream
      http_address: 127.0.0.1:9
      models: [{name: bench}%s]
"""


class MemoryTransport:
    """Just enough of asyncio.Transport: counts writes and keeps the last one (a growing list
    of them would add page faults the real transport does not have)."""

    def __init__(self, peer=("127.0.0.1", 40000)):
        self.writes = 0
        self.last: bytes | tuple = b""
        self.peer = peer
        self.closed = False

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default

    def write(self, data) -> None:
        self.writes += 1
        self.last = data

    def writelines(self, parts) -> None:
        self.writes += 1
        self.last = tuple(parts)  # the caller reuses the list

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading


def request_bytes(body: bytes, model: str = "bench") -> bytes:
    """A request as wrk sends it (bench/wrk_post.lua)."""
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n" % model.encode() +
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def response_bytes() -> bytes:
    """What the nginx upstream answers."""
    body = UPSTREAM_RESPONSE.encode()
    return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 05:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: keep-alive\r\n\r\n" % len(body) + body)


def setup(models: int = 1):
    app = ProxyApp(load_text(CONFIG % "".join(f", {{name: m{i}}}" for i in range(1, models))))
    endpoint = app.registry.endpoints["upstream"]
    up = UpstreamConnection(endpoint.pool)
    up.connection_made(MemoryTransport())
    endpoint.pool.release(up)
    client = HttpConnection(app.ctx)
    client.connection_made(MemoryTransport())
    return client, up


def run(n: int, client, up, reqs: list[bytes], resp: bytes) -> float:
    """Seconds per request over `n` requests, sent in turn from `reqs`."""
    c_out, u_out = client.transport, up.transport
    c_out.writes = u_out.writes = 0
    feed_client, feed_up = client.data_received, up.data_received
    t0 = time.perf_counter()
    for i in range(n):
        feed_client(reqs[i % len(reqs)])
        feed_up(resp)
    elapsed = time.perf_counter() - t0
    last = c_out.last
    answer = last if isinstance(last, bytes) else b"".join(last)
    if c_out.writes != n or u_out.writes != n or not answer.startswith(b"HTTP/1.1 200 OK"):
        raise SystemExit(f"hot path broken: {c_out.writes} answers, {u_out.writes} upstream "
                         f"writes; last answer {answer[:200]!r}")
    return elapsed / n


def run_cold(n: int, client, up, reqs: list[bytes], resp: bytes) -> tuple[float, float]:
    """Median seconds of the request side and of the response side, each read made with the
    CPU caches evicted (see the module docstring)."""
    junk = bytearray(64 << 20)
    ones = b"\1" * len(junk[::64])
    feed_client, feed_up = client.data_received, up.data_received
    request_side, response_side = [], []
    for i in range(n):
        for feed, data, times in ((feed_client, reqs[i % len(reqs)], request_side),
                                  (feed_up, resp, response_side)):
            junk[::64] = ones  # one write per cache line of 64 MiB
            fresh = bytes(bytearray(data))
            t0 = time.perf_counter()
            feed(fresh)
            times.append(time.perf_counter() - t0)
    return statistics.median(request_side), statistics.median(response_side)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile one run, print the top 25")
    p.add_argument("--cold", action="store_true",
                   help="evict the CPU caches before each read (see above); --requests default 400")
    p.add_argument("--vary", action="store_true",
                   help="alternate two request heads (Content-Length 3000 and 3001), so no "
                        "request repeats the head before it")
    p.add_argument("--models", type=int, default=1,
                   help="send to N models in turn (/v2/models/{name}/infer), as a client "
                        "calling several models on one connection does")
    args = p.parse_args()
    client, up = setup(args.models)
    req = [request_bytes(load.infer_body(), "bench" if i == 0 else f"m{i}")
           for i in range(args.models)]
    if args.vary:
        req.append(request_bytes(load.infer_body() + b" "))
    resp = response_bytes()
    run(2000, client, up, req, resp)  # warm-up; also checks the path end to end
    if args.cold:
        rounds = [run_cold(args.requests or 400, client, up, req, resp) for _ in range(args.repeat)]
        request_side = statistics.median(r[0] for r in rounds) * 1e6
        response_side = statistics.median(r[1] for r in rounds) * 1e6
        run(100, client, up, req, resp)  # the path still answers end to end
        print(f"cold: request side {request_side:.1f} us, response side {response_side:.1f} us, "
              f"sum {request_side + response_side:.1f} us (median of {args.repeat} rounds of "
              f"{args.requests or 400})")
        return
    args.requests = args.requests or 200_000
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(args.requests, client, up, req, resp)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    per = [run(args.requests, client, up, req, resp) for _ in range(args.repeat)]
    print(f"hot path: median {statistics.median(per) * 1e6:.2f} us/request "
          f"(min {min(per) * 1e6:.2f}, max {max(per) * 1e6:.2f}; {args.repeat} x {args.requests})")


if __name__ == "__main__":
    main()
