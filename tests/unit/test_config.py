import os

import pytest

from meshproxy.config import ConfigError, load_text

GOOD = """
listeners: {http_address: "127.0.0.1:8008"}
http: {model_headers: [Model, x-model], request_timeout: 2.5s}
static_resources:
  runtimes:
    - name: a
      http_address: 127.0.0.1:9000
      weight: 3
      models: [{name: mnist}, {name: bert, state: LOADING}]
  routes:
    - model: mnist
      timeout: 1s
"""


def test_a_good_file_is_typed():
    c = load_text(GOOD)
    assert c.http_address.port == 8008 and str(c.admin_address) == "127.0.0.1:9901"
    assert c.http.model_headers == (b"model", b"x-model")
    assert c.http.request_timeout == 2.5 and c.http.max_request_body_bytes == 64 * 1024 * 1024
    assert c.runtimes[0].weight.value == 3 and c.routes[0].timeout.seconds == 1
    assert c.http.upstream_idle_timeout == 4.0  # below uvicorn's 5 s keep-alive
    assert load_text("http: {upstream_idle_timeout: 30s}").http.upstream_idle_timeout == 30.0


@pytest.mark.parametrize("text, path", [
    ("static_resources: {runtimes: [{name: a, htp_address: 'x:1'}]}", "htp_address"),
    ("listeners: {http_address: nope}", "listeners.http_address"),
    ("static_resources: {runtimes: [{name: a}]}", "static_resources.runtimes[0].http_address"),
    ("static_resources: {runtimes: [{name: a, http_address: 'h:1'}, {name: a, http_address: 'h:2'}]}",
     "static_resources.runtimes[1].name"),
    ("static_resources: {runtimes: [{name: a, http_address: 'h:1', models: [{name: 'bad/name'}]}]}",
     "static_resources.runtimes[0].models[0].name"),
    ("static_resources: {routes: [{model: m, balancer: fastest}]}", "static_resources.routes[0].balancer"),
    ("static_resources: {runtimes: [{name: a, http_address: 'h:1', weight: 0}]}",
     "static_resources.runtimes[0].weight"),
    ("http: {model_headers: ['bad header']}", "http.model_headers[0]"),
    ("http: {request_timeout: 'soon'}", "request_timeout"),
    ("http: {upstream_idle_timeout: 0s}", "http.upstream_idle_timeout"),
    ("- just\n- a list", "top level"),
    ("a: [unclosed", "not valid YAML"),
])
def test_bad_config_names_the_field(text, path):
    with pytest.raises(ConfigError) as e:
        load_text(text, source="cfg.yaml")
    assert path in str(e.value) and str(e.value).startswith("cfg.yaml")


