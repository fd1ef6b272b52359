import pytest

from meshproxy._proto.inference import grpc_service_pb2 as pb
from meshproxy.errors import BadRequest
from meshproxy.ingress.grpc import GrpcContext, read_request


class Target:
    def __init__(self, model: str, version: str | None = None, rewrite: bool = False):
        self.model, self.version, self.rewrite = model, version, rewrite
        self.model_bytes = model.encode()


CTX = GrpcContext((b"model", b"x-model"), True, None, None, None, None, None)


def md(**pairs):
    return tuple((k.replace("_", "-"), v) for k, v in pairs.items())


def body(**fields) -> bytes:
    return pb.ModelInferRequest(id="r", **fields).SerializeToString()


def test_model_from_field_1_and_hop_by_hop_metadata_dropped():
    req = read_request(CTX, md(user_agent="x", te="trailers", x_trace="t"), body(model_name="sum"))
    assert req.model == "sum" and req.metadata == (("x-trace", "t"),)
    assert req.upstream_message(Target("sum")) is req.message  # untouched: same bytes


def test_model_from_metadata_is_written_into_field_1():
    req = read_request(CTX, md(x_model="sum"), body(model_version="2"))
    out = pb.ModelInferRequest.FromString(req.upstream_message(Target("sum")))
    assert (out.model_name, out.model_version, out.id) == ("sum", "2", "r")


def test_none_when_nothing_names_a_model():
    assert read_request(CTX, (), body()) is None
    assert read_request(CTX, (), None) is None


@pytest.mark.parametrize("metadata, message", [
    (md(model="a"), body(model_name="b")),          # metadata and field 1 disagree
    (md(model="a", x_model="b"), body()),            # two model entries disagree
    ((), body(model_name="no spaces")),              # invalid name
    (md(model="../etc"), body()),
])
def test_conflicting_or_invalid_names_are_bad_requests(metadata, message):
    with pytest.raises(BadRequest):
        read_request(CTX, metadata, message)


def test_split_rewrites_field_1_2_and_the_model_metadata():
    req = read_request(CTX, md(model="m", x_trace="t"), body(model_name="m", model_version="9"))
    target = Target("m-v2", "3", rewrite=True)
    out = pb.ModelInferRequest.FromString(req.upstream_message(target))
    assert (out.model_name, out.model_version, out.id) == ("m-v2", "3", "r")
    assert req.forwarded_metadata(target) == (("model", "m-v2"), ("x-trace", "t"))
    assert req.header_of("x-trace") == b"t" and req.header_of("nope") is None


def test_stream_messages_must_name_the_stream_model():
    req = read_request(CTX, md(model="m"), None)
    assert req.for_message(body()).upstream_message(Target("m"))  # unnamed: written in
    with pytest.raises(BadRequest, match="'other'"):
        req.for_message(body(model_name="other"))
