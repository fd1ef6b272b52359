import random

import pytest

from meshproxy._proto.meshproxy.v1 import resources_pb2 as pb
from meshproxy.errors import NoHealthyUpstream, RateLimited, UnknownModel
from meshproxy.routing import table


def runtime(name, port, *models, state=pb.LoadedModel.READY, version=""):
    return pb.Runtime(name=name, http_address=f"127.0.0.1:{port}", models=[
        pb.LoadedModel(name=m, state=state, version=version) for m in models])


def build(runtimes, routes=(), registry=None):
    snap, _ = table.build("v1", runtimes, routes, registry or table.EndpointRegistry(), 60.0)
    return snap


def holders(snap, model, version=None, n=200):
    import random
    rnd = random.Random(0).random
    out = set()
    for _ in range(n):
        target, lb = snap.match(model, version, rnd)
        out.add(lb.pick(rnd).name)
    return out


def test_only_runtimes_holding_the_model_ready_are_chosen():
    snap = build([runtime("a", 1, "mnist", "bert"), runtime("b", 2, "bert"),
                  runtime("c", 3, "mnist", state=pb.LoadedModel.LOADING)])
    assert holders(snap, "mnist") == {"a"}
    assert holders(snap, "bert") == {"a", "b"}


def test_unknown_model_is_404_and_known_but_not_ready_is_503():
    snap = build([runtime("c", 3, "mnist", state=pb.LoadedModel.LOADING)])
    with pytest.raises(UnknownModel, match="'resnet'"):
        snap.match("resnet", None, lambda: 0.5)
    with pytest.raises(NoHealthyUpstream, match="'mnist'"):
        snap.match("mnist", None, lambda: 0.5)


def test_version_in_path_prefers_runtimes_listing_that_version():
    snap = build([runtime("a", 1, "m", version="1"), runtime("b", 2, "m", version="2")])
    assert holders(snap, "m", "2") == {"b"}
    assert holders(snap, "m") == {"a", "b"}


def test_split_route_picks_targets_by_weight_and_marks_rewrite():
    route = pb.ModelRoute(model="mnist", targets=[
        pb.WeightedTarget(model="mnist-v1", weight=80), pb.WeightedTarget(model="mnist-v2", weight=20)])
    snap = build([runtime("a", 1, "mnist-v1"), runtime("b", 2, "mnist-v2")], [route])
    assert snap.match("mnist", None, lambda: 0.5)[0].model == "mnist-v1"
    target, lb = snap.match("mnist", None, lambda: 0.9)
    assert (target.model, target.rewrite) == ("mnist-v2", True)


def test_endpoints_survive_a_new_snapshot_with_their_counters():
    registry = table.EndpointRegistry()
    first = build([runtime("a", 1, "m"), runtime("b", 2, "m")], registry=registry)
    first.endpoints["a"].active = 3
    second, gone = table.build("v2", [runtime("a", 1, "m", "n")], [], registry, 60.0)
    assert second.endpoints["a"] is first.endpoints["a"] and second.endpoints["a"].active == 3
    assert [e.name for e in gone] == ["b"]
    assert holders(first, "m") == {"a", "b"}  # the old snapshot is untouched
    assert holders(second, "m") == {"a"}


def test_an_endpoint_replaced_by_a_new_address_is_handed_back_so_its_pool_is_closed():
    registry = table.EndpointRegistry()
    first = build([runtime("a", 1, "m")], registry=registry)
    second, gone = table.build("v2", [runtime("a", 2, "m")], [], registry, 60.0)
    assert second.endpoints["a"].port == 2 and gone == [first.endpoints["a"]]
    _, gone = table.build("v3", [runtime("a", 2, "m")], [], registry, 60.0)
    assert gone == []


def test_index_lists_models_and_where_they_are_ready():
    snap = build([runtime("a", 1, "m"), runtime("b", 2, "m", "n", state=pb.LoadedModel.LOADING)])
    assert snap.index() == [
        {"name": "m", "state": "READY", "runtimes": ["a"]},
        {"name": "n", "state": "UNAVAILABLE", "runtimes": []},
    ]


def limited(burst, rps=0.01):
    return pb.ModelRoute(model="m", rate_limit=pb.RateLimit(requests_per_second=rps, burst=burst))


def test_a_table_update_does_not_refill_the_rate_limit_while_its_settings_stay():
    registry = table.EndpointRegistry()
    runtimes = [runtime("a", 1, "m")]
    snap = build(runtimes, [limited(2)], registry)
    for _ in range(2):
        snap.match("m", None, lambda: 0.5, now=0.0)
    snap = build(runtimes, [limited(2)], registry)  # the same resources again, as any update
    with pytest.raises(RateLimited):
        snap.match("m", None, lambda: 0.5, now=1.0)
    snap = build(runtimes, [limited(3)], registry)  # new settings: a new, full bucket
    for _ in range(3):
        snap.match("m", None, lambda: 0.5, now=1.0)
    with pytest.raises(RateLimited):
        snap.match("m", None, lambda: 0.5, now=1.0)


def test_a_table_update_keeps_the_count_of_mirror_copies_in_flight():
    registry = table.EndpointRegistry()
    runtimes = [runtime("a", 1, "m"), runtime("s", 2, "m-shadow")]
    route = pb.ModelRoute(model="m", mirror=pb.Mirror(model="m-shadow"))
    old = build(runtimes, [route], registry).match("m", None, lambda: 0.5)[0].route.mirror
    old.inflight += 2  # two copies sent under the first table
    new = build(runtimes, [route], registry).match("m", None, lambda: 0.5)[0].route.mirror
    assert new is not old and new.inflight == 2
    old.inflight -= 1  # one of them finishes
    assert new.inflight == 1


def test_a_request_naming_a_version_uses_the_routes_choice_count():
    rts = [runtime(n, i, "m", version="2") for i, n in enumerate(("busy1", "busy2", "idle"))]
    route = pb.ModelRoute(model="m")
    route.choice_count.value = 50  # draws see every runtime: the least busy always wins
    snap = build(rts, [route])
    snap.endpoints["busy1"].active = snap.endpoints["busy2"].active = 5
    rnd = random.Random(4).random
    for version in (None, "2"):
        _, lb = snap.match("m", version, rnd)
        assert {lb.pick(rnd).name for _ in range(200)} == {"idle"}, version
