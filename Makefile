# Every target creates .venv when it is missing. `make test` installs Debian's prometheus
# package (promtool) when run as root; `make bench` installs wrk and nginx the same way.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-tools demo protos bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) test-tools
	$(PY) -m pytest -q

# promtool and a Prometheus server for the metrics tests (Debian's prometheus package).
test-tools:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool/prometheus missing and not root: their tests will be skipped"; fi; }

demo: $(STAMP)
	$(VENV)/bin/meshproxy demo

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

bench: $(STAMP)
	bash bench/setup.sh
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
