"""The ADS server's per-stream logic and the cache: nonces, NACKs, diffs, ordering (no sockets)."""

from meshproxy._proto.meshproxy.v1 import discovery_pb2, resources_pb2
from meshproxy.control.cache import ResourceCache
from meshproxy.control.registration import Registrations
from meshproxy.control.sessions import DeltaSession, ProxyStatus, SotwSession
from meshproxy.control.sources import RuntimeView, models_from_index
from meshproxy.discovery.state import ROUTE_TYPE, RUNTIME_TYPE, SubscriptionState

Runtime, LoadedModel = resources_pb2.Runtime, resources_pb2.LoadedModel


def runtime(name, *models):
    return Runtime(name=name, http_address="10.0.0.1:1",
                   models=[LoadedModel(name=m) for m in models])


def cache_with(*runtimes, routes=()):
    c = ResourceCache()
    c.set_all(runtimes, routes)
    return c


def sotw_session(cache):
    return SotwSession(cache, ProxyStatus("peer", "sotw", 0.0), clock=lambda: 1.0)


def delta_session(cache):
    return DeltaSession(cache, ProxyStatus("peer", "delta", 0.0), clock=lambda: 1.0)


def test_versions_follow_content_and_survive_restarts():
    a, b = cache_with(runtime("r", "m")), cache_with(runtime("r", "m"))
    assert a.get(RUNTIME_TYPE).version == b.get(RUNTIME_TYPE).version
    assert not a.set_all([runtime("r", "m")], [])
    assert a.set_all([runtime("r", "m", "k")], [])


def test_sotw_sends_runtimes_then_routes_and_records_acks_and_nacks():
    cache = cache_with(runtime("r", "m"), routes=[resources_pb2.ModelRoute(model="m")])
    s = sotw_session(cache)
    [rt] = s.on_request(discovery_pb2.DiscoveryRequest(type_url=RUNTIME_TYPE))
    [route] = s.on_request(discovery_pb2.DiscoveryRequest(type_url=ROUTE_TYPE))
    assert rt.type_url == RUNTIME_TYPE and route.type_url == ROUTE_TYPE and rt.nonce != route.nonce
    # ACK
    assert s.on_request(discovery_pb2.DiscoveryRequest(
        type_url=RUNTIME_TYPE, version_info=rt.version_info, response_nonce=rt.nonce)) == []
    assert s.status.types[RUNTIME_TYPE].acked_version == rt.version_info
    # a change sends only the changed type; a NACK of it is recorded and not retried
    cache.set_all([runtime("r", "m", "k")], [resources_pb2.ModelRoute(model="m")])
    [again] = s.on_change()
    assert again.type_url == RUNTIME_TYPE
    nack = discovery_pb2.DiscoveryRequest(type_url=RUNTIME_TYPE, version_info=rt.version_info,
                                          response_nonce=again.nonce,
                                          error_detail=discovery_pb2.RpcStatus(message="bad"))
    assert s.on_request(nack) == [] and s.on_change() == []
    assert s.status.types[RUNTIME_TYPE].nacks == 1
    assert s.status.types[RUNTIME_TYPE].last_nack == "bad"


def test_stale_nonces_are_ignored():
    cache = cache_with(runtime("r", "m"))
    s = sotw_session(cache)
    [first] = s.on_request(discovery_pb2.DiscoveryRequest(type_url=RUNTIME_TYPE))
    cache.set_all([runtime("r", "m", "k")], [])
    [second] = s.on_change()
    s.on_request(discovery_pb2.DiscoveryRequest(
        type_url=RUNTIME_TYPE, response_nonce=first.nonce, version_info=first.version_info,
        error_detail=discovery_pb2.RpcStatus(message="old")))
    assert s.status.types[RUNTIME_TYPE].nacks == 0


def test_sotw_sends_nothing_to_a_proxy_that_holds_the_current_version():
    cache = cache_with(runtime("r", "m"))
    s = sotw_session(cache)
    assert s.on_request(discovery_pb2.DiscoveryRequest(
        type_url=RUNTIME_TYPE, version_info=cache.get(RUNTIME_TYPE).version)) == []


