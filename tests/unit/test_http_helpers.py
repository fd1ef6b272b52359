from meshproxy.errors import NoHealthyUpstream, render_http
from meshproxy.ingress.headers import rewrite_path, strip_hop_by_hop
from meshproxy.routing.table import Target


def test_response_hop_by_hop_headers_and_the_ones_connection_names_are_dropped():
    head = (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
            b"X-Secret: 1\r\nTransfer-Encoding: chunked\r\nContent-Type: a/b\r\n\r\n")
    assert strip_hop_by_hop(head) == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: a/b\r\n\r\n")


def test_a_lone_keep_alive_line_is_cut_and_the_rest_kept_byte_for_byte():
    head = b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n"
    assert strip_hop_by_hop(head) == b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n\r\n"
    last = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    assert strip_hop_by_hop(last) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_rewrite_points_the_path_at_the_split_target():
    t = Target("mnist-v2", None, 1, None, 1.0, True)
    assert rewrite_path(b"/v2/models/mnist/infer", "mnist", t) == b"/v2/models/mnist-v2/infer"
    assert rewrite_path(b"/v2/models/mnist/versions/1/infer?q", "mnist", t) == \
        b"/v2/models/mnist-v2/infer?q"
    t2 = Target("mnist", "2", 1, None, 1.0, True)
    assert rewrite_path(b"/v2/models/m/ready", "m", t2) == b"/v2/models/mnist/versions/2/ready"
    # a name quoted in the path (tritonclient: iris:c -> iris%3Ac) is rewritten too
    assert rewrite_path(b"/v2/models/iris%3Ac/infer", "iris:c", t) == b"/v2/models/mnist-v2/infer"
    assert rewrite_path(b"/v2/models/other/infer", "iris:c", t) == b"/v2/models/other/infer"


def test_error_response_is_v2_json_naming_the_model():
    raw = render_http(NoHealthyUpstream("model 'x' has no healthy runtime", "x"), keep_alive=True)
    head, body = raw.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" not in head
    assert body == b'{"error": "model \'x\' has no healthy runtime"}'
    assert b"content-length: %d" % len(body) in head
