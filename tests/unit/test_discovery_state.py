"""SubscriptionState: ACK/NACK, versions, delta patches, resubscription, backoff (no sockets)."""

import pytest
from google.protobuf import any_pb2

from meshproxy._proto.meshproxy.v1 import bootstrap_pb2, discovery_pb2, resources_pb2
from meshproxy.discovery.state import (ROUTE_TYPE, RUNTIME_TYPE, SubscriptionState,
                                       reconnect_delay)

NODE = bootstrap_pb2.Node(id="p1", cluster="c")


def runtime(name, *models, address="10.0.0.1:8000"):
    return resources_pb2.Runtime(name=name, http_address=address,
                                 models=[resources_pb2.LoadedModel(name=m) for m in models])


def packed(msg):
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def sotw(version, nonce, *msgs, type_url=RUNTIME_TYPE):
    return discovery_pb2.DiscoveryResponse(version_info=version, nonce=nonce, type_url=type_url,
                                           resources=[packed(m) for m in msgs])


def delta(nonce, *msgs, removed=(), version="v"):
    return discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=version, nonce=nonce, type_url=RUNTIME_TYPE,
        removed_resources=list(removed),
        resources=[discovery_pb2.Resource(name=m.name, version=f"{m.name}-{len(m.models)}",
                                          resource=packed(m)) for m in msgs])


def test_sotw_accepts_and_acks_with_the_new_version_and_nonce():
    s = SubscriptionState(NODE, delta=False)
    out = s.handle(sotw("1", "n1", runtime("a", "m")), now=5.0)
    assert out.changed and out.nack is None
    assert (out.request.version_info, out.request.response_nonce) == ("1", "n1")
    assert not out.request.HasField("error_detail")
    assert [r.name for r in s.runtimes()] == ["a"]
    assert s.types[RUNTIME_TYPE].applied_at == 5.0


def test_sotw_same_content_under_a_new_version_is_not_a_change():
    s = SubscriptionState(NODE, delta=False)
    s.handle(sotw("1", "n1", runtime("a", "m")), 0)
    out = s.handle(sotw("2", "n2", runtime("a", "m")), 0)
    assert not out.changed and out.request.version_info == "2"


def test_an_invalid_resource_is_nacked_with_the_old_version_and_nothing_changes():
    s = SubscriptionState(NODE, delta=False)
    s.handle(sotw("1", "n1", runtime("a", "m")), 0)
    out = s.handle(sotw("2", "n2", runtime("a", "m"), runtime("b", "m", address="nowhere")), 1)
    assert not out.changed
    assert out.request.version_info == "1" and out.request.response_nonce == "n2"
    assert "Runtime 'b'.http_address" in out.request.error_detail.message
    assert [r.name for r in s.runtimes()] == ["a"]
    assert s.types[RUNTIME_TYPE].last_nack.nonce == "n2"
    assert s.types[RUNTIME_TYPE].nacks == 1


@pytest.mark.parametrize("response, words", [
    (sotw("1", "n", runtime("a"), runtime("a")), "duplicate"),
    (sotw("1", "n", resources_pb2.ModelRoute(model="x")), "ModelRoute"),
    (sotw("1", "n", runtime("a"), type_url="type.googleapis.com/other.Thing"), "unknown type_url"),
])
def test_malformed_responses_are_nacked(response, words):
    out = SubscriptionState(NODE, delta=False).handle(response, 0)
    assert out.nack is not None and words in out.nack.message


def test_a_dynamic_resource_may_not_take_a_static_name():
    s = SubscriptionState(NODE, delta=True, static_runtimes=[runtime("local", "m")])
    out = s.handle(delta("n1", runtime("local", "x")), 0)
    assert out.nack and "static" in out.nack.message
    assert [list(r.models) for r in s.runtimes()] == [[resources_pb2.LoadedModel(name="m")]]


def test_delta_patches_updates_and_removals_and_acks_by_nonce():
    s = SubscriptionState(NODE, delta=True)
    s.handle(delta("n1", runtime("a", "m"), runtime("b", "m")), 0)
    out = s.handle(delta("n2", runtime("a", "m", "k"), removed=["b"]), 0)
    assert out.changed and out.request.response_nonce == "n2"
    assert [(r.name, len(r.models)) for r in s.runtimes()] == [("a", 2)]
    assert not s.handle(delta("n3", removed=["zzz"]), 0).changed  # unknown removal: ignored


def test_delta_resubscribes_with_what_it_holds_runtimes_first():
    s = SubscriptionState(NODE, delta=True)
    first = s.initial_requests()
    assert [r.type_url for r in first] == [RUNTIME_TYPE, ROUTE_TYPE]
    assert first[0].node.id == "p1" and list(first[0].resource_names_subscribe) == ["*"]
    assert dict(first[0].initial_resource_versions) == {}
    s.handle(delta("n1", runtime("a", "m")), 0)
    assert dict(s.initial_requests()[0].initial_resource_versions) == {"a": "a-1"}


def test_sotw_resubscribes_with_the_last_accepted_version():
    s = SubscriptionState(NODE, delta=False)
    s.handle(sotw("7", "n1", runtime("a")), 0)
    s.handle(sotw("8", "n2", runtime("b", address="x")), 0)  # NACKed
    assert [r.version_info for r in s.initial_requests()] == ["7", ""]


def test_static_resources_come_first_and_the_version_names_each_type():
    s = SubscriptionState(NODE, delta=False, static_runtimes=[runtime("s")])
    s.handle(sotw("3", "n", runtime("d")), 0)
    assert [r.name for r in s.runtimes()] == ["s", "d"]
    assert s.version() == "Runtime=3 ModelRoute=-"


def test_a_saved_snapshot_restores_versions_and_resources():
    s = SubscriptionState(NODE, delta=True)
    s.handle(delta("n1", runtime("a", "m")), 0)
    t = SubscriptionState(NODE, delta=True)
    t.restore(s.saved(), now=9)
    assert [r.name for r in t.runtimes()] == ["a"]
    assert dict(t.initial_requests()[0].initial_resource_versions) == {"a": "a-1"}
    with pytest.raises(ValueError):
        t.restore(b"{not json", now=9)


@pytest.mark.parametrize("attempt, rnd, expected", [
    (0, 0.0, 0.5), (0, 0.99, 0.5), (1, 0.0, 0.5), (1, 1.0, 1.0), (3, 0.0, 2.0),
    (20, 0.0, 15.0), (20, 1.0, 30.0), (500, 0.5, 22.5)])
def test_reconnect_delay_is_jittered_exponential_between_500ms_and_30s(attempt, rnd, expected):
    assert reconnect_delay(attempt, 0.5, 30.0, rnd) == pytest.approx(expected)


def test_edited_static_resources_sit_next_to_the_dynamic_ones_and_win_a_name_clash():
    s = SubscriptionState(NODE, delta=True)
    s.handle(delta("n1", runtime("a", "m"), runtime("b", "m")), 0)
    s.set_static([runtime("b", "static")], [])
    assert [(r.name, r.models[0].name) for r in s.runtimes()] == [("b", "static"), ("a", "m")]

