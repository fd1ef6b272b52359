"""The access log: one JSON line per request, formatted and written by a thread of its own.

The event loop only puts a tuple on a queue; the writer thread turns tuples
into JSON lines and writes them in batches, so a slow disk never stalls
request handling.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time

FIELDS = ("start_time", "protocol", "method", "path", "model", "target", "status", "runtime",
          "attempts", "duration_ms", "upstream_duration_ms", "bytes_in", "bytes_out", "trace_id")


class AccessLog:
    def __init__(self, path: str):
        self.path = path
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._out = sys.stdout if path == "-" else open(path, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def record(self, ex, protocol: str) -> None:
        """Queue the finished exchange's line (called once per request, on the event loop)."""
        now = time.perf_counter()
        span = ex.span
        trace_id = span.get_span_context().trace_id if span is not None else 0
        self._queue.put((time.time(), now - ex.t0, now - ex.t_sent if ex.t_sent else None,
                         protocol, ex.method, ex.url, ex.model,
                         ex.target.model if ex.target is not None else None, ex.status,
                         ex.endpoint.name if ex.endpoint is not None else None,
                         ex.tries + 1 if ex.target is not None else 0, ex.body_bytes,
                         ex.bytes_out, trace_id))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            self._out.write("".join(_line(r) for r in batch if r is not None))
            self._out.flush()
            if stop:
                return

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        if self._out is not sys.stdout:
            self._out.close()


_str = json.encoder.encode_basestring  # the C string escaper behind json.dumps


def _opt(value) -> str:
    return "null" if value is None else _str(value)


def _ms(seconds) -> str:
    return "null" if seconds is None else f"{seconds * 1000:.3f}"


def _line(r) -> str:
    """One JSON object per line, formatted by hand (json.dumps of a dict costs several times more)."""
    (wall, duration, upstream, protocol, method, path, model, target, status, runtime,
     attempts, bytes_in, bytes_out, trace_id) = r
    start = wall - duration
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)) + f".{int(start % 1 * 1000):03d}Z"
    path = path.decode("latin-1") if isinstance(path, bytes) else path
    return (f'{{"start_time":"{stamp}","protocol":"{protocol}",'
            f'"method":{_str(method.decode("latin-1"))},"path":{_str(path)},'
            f'"model":{_opt(model or None)},"target":{_opt(target)},'
            f'"status":{status if isinstance(status, int) else _str(status)},'
            f'"runtime":{_opt(runtime)},"attempts":{attempts},"duration_ms":{_ms(duration)},'
            f'"upstream_duration_ms":{_ms(upstream)},"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
            f'"trace_id":{_opt(f"{trace_id:032x}") if trace_id else "null"}}}\n')
