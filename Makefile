# Two commands on a fresh machine: `make demo` and `make test`. Each sets up its own
# virtualenv, installs colocore (building the Cython extensions and the guest images)
# and runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
SOURCES := setup.py pyproject.toml constraints.txt $(wildcard colocore_ext/*.pyx colocore_ext/*.pxd colocore_ext/includes/*.pxd guests/*.c guests/*.S guests/*.h guests/*.ld guests/*.py)
PYTEST_ARGS ?=

FUZZ_SECONDS ?= 60
FUZZ_FINDINGS ?= /tmp/colocore-findings

.PHONY: all install demo test test-tools bench fuzz clean etcd

all: install

# What colocore needs is declared once: pyproject.toml's build-system (to build) and
# setup.py's install_requires and "test" extra (to run and test); constraints.txt pins the
# versions it was tested with.
$(VENV)/.deps: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $$($(PY) -c 'import tomllib; \
		print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The arbiter's tests, its benchmark and `make demo` run their own etcd (Debian's
# etcd-server 3.4) as a child process; install the package where it is missing.
etcd:
	@command -v etcd >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "make: installing etcd-server etcd-client (etcd is missing)"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client >/dev/null; }; \
		else echo "make: etcd missing (the arbiter tests need it); as root: apt-get install etcd-server etcd-client" >&2; fi; }

demo: install etcd
	$(VENV)/bin/colocore demo
	$(VENV)/bin/colocore demo --auto

# The networked-guest tests drive the guest with Debian's Redis tools (redis-cli,
# redis-benchmark) and measure redis-server beside it: install them where missing (as
# root; redis-py comes with the "test" extra).
test-tools: install
	@missing=; for t in redis-cli redis-benchmark redis-server; do \
		command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "make test: installing redis-tools redis-server (missing:$$missing)"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-tools redis-server >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-tools redis-server >/dev/null; }; \
		else echo "make test:$$missing missing; install redis-tools and redis-server (as root: apt-get install redis-tools redis-server)" >&2; fi; \
	fi

test: test-tools etcd
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS) tests

# Every fuzzer for FUZZ_SECONDS, the corpus kept under tests/fuzz/corpus/ (committed seeds
# are the seed-* files); what is found goes to FUZZ_FINDINGS with a reproducer
# (tests/fuzz/README.md). `make test` runs each for a few seconds.
fuzz: install
	mkdir -p $(FUZZ_FINDINGS)
	for f in qmp hmp; do $(PY) tests/fuzz/fuzz_framers.py $$f tests/fuzz/corpus/$$f \
		-max_total_time=$(FUZZ_SECONDS) -artifact_prefix=$(FUZZ_FINDINGS)/ || exit 1; done
	FUZZ_FINDINGS=$(FUZZ_FINDINGS) $(PY) tests/fuzz/fuzz_unit.py tests/fuzz/corpus/unit \
		-max_total_time=$(FUZZ_SECONDS) -artifact_prefix=$(FUZZ_FINDINGS)/ -rss_limit_mb=4096
	for m in incoming colo; do $(PY) tests/fuzz/fuzz_streams.py $$m --seconds $(FUZZ_SECONDS) \
		--findings $(FUZZ_FINDINGS) || exit 1; done

bench: install
	$(VENV)/bin/colocore bench pipeline

clean:
	rm -rf $(VENV) build *.egg-info colocore_ext/*.c colocore_ext/*.so colocore/guests/*.elf
