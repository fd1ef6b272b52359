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
