"""The upstream and the paths under test: their config files, how each starts, when it is ready.

A path is a name plus a `start` function returning the running proxy (None for `direct`) and
the URL the load generators hit. Every path forwards to the same nginx upstream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from procs import Proc, binaries, free_port, http_status, wait_until

INFER_PATH = "/v2/models/bench/infer"
READY_DEADLINE_S = 20.0

# What the upstream answers to every request: a small KServe v2 infer response.
UPSTREAM_RESPONSE = json.dumps({
    "model_name": "bench", "model_version": "1", "id": "1",
    "outputs": [{"name": "output0", "datatype": "FP32", "shape": [1, 4], "data": [0.5, 0.25, 0.125, 1.0]}],
}, separators=(",", ":"))


@dataclass
class Env:
    """What every path start needs: a scratch dir, the upstream port, the core to pin to."""

    work: Path
    upstream_port: int
    proxy_cpu: int | None


# -- nginx, as upstream and as reference proxy ------------------------------------------------

_NGINX_MAIN = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
{http}
}}
"""

_UPSTREAM_HTTP = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{response}';
        }}
    }}"""

# The upstream for the 600 KB body: like a model runtime it reads the whole request before it
# answers (nginx's `return` answers at once and discards the body after, which makes proxies
# close the connection). Buffered proxying to a sink without the body does that in stock nginx.
_UPSTREAM_READING_HTTP = """\
    upstream sink {{
        server 127.0.0.1:{sink};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 4m;
        client_body_buffer_size 1m;
        location / {{
            proxy_pass http://sink;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
    server {{
        listen 127.0.0.1:{sink} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{response}';
        }}
    }}"""

_PROXY_HTTP = """\
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_body_buffer_size 1m;  # a 600 KB body stays in memory, not in a temp file
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def _start_nginx(name: str, work: Path, http_block: str, cpu: int | None) -> Proc:
    d = work / name
    d.mkdir(mode=0o755, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(_NGINX_MAIN.format(dir=d, http=http_block))
    return Proc(name, [str(binaries()["nginx"]), "-p", str(d), "-c", str(conf)], work, cpu)


def start_upstream(work: Path, cpu: int | None, reading: bool = False) -> tuple[Proc, int]:
    """The nginx that plays the model runtime: drops the body, returns a fixed answer; with
    `reading`, only once it has read the whole body."""
    port = free_port()
    http = (_UPSTREAM_READING_HTTP.format(port=port, sink=free_port(), response=UPSTREAM_RESPONSE)
            if reading else _UPSTREAM_HTTP.format(port=port, response=UPSTREAM_RESPONSE))
    proc = _start_nginx("upstream-reading" if reading else "upstream", work, http, cpu)
    _ready_on(proc, f"http://127.0.0.1:{port}/")
    return proc, port


def _ready_on(proc: Proc, url: str) -> None:
    """Wait for `url` to answer 200; on failure stop the process and raise with its log tail."""
    try:
        wait_until(lambda: http_status(url, timeout=0.5)[0] == 200, READY_DEADLINE_S, proc.name, proc.alive)
    except RuntimeError as e:
        proc.stop()
        raise RuntimeError(f"{e}\n{proc.log_tail()}") from None


def start_nginx_proxy(env: Env) -> tuple[Proc, str]:
    port = free_port()
    proc = _start_nginx("nginx", env.work, _PROXY_HTTP.format(port=port, upstream=env.upstream_port), env.proxy_cpu)
    _ready_on(proc, f"http://127.0.0.1:{port}/")
    return proc, f"http://127.0.0.1:{port}{INFER_PATH}"


# -- Envoy ------------------------------------------------------------------------------------

_ENVOY_YAML = """\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: HTTP1
          generate_request_id: false
          route_config:
            name: all
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}
"""


def start_envoy(env: Env) -> tuple[Proc, str]:
    port, admin = free_port(), free_port()
    conf = env.work / "envoy.yaml"
    conf.write_text(_ENVOY_YAML.format(port=port, admin=admin, upstream=env.upstream_port))
    argv = [str(binaries()["envoy"]), "-c", str(conf), "--concurrency", "1",
            "--disable-hot-restart", "--log-level", "warning"]
    proc = Proc("envoy", argv, env.work, env.proxy_cpu)
    _ready_on(proc, f"http://127.0.0.1:{admin}/ready")
    return proc, f"http://127.0.0.1:{port}{INFER_PATH}"


# -- meshproxy --------------------------------------------------------------------------------

_MESHPROXY_YAML = """\
listeners:
  http_address: 127.0.0.1:{port}
  grpc_address: disabled
admin:
  address: 127.0.0.1:{admin}
static_resources:
  runtimes:
    - name: upstream
      http_address: 127.0.0.1:{upstream}
      models: [{{name: bench}}]
"""


def start_meshproxy(env: Env, workers: int = 1) -> tuple[Proc, str]:
    exe = binaries()["meshproxy"]
    if exe is None:
        raise RuntimeError("meshproxy: .venv/bin/meshproxy not found (run `make install`)")
    port, admin = free_port(), free_port()
    conf = env.work / "meshproxy.yaml"
    conf.write_text(_MESHPROXY_YAML.format(port=port, admin=admin, upstream=env.upstream_port))
    proc = Proc("meshproxy", [str(exe), "proxy", "-c", str(conf), "--workers", str(workers)],
                env.work, env.proxy_cpu)
    _ready_on(proc, f"http://127.0.0.1:{admin}/ready")
    if workers > 1:  # admin is worker 0's; the parent's ready line comes when all are up
        wait_until(lambda: "meshproxy ready" in proc.log_path.read_text(errors="replace"),
                   READY_DEADLINE_S, proc.name, proc.alive)
    return proc, f"http://127.0.0.1:{port}{INFER_PATH}"


def start_direct(env: Env) -> tuple[None, str]:
    return None, f"http://127.0.0.1:{env.upstream_port}{INFER_PATH}"


# The order here is the order of every round (interleaved).
PATHS = {
    "direct": start_direct,
    "envoy": start_envoy,
    "meshproxy": start_meshproxy,
    "nginx": start_nginx_proxy,
}

# The workers test: meshproxy not pinned (Env.proxy_cpu None), with 1 and 2 worker processes.
WORKER_PATHS = {
    "meshproxy --workers 1": lambda env: start_meshproxy(env, workers=1),
    "meshproxy --workers 2": lambda env: start_meshproxy(env, workers=2),
}