def test_delta_sends_only_changes_and_removals_and_honours_initial_versions():
    cache = cache_with(runtime("a", "m"), runtime("b", "m"))
    s = delta_session(cache)
    held = {"a": cache.get(RUNTIME_TYPE).entries["a"].version, "gone": "x"}
    [r] = s.on_request(discovery_pb2.DeltaDiscoveryRequest(
        type_url=RUNTIME_TYPE, resource_names_subscribe=["*"], initial_resource_versions=held))
    assert [x.name for x in r.resources] == ["b"] and list(r.removed_resources) == ["gone"]
    cache.set_all([runtime("a", "m", "k"), runtime("b", "m")], [])
    [r2] = s.on_change()
    assert [x.name for x in r2.resources] == ["a"] and not r2.removed_resources
    cache.set_all([runtime("a", "m", "k")], [])
    [r3] = s.on_change()
    assert not r3.resources and list(r3.removed_resources) == ["b"]
    assert s.on_change() == []


def test_delta_answers_a_type_the_proxy_holds_nothing_of_even_when_it_is_empty():
    # A proxy reports ready only once each type has answered. One whose first stream broke
    # after the runtimes and before the (empty) routes resubscribes holding runtimes only:
    # the runtimes it holds are not sent again, the empty routes type gets its first answer.
    cache = cache_with(runtime("r", "m"))
    s = delta_session(cache)
    held = {name: e.version for name, e in cache.get(RUNTIME_TYPE).entries.items()}
    assert s.on_request(discovery_pb2.DeltaDiscoveryRequest(
        type_url=RUNTIME_TYPE, resource_names_subscribe=["*"], initial_resource_versions=held)) == []
    [routes] = s.on_request(discovery_pb2.DeltaDiscoveryRequest(
        type_url=ROUTE_TYPE, resource_names_subscribe=["*"]))
    assert list(routes.resources) == [] and list(routes.removed_resources) == []
    assert routes.system_version_info == cache.get(ROUTE_TYPE).version


def test_a_client_state_and_a_delta_session_agree_end_to_end():
    cache = cache_with(runtime("a", "m"))
    server = delta_session(cache)
    client = SubscriptionState(discovery_pb2.DeltaDiscoveryRequest().node, delta=True)
    pending = [resp for req in client.initial_requests() for resp in server.on_request(req)]
    cache.set_all([runtime("a", "m"), runtime("b", "k")], [])
    pending += server.on_change()
    for resp in pending:
        assert server.on_request(client.handle(resp, 0).request) == []
    assert [r.name for r in client.runtimes()] == ["a", "b"]
    assert server.status.types[RUNTIME_TYPE].acks == 2


def test_after_a_nacked_delta_the_next_change_repairs_what_the_proxy_kept():
    # One push updates `a`, removes `c` and adds a runtime whose name clashes with one of the
    # proxy's static runtimes: the proxy NACKs it all and keeps its table. Once the clash is
    # fixed, the next push must bring `a` and the removal of `c` again, not just the fix.
    from meshproxy._proto.meshproxy.v1 import bootstrap_pb2
    cache = cache_with(runtime("a", "m"), runtime("c", "m"))
    server = delta_session(cache)
    client = SubscriptionState(bootstrap_pb2.Node(id="p"), True,
                               static_runtimes=[runtime("clash", "x")])

    def deliver(responses):
        for resp in responses:
            out = client.handle(resp, 0.0)
            assert server.on_request(out.request) == []
            yield out.nack is not None

    assert not any(deliver(resp for req in client.initial_requests()
                           for resp in server.on_request(req)))
    cache.set_all([runtime("a", "m", "k"), runtime("clash", "y")], [])
    assert list(deliver(server.on_change())) == [True]
    assert {r.name: [m.name for m in r.models] for r in client.runtimes()
            if r.name != "clash"} == {"a": ["m"], "c": ["m"]}  # the old table, whole
    cache.set_all([runtime("a", "m", "k")], [])
    assert list(deliver(server.on_change())) == [False]
    assert {r.name: [m.name for m in r.models] for r in client.runtimes()
            if r.name != "clash"} == {"a": ["m", "k"]}


