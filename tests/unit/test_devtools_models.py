"""Toy models and repository state of the devtools runtime, without sockets or a real clock."""

import math
import struct

import pytest

from meshproxy.devtools.models import (LOADING, READY, UNAVAILABLE, BadInput, InferRequest,
                                       ModelNotFound, ModelNotReady, Repository, Tensor,
                                       make_model, run_infer)


def infer(model: str, *inputs: Tensor, outputs: list[str] | None = None) -> list[Tensor]:
    request = InferRequest(model, inputs=list(inputs), outputs=outputs or [])
    return run_infer(make_model(model), request)


def expected_mnist(x: list[float]) -> list[float]:
    """The documented formula, written out independently of the model code."""
    logits = []
    for k in range(10):
        total = sum(((7 * i + 13 * k) % 17 - 8) / 16 * x[i] for i in range(784))
        logits.append(total + (k - 4.5) / 10)
    return [struct.unpack("<f", struct.pack("<f", v))[0] for v in logits]


# --- models ---------------------------------------------------------------------------------

def test_identity_echoes_every_input_in_order():
    a = Tensor("a", "FP32", [2, 2], [1.5, 2.0, -3.0, 4.0])
    b = Tensor("b", "BYTES", [1], ["hello"])
    out = infer("identity", a, b)
    assert [(t.name, t.datatype, t.shape, t.data) for t in out] == [
        ("output0", "FP32", [2, 2], [1.5, 2.0, -3.0, 4.0]), ("output1", "BYTES", [1], ["hello"])]


def test_unknown_model_name_is_an_alias_of_identity():
    out = infer("resnet", Tensor("x", "INT64", [3], [7, 8, 9]))
    assert [(t.name, t.data) for t in out] == [("output0", [7, 8, 9])]


def test_sum_of_ints_is_exact_int64():
    out = infer("sum", Tensor("a", "INT64", [3], [1, 2, 3]), Tensor("b", "INT32", [2], [10, 2**40]))
    assert [(t.name, t.datatype, t.shape, t.data) for t in out] == [
        ("sum", "INT64", [1], [16 + 2**40])]


def test_sum_of_floats_is_correctly_rounded_fp64():
    data = [0.1] * 10 + [1e16, 1.0, -1e16]
    out = infer("sum", Tensor("a", "FP32", [13], data))
    assert (out[0].datatype, out[0].data) == ("FP64", [math.fsum(data)])


def test_sum_rejects_bytes():
    with pytest.raises(BadInput, match="BYTES"):
        infer("sum", Tensor("a", "BYTES", [1], ["x"]))


def test_mnist_gives_the_documented_logits_and_label():
    x = [(i % 13) / 8 for i in range(784)]
    logits, label = infer("mnist", Tensor("img", "FP32", [1, 784], x))
    want = expected_mnist(x)
    assert (logits.name, logits.datatype, logits.shape) == ("logits", "FP32", [1, 10])
    assert logits.data == want
    assert (label.name, label.datatype, label.shape) == ("label", "INT64", [1])
    assert label.data == [want.index(max(want))]


def test_mnist_blank_image_is_labelled_nine_and_flat_shape_is_accepted():
    logits, label = infer("mnist", Tensor("img", "FP32", [784], [0.0] * 784))
    assert logits.data == expected_mnist([0.0] * 784)
    assert label.data == [9]


@pytest.mark.parametrize("shape,n", [([1, 783], 783), ([2, 784], 1568), ([28, 28], 784)])
def test_mnist_wrong_size_or_shape_names_the_problem(shape, n):
    with pytest.raises(BadInput, match="784 elements"):
        infer("mnist", Tensor("img", "FP32", shape, [0.0] * n))


def test_shape_and_data_disagreeing_is_bad_input():
    with pytest.raises(BadInput, match=r"'a': shape \[2, 2\] holds 4 elements but data has 3"):
        infer("identity", Tensor("a", "FP32", [2, 2], [1.0, 2.0, 3.0]))


@pytest.mark.parametrize("tensor,match", [
    (Tensor("a", "FLOAT", [1], [1.0]), "unknown datatype 'FLOAT'"),
    (Tensor("a", "INT64", [2], [1, "2"]), "does not match datatype INT64"),
    (Tensor("a", "INT64", [1], [1.5]), "does not match datatype INT64"),
    (Tensor("a", "FP32", [-1], []), "non-negative"),
])
def test_malformed_tensors_are_bad_input(tensor, match):
    with pytest.raises(BadInput, match=match):
        infer("identity", tensor)


def test_no_inputs_is_bad_input():
    with pytest.raises(BadInput, match="no inputs"):
        infer("identity")


def test_requested_outputs_are_filtered_and_unknown_ones_rejected():
    x = [0.0] * 784
    only_label = infer("mnist", Tensor("i", "FP32", [784], x), outputs=["label"])
    assert [t.name for t in only_label] == ["label"]
    with pytest.raises(BadInput, match="no output named 'probs'"):
        infer("mnist", Tensor("i", "FP32", [784], x), outputs=["probs"])


# --- repository -----------------------------------------------------------------------------

def states(repo: Repository, now: float) -> dict[str, str]:
    return {e.name: e.state for e in repo.index(now)}


def test_load_with_delay_is_loading_until_the_clock_passes():
    repo = Repository("rt")
    repo.load("bert", now=10.0, delay=2.0)
    assert states(repo, 11.9) == {"bert": LOADING}
    with pytest.raises(ModelNotReady, match="'bert' is still loading on runtime rt"):
        repo.use("bert", "", now=11.9)
    assert states(repo, 12.0) == {"bert": READY}
    assert repo.use("bert", "", now=12.0).name == "bert"


def test_loading_a_held_model_again_does_not_restart_it():
    repo = Repository("rt")
    repo.load("bert", now=0.0, delay=5.0)
    assert repo.load("bert", now=1.0, delay=5.0).ready_at == 5.0


def test_capacity_evicts_the_least_recently_used():
    repo = Repository("rt", capacity=2)
    repo.load("a", 0.0)
    repo.load("b", 1.0)
    repo.use("a", "", 2.0)  # b is now the least recently used
    repo.load("c", 3.0)
    assert states(repo, 3.0) == {"a": READY, "b": UNAVAILABLE, "c": READY}
    assert "evicted to make room for 'c' (capacity 2)" in repo.entry("b", 3.0).reason
    with pytest.raises(ModelNotFound, match="model 'b' is not loaded on runtime rt"):
        repo.use("b", "", 4.0)


def test_unload_then_index_and_ready_filter():
    repo = Repository("rt")
    for name in ("sum", "identity"):
        repo.load(name, 0.0)
    repo.unload("sum", 1.0)
    assert [(e.name, e.state, e.reason) for e in repo.index(1.0)] == [
        ("identity", READY, ""), ("sum", UNAVAILABLE, "unloaded")]
    assert repo.ready(1.0) == ["identity"]
    with pytest.raises(ModelNotFound):
        repo.unload("sum", 2.0)


def test_unknown_model_and_version_are_not_found():
    repo = Repository("rt")
    repo.load("sum", 0.0)
    with pytest.raises(ModelNotFound, match="model 'nope' is not loaded on runtime rt"):
        repo.use("nope", "", 0.0)
    with pytest.raises(ModelNotFound, match="no version '7'"):
        repo.use("sum", "7", 0.0)
    assert repo.use("sum", "1", 0.0).state == READY
