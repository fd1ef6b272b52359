# Every target creates .venv when it is missing; nothing here needs root
# except `make bench`, which installs wrk and nginx from Debian's packages.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo protos bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/meshproxy demo

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

bench: $(STAMP)
	bash bench/setup.sh
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
