"""dynamic_resources in the proxy bootstrap: bad values fail at load with the field path."""

import pytest

from meshproxy.config import ConfigError, load_text


@pytest.mark.parametrize("extra, words", [
    ("", "ads_addresses: at least one"),
    ("ads_addresses: ['nohost']", "ads_addresses[0]"),
    ("ads_addresses: ['h:1'], initial_backoff: 2s, max_backoff: 1s", "max_backoff"),
    ("ads_addresses: ['h:1'], sidecar: {runtime: {name: s}}", "sidecar.runtime.http_address"),
    ("ads_addresses: ['h:1'], sidecar: {runtime: {name: st, http_address: 'h:2'}}", "static"),
    ("ads_addresses: ['h:1'], keepalive: {interval: 0.5s}", "keepalive.interval: must be at least 1s"),
    ("ads_addresses: ['h:1'], keepalive: {timeout: 0s}", "keepalive.timeout: must be positive"),
    ("ads_addresses: ['h:1'], initial_fetch_timeout: -1s",
     "initial_fetch_timeout: must be non-negative"),
])
def test_dynamic_resources_config_errors_name_the_field(extra, words):
    text = ("static_resources: {runtimes: [{name: st, http_address: 'h:3'}]}\n"
            f"dynamic_resources: {{{extra}}}\n")
    with pytest.raises(ConfigError) as e:
        load_text(text)
    assert words in str(e.value)
