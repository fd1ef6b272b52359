"""bench/: the meshproxy configs it writes pass the proxy's own validation; each model-aware
runtime (its own nginx) has one answering location per own model, a forward per other one, and
an upstream per other runtime; each ModelMesh-shaped mesh container hands its own models to its
runtime and forwards the others to the holder's mesh container; the routed nginx gateway sends
each model to its holder; rounds merge into medians; the gRPC section flags runs the upstream
did not fully answer;
request bodies have the advertised sizes."""

import re
import sys
from pathlib import Path

import pytest

from meshproxy.config import load_text

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import load
        import model_aware
        import paths
        yield load, model_aware, paths
    finally:
        sys.path.remove(str(BENCH))


def test_meshproxy_configs_of_the_bench_are_valid(bench):
    _, model_aware, paths = bench
    main = load_text(paths._MESHPROXY_YAML.format(port=1, admin=2, upstream=3))
    assert [m.name for m in main.runtimes[0].models] == ["bench"]
    models = load_text(model_aware.meshproxy_yaml(1, 2, [11, 12, 13, 14]))
    held = {rt.http_address: [m.name for m in rt.models] for rt in models.runtimes}
    assert held == {f"127.0.0.1:{10 + i}": model_aware.models_of(i - 1) for i in range(1, 5)}


def test_each_runtime_answers_its_own_models_and_forwards_the_others_once(bench):
    _, model_aware, _ = bench
    ports = [11, 12, 13, 14]
    for i in range(model_aware.RUNTIMES):
        http = model_aware.runtime_http(i, ports)
        servers = http.split("    server {")[1:]
        assert len(servers) == 1 and f"listen 127.0.0.1:{ports[i]} " in servers[0]
        upstreams = dict(re.findall(r"upstream runtime(\d) \{\s*server 127\.0\.0\.1:(\d+);", http))
        assert upstreams == {str(j): str(p) for j, p in enumerate(ports) if j != i}
        own = set(model_aware.models_of(i))
        for model in model_aware.ALL_MODELS:
            block = re.search(r"location /v2/models/%s/ \{(.*?)\}" % model, servers[0], re.S)[1]
            if model in own:
                assert "return 200" in block and "proxy_pass" not in block
            else:
                holder = model_aware.ALL_MODELS.index(model) // model_aware.MODELS_PER_RUNTIME
                assert f"proxy_pass http://runtime{holder};" in block
                assert "X-Bench-Forwarded 1" in block


def test_each_mesh_container_hands_its_models_to_its_runtime_and_forwards_the_rest(bench):
    _, model_aware, _ = bench
    ports, mesh = [11, 12, 13, 14], [21, 22, 23, 24]
    for i in range(model_aware.RUNTIMES):
        http = model_aware.mesh_http(i, mesh, ports)
        server = http.split("    server {")[1]
        assert f"listen 127.0.0.1:{mesh[i]} " in server
        upstreams = dict(re.findall(r"upstream (\w+) \{\s*server 127\.0\.0\.1:(\d+);", http))
        assert upstreams == {"own_runtime": str(ports[i]),
                             **{f"mesh{j}": str(p) for j, p in enumerate(mesh) if j != i}}
        for model in model_aware.ALL_MODELS:
            block = re.search(r"location /v2/models/%s/ \{(.*?)\}" % model, server, re.S)[1]
            holder = model_aware.ALL_MODELS.index(model) // model_aware.MODELS_PER_RUNTIME
            if holder == i:
                assert "proxy_pass http://own_runtime;" in block and "Forwarded" not in block
            else:
                assert f"proxy_pass http://mesh{holder};" in block
                assert "X-Bench-Forwarded 1" in block


def test_the_routed_nginx_gateway_sends_each_model_to_its_holder(bench):
    _, model_aware, _ = bench
    ports = [11, 12, 13, 14]
    http = model_aware.routed_http(30, ports)
    server = http.split("    server {")[1]
    assert "listen 127.0.0.1:30 " in server
    upstreams = dict(re.findall(r"upstream runtime(\d) \{\s*server 127\.0\.0\.1:(\d+);", http))
    assert upstreams == {str(j): str(p) for j, p in enumerate(ports)}
    for model in model_aware.ALL_MODELS:
        block = re.search(r"location /v2/models/%s/ \{(.*?)\}" % model, server, re.S)[1]
        holder = model_aware.ALL_MODELS.index(model) // model_aware.MODELS_PER_RUNTIME
        assert f"proxy_pass http://runtime{holder};" in block and "Forwarded" not in block


def test_rounds_merge_into_medians_the_largest_max_and_summed_counts(bench):
    _, model_aware, _ = bench

    def run(p50, p99, mx, count, share):
        return {"p50": p50, "p90": p50 * 2, "p99": p99, "max": mx, "min": 1, "avg": p50,
                "count": count, "dropped": 1, "failed_rate": 0.0, "forwarded_share": share,
                "problems": [], "proxy_cpu_s": 0.5}

    out = model_aware.merge([run(100, 300, 900, 1000, 0.7), run(80, 500, 2000, 1000, 0.8),
                             run(120, 350, 700, 2000, 0.75)])
    assert (out["p50"], out["p90"], out["p99"], out["max"]) == (100, 200, 350, 2000)
    assert (out["count"], out["dropped"], out["proxy_cpu_s"]) == (4000, 3, 1.5)
    assert out["forwarded_share"] == pytest.approx(0.75)
    assert out["rounds"] == [{"p50": 100, "p99": 300}, {"p50": 80, "p99": 500},
                             {"p50": 120, "p99": 350}]


def test_bodies_have_the_advertised_sizes(bench):
    load, _, _ = bench
    assert abs(len(load.infer_body()) - load.BODY_BYTES) < 16
    big = load.infer_body(load.BIG_BODY_BYTES)
    assert abs(len(big) - load.BIG_BODY_BYTES) < 16 and big.endswith(b"]}]}")


def test_the_grpc_section_flags_a_run_whose_calls_the_upstream_did_not_all_answer(bench):
    # h2load counts HTTP 200 as success even when grpc-status is an error: a path whose upstream
    # answered fewer calls than h2load counted must be shown as invalid, and fail the run.
    import report
    import sections

    def result(path, rps, us, p50, served, checked):
        return {"path": path, "requests": 1000, "rps": rps, "h2load_failed": 0,
                "upstream_served": served, "us_per_request": us, "core_other_pct": 0.0,
                "status_checked": checked, "p50_ms": p50, "p99_ms": p50 * 2}

    paths = [result("direct", 9000, None, 0.3, 1000, True),
             result("envoy", 7000, 50.0, 0.5, 1000, True),
             result("meshproxy", 3000, 200.0, 0.9, 10, False)]
    settings = {"grpc": {"seconds": 6, "latency_seconds": 4.0, "clients": 8, "streams": 32}}
    text = "\n".join(sections.grpc({"paths": paths}, settings))
    assert "| meshproxy | 3,000 | 200 | 0.90 | 1.80 | +0.60 | NO (10 served) |" in text
    assert "- **meshproxy invalid**: the upstream answered 10 calls" in text
    assert "meshproxy / Envoy CPU per request: 4.00x" in text
    results = report.Results.empty([], False, False, False)
    results.grpc = {"paths": paths}
    assert not results.all_ok()
    paths[2]["status_checked"] = True
    assert results.all_ok()
    results.grpc = {"failed": "RuntimeError: h2load output not understood"}
    assert not results.all_ok()
    assert "**gRPC failed**: RuntimeError" in "\n".join(sections.grpc(results.grpc, settings))
