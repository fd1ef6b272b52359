import random

import pytest
from google.protobuf.message import DecodeError

from meshproxy import grpc_wire
from meshproxy._proto.inference import grpc_service_pb2 as pb
from meshproxy.errors import BadRequest


def infer_request(**fields) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(**fields)
    t = msg.inputs.add(name="input0", datatype="FP32", shape=[2])
    t.contents.fp32_contents.extend([1.0, 2.0])
    msg.raw_input_contents.append(b"\x00" * 300)  # a length above 127: a two-byte varint
    msg.parameters["k"].int64_param = 7
    return msg


def test_scan_reads_name_and_version_at_the_front():
    data = infer_request(model_name="resnet", model_version="3", id="x").SerializeToString()
    name, version, front = grpc_wire.scan(data)
    assert (name, version) == (b"resnet", b"3")
    assert front == len(b"\x0a\x06resnet\x12\x013")


def test_scan_without_fields_1_and_2():
    data = infer_request(id="only-id").SerializeToString()
    assert grpc_wire.scan(data) == (None, None, 0)
    assert grpc_wire.scan(b"") == (None, None, 0)


def test_last_field_1_wins_and_marks_the_message_scattered():
    data = pb.ModelReadyRequest(name="a").SerializeToString() + \
        pb.ModelReadyRequest(name="b").SerializeToString()
    assert pb.ModelReadyRequest.FromString(data).name == "b"
    name, _, front = grpc_wire.scan(data)
    assert name == b"b" and front == -1


def test_field_1_after_other_fields_is_found():
    data = pb.ModelInferRequest(id="x").SerializeToString() + \
        pb.ModelInferRequest(model_name="late").SerializeToString()
    name, version, front = grpc_wire.scan(data)
    assert (name, version, front) == (b"late", None, -1)


@pytest.mark.parametrize("data", [
    b"\x0a\x05abc",           # length past the end
    b"\x0a",                  # tag without a length
    b"\x08\x01",              # field 1 as a varint: not a string
    b"\x0b",                  # wire type 3 (groups)
    b"\x18\xff\xff",          # varint never ends
    b"\x1d\x00\x00",          # fixed32 cut short
])
def test_invalid_protobuf_is_a_bad_request(data):
    with pytest.raises(BadRequest):
        grpc_wire.scan(data)


@pytest.mark.parametrize("version", [None, b"2"])
def test_with_name_rewrites_only_fields_1_and_2(version):
    original = infer_request(model_name="mnist", model_version="9", id="req-1")
    data = original.SerializeToString()
    _, _, front = grpc_wire.scan(data)
    out = pb.ModelInferRequest.FromString(grpc_wire.with_name(data, front, b"mnist-v2", version))
    assert out.model_name == "mnist-v2"
    assert out.model_version == (version.decode() if version else "")
    original.model_name, original.model_version = out.model_name, out.model_version
    assert out == original


def test_with_name_on_a_scattered_message_and_a_long_name():
    data = pb.ModelInferRequest(id="x", model_version="1").SerializeToString() + \
        pb.ModelInferRequest(model_name="a").SerializeToString()
    long_name = b"m" * 200
    out = pb.ModelInferRequest.FromString(
        grpc_wire.with_name(data, grpc_wire.scan(data)[2], long_name, None))
    assert out.model_name == long_name.decode() and out.model_version == "" and out.id == "x"


def test_with_name_inserts_a_missing_name():
    data = infer_request(id="x").SerializeToString()
    out = pb.ModelInferRequest.FromString(grpc_wire.with_name(data, 0, b"sum", None))
    assert out.model_name == "sum" and out.id == "x" and len(out.raw_input_contents[0]) == 300


def _random_request(rng: random.Random) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest()
    if rng.random() < 0.9:
        msg.model_name = "".join(rng.choice("ab-_.é") for _ in range(rng.randint(0, 300)))
    if rng.random() < 0.5:
        msg.model_version = str(rng.randint(0, 10 ** 6))
    if rng.random() < 0.5:
        msg.id = "x" * rng.randint(0, 200)
    for _ in range(rng.randint(0, 3)):
        msg.inputs.add(name="in", datatype="FP32", shape=[1, rng.randint(1, 2000)])
    msg.parameters["k"].int64_param = rng.randint(-2 ** 40, 2 ** 40)
    if rng.random() < 0.5:
        msg.raw_input_contents.append(rng.randbytes(rng.randint(0, 5000)))
    return msg


def test_scan_and_with_name_agree_with_protobuf_on_random_messages_and_corruptions():
    # Random requests as protobuf writes them: scan finds what the parser finds, and with_name
    # changes the name and version alone. The same bytes corrupted (a byte changed, cut short,
    # bytes added): scan never fails other than with WireError (a 400 / INVALID_ARGUMENT), and
    # when it reads fields 1 and 2 from bytes protobuf also accepts, it reads the same values.
    rng = random.Random(7)
    for k in range(3000):
        msg = _random_request(rng)
        data = bytearray(msg.SerializeToString())
        if k % 2:
            for _ in range(rng.randint(1, 3)):
                op = rng.random()
                if op < 0.4 and data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                elif op < 0.7:
                    data = data[:rng.randrange(len(data) + 1)]
                else:
                    data += rng.randbytes(rng.randint(1, 5))
        data = bytes(data)
        try:
            parsed = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            parsed = None
        try:
            name, version, front = grpc_wire.scan(data)
        except grpc_wire.WireError:
            assert k % 2, f"a message protobuf wrote was refused: {data[:40]!r}"
            continue
        if parsed is None:
            continue
        assert (name or b"", version or b"") == (parsed.model_name.encode(),
                                                 parsed.model_version.encode())
        renamed = pb.ModelInferRequest.FromString(grpc_wire.with_name(data, front, b"new", b"7"))
        parsed.model_name, parsed.model_version = "new", "7"
        assert renamed == parsed