def test_models_from_index_keeps_held_models_only():
    body = [{"name": "a", "version": "1", "state": "READY"},
            {"name": "b", "state": "UNAVAILABLE", "reason": "unloaded"},
            {"name": "c", "state": "LOADING"}, "junk"]
    assert [(m.name, m.version, m.state) for m in models_from_index(body)] == [
        ("a", "1", LoadedModel.READY), ("c", "", LoadedModel.LOADING)]


def test_a_silent_runtime_keeps_its_models_for_the_grace_only():
    view = RuntimeView(runtime("r"), grace=3.0)
    view.answered([LoadedModel(name="m")], now=10.0)
    msg = view.message()
    view.failed("refused", now=12.9)
    assert view.message() is msg and len(msg.models) == 1
    view.failed("refused", now=13.0)
    assert list(view.message().models) == []
    view.answered([], now=14.0)  # answers, holding nothing
    assert list(view.message().models) == []
    view.answered([LoadedModel(name="m")], now=15.0)
    assert len(view.message().models) == 1


def test_registrations_expire_grace_after_the_stream_ends():
    now = [0.0]
    changes = []
    regs = Registrations(lambda: changes.append(1), grace=1.0, heartbeat=0.5, clock=lambda: now[0],
                         taken=lambda name: name == "filed")
    assert "configured" in regs.report(9, "n9", runtime("filed", "m"))
    assert regs.report(1, "n1", runtime("side", "m")) == ""
    assert "already registered" in regs.report(2, "n2", runtime("side", "m"))
    assert "http_address" in regs.report(3, "n3", Runtime(name="x"))
    regs.closed(1)
    now[0] = 0.9
    assert not regs.expire() and [r.name for r in regs.runtimes()] == ["side"]
    now[0] = 1.0
    assert regs.expire() and regs.runtimes() == []


def test_saved_registrations_come_back_as_streams_just_ended(tmp_path, caplog):
    path = str(tmp_path / "regs.json")
    now = [0.0]
    regs = Registrations(lambda: None, grace=1.0, heartbeat=0.5, clock=lambda: now[0],
                         state_path=path)
    regs.report(1, "n1", runtime("side", "m"))
    regs.report(2, "n2", runtime("filed", "m"))
    # a restarted control plane, whose file now configures `filed`
    now[0] = 50.0
    again = Registrations(lambda: None, grace=1.0, heartbeat=0.5, clock=lambda: now[0],
                          taken=lambda name: name == "filed", state_path=path)
    again.restore()
    assert [(r.name, [m.name for m in r.models]) for r in again.runtimes()] == [("side", ["m"])]
    assert again.report(7, "n1", runtime("side", "m", "m2")) == ""  # its sidecar is back
    assert [m.name for m in again.runtimes()[0].models] == ["m", "m2"]
    # one that does not come back within grace leaves
    third = Registrations(lambda: None, grace=1.0, heartbeat=0.5, clock=lambda: now[0],
                          state_path=path)
    third.restore()
    now[0] = 51.0
    assert third.expire() and third.runtimes() == []
    # an unreadable file is logged and ignored
    with open(path, "w") as f:
        f.write("{not json")
    broken = Registrations(lambda: None, grace=1.0, state_path=path)
    broken.restore()
    assert broken.runtimes() == [] and "ignoring registration state" in caplog.text


async def test_a_runtime_edited_in_the_file_keeps_its_models_until_the_next_poll():
    from meshproxy.control.sources import DiscoveryPoller
    poller = DiscoveryPoller(lambda: None)
    rt = Runtime(name="r", http_address="127.0.0.1:9")
    poller.configure([rt], interval=60, grace=5, timeout=0.1)
    poller.views["r"].answered([LoadedModel(name="m")], now=0.0)
    poller.configure([Runtime(name="r", http_address="127.0.0.1:9", labels={"a": "b"})],
                     interval=60, grace=5, timeout=0.1)
    assert [m.name for m in poller.views["r"].message().models] == ["m"]
    assert poller.views["r"].message().labels == {"a": "b"}
    await poller.close()
