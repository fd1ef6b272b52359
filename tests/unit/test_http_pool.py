"""The pool of runtime connections: newest first out, none reused once idle for the timeout
(a runtime closes its own idle connections after its keep-alive timeout, uvicorn's after 5 s,
and a request sent on one as that close is on its way fails)."""

import time

from meshproxy.upstream.http_pool import HttpPool, UpstreamConnection
from tests.unit.test_backpressure import Transport


def pool_with(*idle_for: float) -> tuple[HttpPool, list[UpstreamConnection]]:
    """A pool with an idle_timeout of 4 s holding connections idle for `idle_for` seconds,
    released oldest first."""
    pool = HttpPool("rt", "127.0.0.1", 9, 5.0, 64, idle_timeout=4.0)
    conns = []
    for seconds in idle_for:
        conn = UpstreamConnection(pool)
        conn.connection_made(Transport())
        pool.release(conn)
        conn.idle_since = time.monotonic() - seconds
        conns.append(conn)
    return pool, conns


def test_the_newest_connection_is_reused_first_while_idle_less_than_the_timeout():
    pool, (older, newer) = pool_with(3.0, 1.0)
    assert pool.acquire() is newer and pool.acquire() is older and pool.acquire() is None
    assert not older.transport.closed and not newer.transport.closed


def test_a_connection_idle_for_the_timeout_is_closed_not_handed_out():
    pool, (stale, fresh) = pool_with(10.0, 1.0)
    pool.sweep(time.monotonic())  # the ticker's sweep, once a second
    assert pool.idle == [fresh] and stale.transport.closed and not fresh.transport.closed
    assert pool.open == 1  # at once: a closing connection does not hold a connection limit
    # Past the timeout before the next sweep: a request opens a new connection instead.
    fresh.idle_since -= 5.0
    assert pool.acquire() is None and fresh.transport.closed and pool.idle == []
    assert pool.open == 0
    fresh.connection_lost(None)  # as the transport reports it later: not counted twice
    assert pool.open == 0


def test_idle_time_counts_from_the_last_release():
    pool, (conn,) = pool_with(3.9)
    assert pool.acquire() is conn
    pool.release(conn)  # used again: idle from now, not from the first release
    assert time.monotonic() - conn.idle_since < 1.0 and pool.acquire() is conn


class Queued(Transport):
    """A transport with request bytes still queued (the runtime stopped reading them)."""

    aborted = False

    def get_write_buffer_size(self) -> int:
        return 100

    def abort(self) -> None:
        self.aborted = self.closed = True


def test_a_connection_closed_with_bytes_still_queued_is_dropped_not_left_to_linger_uncounted():
    pool = HttpPool("rt", "127.0.0.1", 9, 5.0, 64, idle_timeout=4.0)
    conn = UpstreamConnection(pool)
    conn.connection_made(Queued())
    conn.close()  # a graceful close would wait for a runtime that may never read them
    assert conn.transport.aborted and pool.open == 0


def test_the_end_of_a_chunked_body_is_found_wherever_the_reads_split_it():
    from meshproxy.upstream.http_pool import _ChunkScan
    body = b"5;ext=1\r\n01234\r\n1a\r\n" + b"z" * 26 + b"\r\n0\r\nx-trailer: a\r\n\r\n"
    data = body + b"HTTP/1.1 200 OK\r\n\r\n"
    for cut in range(1, len(data)):
        scan = _ChunkScan()
        first = scan.feed(data[:cut])
        if cut >= len(body):
            assert first == len(body), cut
        else:
            assert first == -1 and scan.feed(data[cut:]) == len(body) - cut, cut
