"""meshproxy/workers.py: the worker count and each worker's view of the config."""

import pathlib
import subprocess
import sys

from meshproxy import workers
from meshproxy.config import Address, load_text

SIDECAR = """
listeners: {http_address: '0.0.0.0:0', grpc_address: '0.0.0.0:8033'}
admin: {address: '0.0.0.0:9901'}
dynamic_resources:
  ads_addresses: ['127.0.0.1:18000']
  sidecar: {runtime: {name: local, http_address: '127.0.0.1:8000'}}
"""


def test_cpu_quota_rounds_up_and_max_means_no_limit():
    assert workers.cpu_quota("max 100000\n") is None
    assert workers.cpu_quota("150000 100000\n") == 2
    assert workers.cpu_quota("50000 100000") == 1
    assert workers.cpu_quota("") is None


def test_default_count_is_at_least_one_and_at_most_the_cores():
    assert 1 <= workers.default_count() <= (__import__("os").cpu_count() or 1)


def test_worker_0_keeps_admin_and_sidecar_others_get_an_ephemeral_admin():
    config = load_text(SIDECAR)
    first = workers.worker_config(config, 0, http_port=4321)
    assert first.http_address == Address("0.0.0.0", 4321)
    assert first.admin_address == config.admin_address
    assert first.dynamic.sidecar.name == "local"
    other = workers.worker_config(config, 1, http_port=4321, grpc_port=None)
    assert other.admin_address == Address("127.0.0.1", 0)
    assert other.dynamic.sidecar is None and other.dynamic.ads_addresses
    assert other.grpc_address == Address("0.0.0.0", 8033)
    assert other.source is config.source  # the file's own view, for reload comparisons


def test_the_supervisor_does_not_load_the_serving_libraries():
    # The parent of --workers N only validates the config and watches its workers: grpc,
    # aiohttp and the rest would add ~23 MiB to every multi-worker proxy for nothing.
    code = ("import sys; from meshproxy import cli, workers; cli.main(['check-config', sys.argv[1]]);"
            " print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'aiohttp', "
            "'prometheus_client', 'opentelemetry', 'httptools', 'uvloop'}))")
    path = pathlib.Path(__file__).parents[2] / "config" / "gateway.yaml"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.splitlines()[-1] == "[]"


def test_a_worker_lost_while_not_stopping_never_gives_exit_0():
    assert workers.exit_code(0, stopping=False) == 1  # drained and exited on its own
    assert workers.exit_code(3, stopping=False) == 3
    assert workers.exit_code(-9, stopping=False) == 128 + 9  # killed by SIGKILL
    assert workers.exit_code(0, stopping=True) == 0  # stopped by the parent: a clean stop
    assert workers.exit_code(-9, stopping=True) == 128 + 9  # killed after its drain ran out
