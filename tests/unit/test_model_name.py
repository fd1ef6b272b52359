import pytest

from meshproxy.errors import BadRequest
from meshproxy.model_name import from_path, resolve, validate


def test_path_gives_name_and_version():
    assert from_path(b"/v2/models/mnist/versions/3/infer?x=1") == (b"mnist", b"3")
    assert from_path(b"/v2/models/mnist/infer") == (b"mnist", None)
    assert from_path(b"/v2/models/mnist") == (b"mnist", None)
    assert from_path(b"/v2/health/ready") is None


def test_header_alone_names_the_model():
    assert resolve(b"resnet", b"/anything") == ("resnet", None)


def test_header_and_path_must_agree():
    assert resolve(b"mnist", b"/v2/models/mnist/infer") == ("mnist", None)
    with pytest.raises(BadRequest, match="'resnet'.*'mnist'"):
        resolve(b"resnet", b"/v2/models/mnist/infer")


@pytest.mark.parametrize("name", [b"", b"-lead", b"a/b", b"a%2Fb", b"..", b"a b", b"x" * 257])
def test_invalid_names_are_refused_with_the_reason(name):
    with pytest.raises(BadRequest, match="invalid model name"):
        validate(name, "path")


def test_encoded_slash_in_path_is_not_decoded_into_another_model():
    # /v2/models/a%2F..%2Fb/infer must not become model "b"
    with pytest.raises(BadRequest):
        resolve(None, b"/v2/models/a%2F..%2Fb/infer")


def test_no_model_anywhere():
    assert resolve(None, b"/v2/health/ready") == (None, None)
