"""bench/: the meshproxy configs it writes pass the proxy's own validation; each model-aware
runtime (its own nginx) has one answering location per own model, a forward per other one, and
an upstream per other runtime; request bodies have the advertised sizes."""

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


def test_bodies_have_the_advertised_sizes(bench):
    load, _, _ = bench
    assert abs(len(load.infer_body()) - load.BODY_BYTES) < 16
    big = load.infer_body(load.BIG_BODY_BYTES)
    assert abs(len(big) - load.BIG_BODY_BYTES) < 16 and big.endswith(b"]}]}")
