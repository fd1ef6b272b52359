"""The model-aware scenario: 4 runtimes, each holding different models.

The baseline is what a Kubernetes Service in front of a model mesh does: each request goes to a
runtime drawn at random; a runtime that lacks the model forwards the request once, over a warm
keep-alive connection, to the runtime that holds it (a real extra hop through the forwarding
runtime), and marks the answer `X-Bench-Forwarded: 1`. It runs three ways:

- `service`: the client spreads requests over the runtimes itself (a Service VIP, no proxy);
- `nginx-front`, `envoy-front`: a model-unaware ingress (nginx, or Envoy as in an Istio
  ingress gateway) spreads them at random: the same number of proxies in front as meshproxy;
- `meshproxy`: every request goes to meshproxy, which sends it straight to the holder;
- `nginx-routed`: nginx doing meshproxy's job (a `location` per model, to its holder), the C
  reference for what any model-aware gateway can reach here: like meshproxy it puts one hop in
  front of every request, where `service` adds one to 3 requests in 4;
- `modelmesh` (not the issue's baseline, shown beside it): the shape of KServe ModelMesh
  itself, where every request enters the receiving pod's mesh container, which hands it to its
  own runtime or forwards it to the holder pod's mesh container, which hands it to its runtime
  (mesh containers played by one more nginx per pod, so every request takes one hop more than
  in `service`).

Each runtime is its own nginx process (own config dir, one worker), as runtimes are separate
pods: a `location` per own model answers like the bench upstream, a `location` per other model
is a `proxy_pass` over warm keep-alive connections to the holder, so a forward is a real hop to
another process (a wake-up and a context switch), as between pods.

Placement: k6 alone on the load core; every serving-side process (the 4 runtimes and the front
under test, if any) on the proxy core. So every path crosses between cores the same way, client
-> serving side -> client, and every hop behind the entry point (front -> runtime, runtime ->
holder) stays on one core. With the runtimes on the client's core instead, `service` would
cross cores 0 times and every front 4 times (client -> front -> runtime -> front -> client),
which no cluster does. The front CPU column is the front's own process tree; the runtimes'
CPU is not in it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import load
from paths import _ENVOY_YAML, UPSTREAM_RESPONSE, Env, _ready_on, _start_nginx
from procs import Meter, Proc, binaries, free_port, http_status

RUNTIMES = 4
MODELS_PER_RUNTIME = 2


def models_of(i: int) -> list[str]:
    return [f"m{i * MODELS_PER_RUNTIME + k}" for k in range(MODELS_PER_RUNTIME)]


ALL_MODELS = [m for i in range(RUNTIMES) for m in models_of(i)]

_HOLDER = """\
        location /v2/models/{model}/ {{
            default_type application/json;
            return 200 '{response}';
        }}"""

_FORWARD = """\
        location /v2/models/{model}/ {{
            proxy_pass http://runtime{holder};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            add_header X-Bench-Forwarded 1 always;
        }}"""


_MESH_LOCAL = """\
        location /v2/models/{model}/ {{
            proxy_pass http://own_runtime;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""

_MESH_REMOTE = """\
        location /v2/models/{model}/ {{
            proxy_pass http://mesh{holder};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            add_header X-Bench-Forwarded 1 always;
        }}"""

_ROUTED = """\
        location /v2/models/{model}/ {{
            proxy_pass http://runtime{holder};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""

_NGINX_FRONT = """\
    upstream any_runtime {{
        random;
{servers}
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://any_runtime;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def _upstream(name: str, port: int) -> str:
    return (f"    upstream {name} {{\n        server 127.0.0.1:{port};\n        keepalive 16;\n"
            f"        keepalive_requests 1000000;\n    }}")


def runtime_http(i: int, ports: list[int]) -> str:
    """The http block of runtime `i`: a warm keep-alive upstream per other runtime, and one
    server answering its own models and forwarding the others once to their holder."""
    blocks = [_upstream(f"runtime{j}", p) for j, p in enumerate(ports) if j != i]
    locations = []
    for j in range(RUNTIMES):
        for model in models_of(j):
            locations.append(_HOLDER.format(model=model, response=UPSTREAM_RESPONSE) if i == j
                             else _FORWARD.format(model=model, holder=j))
    blocks.append(f"    server {{\n        listen 127.0.0.1:{ports[i]} backlog=4096;\n"
                  + "\n".join(locations) + "\n    }")
    return "\n".join(blocks)


def mesh_http(i: int, mesh_ports: list[int], ports: list[int]) -> str:
    """The http block of pod `i`'s mesh container: its own models go to its runtime, the others
    to the holder pod's mesh container (which hands them to its runtime)."""
    blocks = [_upstream("own_runtime", ports[i])]
    blocks += [_upstream(f"mesh{j}", p) for j, p in enumerate(mesh_ports) if j != i]
    locations = [_MESH_LOCAL.format(model=model) if i == j
                 else _MESH_REMOTE.format(model=model, holder=j)
                 for j in range(RUNTIMES) for model in models_of(j)]
    blocks.append(f"    server {{\n        listen 127.0.0.1:{mesh_ports[i]} backlog=4096;\n"
                  + "\n".join(locations) + "\n    }")
    return "\n".join(blocks)


def routed_http(port: int, ports: list[int]) -> str:
    """The http block of an nginx gateway routing by model: each model's path to its holder."""
    blocks = [_upstream(f"runtime{j}", p) for j, p in enumerate(ports)]
    locations = [_ROUTED.format(model=model, holder=j)
                 for j in range(len(ports)) for model in models_of(j)]
    blocks.append(f"    server {{\n        listen 127.0.0.1:{port} backlog=4096;\n"
                  + "\n".join(locations) + "\n    }")
    return "\n".join(blocks)


def meshproxy_yaml(port: int, admin: int, ports: list[int]) -> str:
    runtimes = "".join(
        f"    - name: runtime{i}\n      http_address: 127.0.0.1:{p}\n"
        f"      models: [{', '.join('{name: %s}' % m for m in models_of(i))}]\n"
        for i, p in enumerate(ports))
    return (f"listeners: {{http_address: '127.0.0.1:{port}', grpc_address: disabled}}\n"
            f"admin: {{address: '127.0.0.1:{admin}'}}\nstatic_resources:\n  runtimes:\n{runtimes}")


def start_runtimes(work: Path, cpu: int | None) -> tuple[list[Proc], list[int]]:
    """One nginx process per runtime (`runtime0`..), all pinned to `cpu`, each ready when it
    answers one of its own models."""
    ports = [free_port() for _ in range(RUNTIMES)]
    return _start_each([(f"runtime{i}", runtime_http(i, ports), ports[i])
                        for i in range(RUNTIMES)], work, cpu), ports


def _start_each(specs: list[tuple[str, str, int]], work: Path, cpu: int | None) -> list[Proc]:
    """An nginx per (name, http block, port), pinned to `cpu`, each ready when it answers the
    first model of its pod; if one fails, those already started are stopped."""
    procs: list[Proc] = []
    try:
        for i, (name, http, port) in enumerate(specs):
            procs.append(_start_nginx(name, work, http, cpu))
            _ready_on(procs[-1], f"http://127.0.0.1:{port}/v2/models/{models_of(i)[0]}/infer")
    except BaseException:
        stop_all(procs)
        raise
    return procs


class Group:
    """Processes started and stopped together, measured by nobody (no front CPU)."""

    pid = None

    def __init__(self, procs: list[Proc]):
        self.procs = procs

    def stop(self) -> None:
        stop_all(self.procs)


def stop_all(procs: list[Proc]) -> None:
    """Stop each by its PID; one failing to stop does not leave the others running."""
    errors = []
    for proc in procs:
        try:
            proc.stop()
        except Exception as e:  # noqa: BLE001 - try the rest, then report
            errors.append(f"{proc.name}: {type(e).__name__}: {e}")
    if errors:
        raise RuntimeError("; ".join(errors))


def start_service(env: Env, ports: list[int]) -> tuple[None, list[str]]:
    return None, [f"http://127.0.0.1:{p}" for p in ports]


def start_nginx_front(env: Env, ports: list[int]) -> tuple[Proc, list[str]]:
    port = free_port()
    http = _NGINX_FRONT.format(port=port, servers="\n".join(
        f"        server 127.0.0.1:{p};" for p in ports))
    proc = _start_nginx("nginx-front", env.work, http, env.proxy_cpu)
    _ready_on(proc, f"http://127.0.0.1:{port}/v2/models/m0/infer")
    return proc, [f"http://127.0.0.1:{port}"]


def start_nginx_routed(env: Env, ports: list[int]) -> tuple[Proc, list[str]]:
    port = free_port()
    proc = _start_nginx("nginx-routed", env.work, routed_http(port, ports), env.proxy_cpu)
    _ready_on(proc, f"http://127.0.0.1:{port}/v2/models/m0/infer")
    return proc, [f"http://127.0.0.1:{port}"]


def start_envoy_front(env: Env, ports: list[int]) -> tuple[Proc, list[str]]:
    """Envoy as in the main bench, its cluster the 4 runtimes with lb_policy RANDOM."""
    port, admin = free_port(), free_port()
    text = _ENVOY_YAML.format(port=port, admin=admin, upstream=ports[0])
    text = text.replace("    type: STATIC\n", "    type: STATIC\n    lb_policy: RANDOM\n")
    text += "".join("        - endpoint:\n            address: {socket_address: "
                    f"{{address: 127.0.0.1, port_value: {p}}}}}\n" for p in ports[1:])
    conf = env.work / "envoy-front.yaml"
    conf.write_text(text)
    argv = [str(binaries()["envoy"]), "-c", str(conf), "--concurrency", "1",
            "--disable-hot-restart", "--log-level", "warning"]
    proc = Proc("envoy-front", argv, env.work, env.proxy_cpu)
    _ready_on(proc, f"http://127.0.0.1:{admin}/ready")
    return proc, [f"http://127.0.0.1:{port}"]


def start_meshproxy(env: Env, ports: list[int]) -> tuple[Proc, list[str]]:
    port, admin = free_port(), free_port()
    conf = env.work / "meshproxy-models.yaml"
    conf.write_text(meshproxy_yaml(port, admin, ports))
    proc = Proc("meshproxy-models", [str(binaries()["meshproxy"]), "proxy", "-c", str(conf),
                                     "--workers", "1"], env.work, env.proxy_cpu)
    _ready_on(proc, f"http://127.0.0.1:{admin}/ready")
    return proc, [f"http://127.0.0.1:{port}"]


def start_modelmesh(env: Env, ports: list[int]) -> tuple[Group, list[str]]:
    """One mesh-container nginx per pod, in front of that pod's runtime."""
    mesh = [free_port() for _ in ports]
    return Group(_start_each([(f"mesh{i}", mesh_http(i, mesh, ports), mesh[i])
                              for i in range(len(ports))], env.work, env.proxy_cpu)), \
        [f"http://127.0.0.1:{p}" for p in mesh]


SCENARIOS = {"service": start_service, "nginx-front": start_nginx_front,
             "envoy-front": start_envoy_front, "nginx-routed": start_nginx_routed,
             "meshproxy": start_meshproxy,
             "modelmesh": start_modelmesh}


def check(urls: list[str], body: bytes) -> None:
    """Every model answers 200 with the upstream's body through every entry point."""
    for url in urls:
        for model in ALL_MODELS:
            status, answer = http_status(f"{url}/v2/models/{model}/infer", body, timeout=5.0)
            if status != 200 or answer != UPSTREAM_RESPONSE.encode():
                raise RuntimeError(f"{url} {model}: answered {status}: {answer[:200]!r}")


def run(env: Env, body: bytes, body_path: Path, rates: list[tuple[int, int, int, int]],
        load_cpu: int, meter_cpu: int, names=tuple(SCENARIOS), rounds: int = 3) -> dict[str, dict]:
    """{scenario: {rate: k6 figures + forwarded share} or {"failed": why}} for each (rate, VUs,
    warm-up s, measured s). k6 runs on `load_cpu`; the runtimes and each front on `meter_cpu`.

    The measured seconds are split over `rounds` rounds, and each round runs every scenario in
    turn (each front started afresh), so a stretch of slow machine falls on all of them rather
    than on whichever ran then; the figures are the medians over the rounds (max: the largest).
    """
    try:
        runtimes, ports = start_runtimes(env.work, meter_cpu)
    except Exception as e:  # noqa: BLE001 - recorded, so the rest of the report is written
        return {name: {"failed": f"runtimes: {type(e).__name__}: {e}"} for name in names}
    per_round = [(rate, vus, warmup, max(1, round(seconds / rounds)))
                 for rate, vus, warmup, seconds in rates]
    runs: dict[str, list] = {name: [] for name in names}
    failed: dict[str, str] = {}
    try:
        for r in range(rounds):
            for name in names:
                if name in failed:
                    continue
                print(f"[model-aware] {name} (round {r + 1} of {rounds})", file=sys.stderr,
                      flush=True)
                try:
                    proc, urls = SCENARIOS[name](env, ports)
                except Exception as e:  # noqa: BLE001 - one front failing must not stop the others
                    failed[name] = f"{type(e).__name__}: {e}"
                    continue
                try:
                    runs[name].append(_drive(name, proc, urls, env, body, body_path, per_round,
                                             load_cpu, meter_cpu))
                except Exception as e:  # noqa: BLE001
                    failed[name] = f"{type(e).__name__}: {e}"
                finally:
                    if proc is not None:
                        proc.stop()
    finally:
        stop_all(runtimes)
    return {name: {"failed": failed[name]} if name in failed else
            {rate: merge([run[rate] for run in runs[name]]) for rate, *_ in rates}
            for name in names}


def merge(runs: list[dict]) -> dict:
    """One figure set from the rounds' runs (load.merge_rounds), the CPU seconds summed and the
    forwarded share weighted by count."""
    out = load.merge_rounds(runs, summed=("count", "total", "dropped", "proxy_cpu_s"))
    count, shares = out["count"], [(run["forwarded_share"], run["count"]) for run in runs]
    out["forwarded_share"] = (None if any(s is None for s, _ in shares) or not count
                              else sum(s * n for s, n in shares) / count)
    return out


def _drive(name, proc, urls, env, body, body_path, rates, load_cpu, meter_cpu) -> dict[int, dict]:
    check(urls, body)
    runs = {}
    for rate, vus, warmup, seconds in rates:
        meter = Meter(proc and proc.pid, meter_cpu)
        k6 = load.run_k6(urls[0], body_path, env.work, f"models-{name}-{rate}", rate, warmup,
                         seconds, load_cpu, vus=vus, script=load.K6_MODELS_SCRIPT,
                         BENCH_URLS=",".join(urls), BENCH_MODELS=",".join(ALL_MODELS))
        used = meter.stop()
        runs[rate] = {**k6.us, "count": k6.count, "total": k6.total, "failed_rate": k6.failed_rate,
                      "dropped": k6.dropped, "forwarded_share": k6.forwarded_rate,
                      "problems": k6.problems(), "proxy_cpu_s": used["cpu_s"]}
    return runs