def test_a_file_that_is_not_utf8_is_a_config_error_naming_it(tmp_path):
    from meshproxy.config import load_file
    path = tmp_path / "p.yaml"
    path.write_bytes("listeners: {}\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_file(str(path))
    assert str(e.value).startswith(str(path)) and "not UTF-8" in str(e.value)


@pytest.mark.parametrize("listeners, path", [
    ("listeners: {http_address: '127.0.0.1:8008'}\nadmin: {address: '127.0.0.1:8008'}",
     "admin.address: 127.0.0.1:8008 is also listeners.http_address"),
    ("listeners: {http_address: '0.0.0.0:8008', grpc_address: '0.0.0.0:8008'}",
     "listeners.grpc_address: 0.0.0.0:8008 is also listeners.http_address"),
    ("listeners: {grpc_address: '127.0.0.1:9901'}",  # admin's default address
     "admin.address: 127.0.0.1:9901 is also listeners.grpc_address"),
], ids=["rest-and-admin", "rest-and-grpc", "grpc-and-default-admin"])
def test_two_listeners_on_one_address_is_a_config_error(listeners, path):
    with pytest.raises(ConfigError) as e:
        load_text(listeners, source="cfg.yaml")
    assert str(e.value) == f"cfg.yaml: {path}"


def test_port_0_is_a_free_port_for_each_listener_not_a_clash():
    c = load_text("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
                  "admin: {address: '127.0.0.1:0'}")
    assert c.http_address == c.grpc_address == c.admin_address


def test_an_access_log_the_proxy_could_not_open_is_a_config_error(tmp_path):
    def error(path):
        with pytest.raises(ConfigError) as e:
            load_text(f"telemetry: {{access_log: {{path: '{path}'}}}}", source="cfg.yaml")
        return str(e.value)

    assert error(tmp_path / "missing" / "access.log") == (
        f"cfg.yaml: telemetry.access_log.path: '{tmp_path / 'missing'}' is not an existing "
        "directory")
    assert "is a directory" in error(tmp_path)
    (tmp_path / "file").write_text("")
    assert "is not an existing directory" in error(tmp_path / "file" / "access.log")
    for good in ("-", "stdout", str(tmp_path / "access.log")):
        assert load_text(f"telemetry: {{access_log: {{path: '{good}'}}}}").telemetry.access_log \
            == ("-" if good == "stdout" else good)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_an_access_log_in_a_read_only_directory_is_a_config_error(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ConfigError) as e:
            load_text(f"telemetry: {{access_log: {{path: '{tmp_path / 'access.log'}'}}}}")
    finally:
        tmp_path.chmod(0o755)
    assert "telemetry.access_log.path" in str(e.value) and "not writable" in str(e.value)


RT = "{name: a, http_address: 'h:1'"


@pytest.mark.parametrize("text, path", [
    # found by review: each was taken (a crash, a hang, a header injected), or a traceback
    ("listeners: {http_address: '0.0.0.0:8000', grpc_address: '127.0.0.1:8000'}",
     "listeners.grpc_address"),
    ("listeners: {http_address: 'localhost:8000'}\nadmin: {address: '127.0.0.1:8000'}",
     "admin.address"),
    ("static_resources: {runtimes: [{name: \"r1\\r\\nset-cookie: x=1\", http_address: 'h:1'}]}",
     "static_resources.runtimes[0].name"),
    (f"static_resources: {{runtimes: [{RT}, dialect: 99}}]}}", "runtimes[0].dialect"),
    (f"static_resources: {{runtimes: [{RT}, health_check: {{interval: 0s}}}}]}}",
     "runtimes[0].health_check.interval"),
    (f"static_resources: {{runtimes: [{RT}, health_check: {{timeout: -1s}}}}]}}",
     "runtimes[0].health_check.timeout"),
    (f"static_resources: {{runtimes: [{RT}, outlier_detection: {{max_ejection_percent: 500}}}}]}}",
     "runtimes[0].outlier_detection.max_ejection_percent"),
    (f"static_resources: {{runtimes: [{RT}, outlier_detection: {{base_ejection_time: -5s}}}}]}}",
     "runtimes[0].outlier_detection.base_ejection_time"),
    ("static_resources: {routes: [{model: m, choice_count: 4000000000}]}", "routes[0].choice_count"),
    ("static_resources: {routes: [{model: m, choice_count: 0}]}", "routes[0].choice_count"),
    ("static_resources: {routes: [{model: m, matches: [{headers: [{name: x, present: true}], "
     "targets: [{model: a, weight: 0}, {model: b, weight: 1}]}]}]}",
     "routes[0].matches[0].targets[0].weight"),
    ("listeners: {http_address: '127.0.0.1:\u00b2'}", "listeners.http_address"),
    ("listeners: {http_address: '127.0.0.1:\u0664\u0665'}", "listeners.http_address"),
    ("listeners: {http_address: 'http://127.0.0.1:80'}", "listeners.http_address"),
    ("static_resources: {runtimes: [{name: a, http_address: 'a b:80'}]}",
     "runtimes[0].http_address"),
    ("x: " + "[" * 5000, "nest"),  # libyaml's limit, or a RecursionError caught
    ("static_resources: {runtimes: [" + RT + "}]}\nstatic_resources: {routes: []}",
     "found the key 'static_resources' twice"),
])
def test_what_reviewers_found_taken_is_a_config_error_naming_the_field(text, path):
    with pytest.raises(ConfigError) as e:
        load_text(text, source="cfg.yaml")
    assert path in str(e.value) and str(e.value).startswith("cfg.yaml"), str(e.value)


def test_addresses_names_and_yaml_merges_that_stay_valid():
    c = load_text("listeners: {http_address: '10.0.0.1:8000', grpc_address: '10.0.0.2:8000'}\n"
                  "admin: {address: '[::1]:9901'}\n"
                  "static_resources:\n  runtimes:\n"
                  "    - &rt {name: triton-0, http_address: 'triton-0.triton_svc:8000'}\n"
                  "    - {<<: *rt, name: 'triton-1:a'}\n")
    assert [r.name for r in c.runtimes] == ["triton-0", "triton-1:a"]  # a merge may override
    assert c.runtimes[1].http_address == "triton-0.triton_svc:8000"
    assert c.admin_address.host == "::1"
