"""Flow control between a client connection and a runtime connection, on in-memory transports:
which side the proxy stops reading, and that it always starts reading again."""

from meshproxy.app import ProxyApp
from meshproxy.config import load_text
from meshproxy.ingress.http import HttpConnection
from meshproxy.upstream.http_pool import UpstreamConnection

CONFIG = """\
listeners: {http_address: '127.0.0.1:0', grpc_address: disabled}
static_resources:
  runtimes: [{name: rt, http_address: '127.0.0.1:9', models: [{name: m}]}]
"""
REQUEST = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


class Transport:
    """Records what a protocol did to it; `fill` makes the next write report a full buffer, as
    a real transport calls pause_writing() from inside write()."""

    def __init__(self):
        self.protocol = None
        self.written = b""
        self.reading = True
        self.fill = False
        self.closed = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data) -> None:
        self.written += data
        if self.fill:
            self.fill = False
            self.protocol.pause_writing()

    def writelines(self, parts) -> None:
        self.write(b"".join(parts))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    abort = close


def connected():
    app = ProxyApp(load_text(CONFIG))
    pool = app.registry.endpoints["rt"].pool
    up = UpstreamConnection(pool)
    up_t = Transport()
    up.connection_made(up_t)
    up_t.protocol = up
    pool.release(up)
    client = HttpConnection(app.ctx)
    client_t = Transport()
    client.connection_made(client_t)
    client_t.protocol = client
    return client, client_t, up, up_t, pool


def test_a_runtime_connection_goes_back_to_the_pool_reading_when_the_client_filled_up_on_its_last_bytes():
    client, client_t, up, up_t, pool = connected()
    client.data_received(REQUEST)
    client_t.fill = True  # relaying this answer fills the client's side
    up.data_received(RESPONSE)
    assert client_t.written.endswith(b"hello")
    assert up_t.reading and pool.idle == [up]  # not left paused for whoever takes it next
    # The client is still full: the next answer's runtime connection is held back at once,
    # and let go when the client has room.
    client.data_received(REQUEST)
    up.data_received(RESPONSE[:-3])  # the head and part of the body
    assert not up_t.reading
    client.resume_writing()
    assert up_t.reading


def test_a_full_runtime_connection_holds_back_the_client_until_it_drains_or_the_try_ends():
    client, client_t, up, up_t, pool = connected()
    client.data_received(REQUEST[:-2])  # the head; the body is still coming
    up.pause_writing()
    assert not client_t.reading
    client.resume_client()  # a pipelined request's turn coming would not override it
    assert not client_t.reading
    up.resume_writing()
    assert client_t.reading
    up.pause_writing()
    up.data_received(RESPONSE)  # the runtime answers before the body's end: the try is over
    assert client_t.reading  # the rest of the body is read (and dropped)
