# One command to set up and train, one to set up and test. Each target sets itself up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.phalanx-installed
ARGS   ?=

.PHONY: run test test-slow test-fast lint bench setup data clean gpu-pack gpu-check setup-xla test-xla test-torch211 test-slurm test-streaming test-ray test-netns

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Fashion-MNIST: the Debian package when missing (root on Debian), else phalanx explains what to do.
data: setup
	@$(PY) -m phalanx.data.fetch

run: data
	$(VENV)/bin/phalanx train $(ARGS)

test: data lint
	$(PY) -m pytest -q -m "not slow and not xla and not slurm and not ray and not streaming and not netns" $(ARGS)

# Further real launches (kept out of `make test` to hold it under 10 minutes); CI runs this lane too.
test-slow: data
	$(PY) -m pytest -q -m "slow and not xla and not slurm and not ray and not streaming and not netns" $(ARGS)

# Real jobs through SLURM's daemons, started on this machine by the tests (tests/slurm/conftest.py): Debian's
# slurm-wlm and munge are installed first when missing (root); without root the tests skip with one line.
test-slurm: data
	@if [ ! -x /usr/sbin/slurmctld ] && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; fi
	$(PY) -m pytest -q -m slurm tests/slurm $(ARGS)

# Two nodes on separate networks: network namespaces joined by a veth pair on a test-only subnet, made and removed
# by the tests (tests/netns/conftest.py); iproute2 is installed first when missing (root); without root they skip.
test-netns: data
	@if ! command -v ip >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; fi
	$(PY) -m pytest -q -m netns tests/netns $(ARGS)

# Ray Train workers on a local Ray cluster the tests start (2 CPUs) and stop: installs the `ray` extra first.
test-ray: data
	$(PY) -m pip install -q -e '.[ray]' || echo "test-ray: the ray extra could not be installed; tests/ray will skip"
	$(PY) -m pytest -q -m ray tests/ray $(ARGS)

# Shards from real servers on loopback: moto's S3 server and Python's HTTP server, started and stopped by the tests
# (tests/streaming/conftest.py); moto[server], s3fs and webdataset come with the dev extra.
test-streaming: data
	$(PY) -m pytest -q -m streaming tests/streaming $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

test-fast: data
	$(PY) -m pytest -q -m "not dist and not e2e and not slow and not xla and not slurm and not ray and not streaming and not netns" $(ARGS)

bench: data
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/time_to_accuracy.py $(ARGS)

# PyTorch/XLA in its own venv: torch_xla 2.9.0's binary needs torch 2.9.0 exactly (the main venv has a newer
# torch). Built from the package index once and kept: ~3 min, 7.2 GB, ~11 GB while installing (PyPI's torch is
# a CUDA build); --no-cache-dir spares the disk another ~4 GB of wheels that the kept venv makes useless. The
# tests run on PJRT's CPU client with 2 virtual devices (one SPMD mesh), not on a TPU.
XVENV  := .venv-xla
XPY    := $(XVENV)/bin/python
XSTAMP := $(XVENV)/.phalanx-installed

setup-xla: $(XSTAMP)

$(XSTAMP): pyproject.toml
	@test -x $(XPY) || $(PYTHON) -m venv $(XVENV)
	$(XPY) -m pip install -q --upgrade pip
	$(XPY) -m pip install -q --no-cache-dir -e '.[xla]' 'pytest>=7.4'
	@touch $(XSTAMP)

test-xla: $(XSTAMP)
	PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 $(XPY) -m pytest -q -m xla tests/xla $(ARGS)

# The fast and multi-process lanes under the GPU machine's torch (2.11, torchvision 0.26), in its own venv:
# what `make test` runs, against the oldest torch a lent GPU brings (a run of it found an ONNX export that only
# torch 2.14 could do). Not in CI: another ~6 GB venv of PyPI's CUDA build; ~3 min to build, ~6 min of tests.
TVENV  := .venv-torch211
TPY    := $(TVENV)/bin/python
TSTAMP := $(TVENV)/.phalanx-installed

$(TSTAMP): pyproject.toml
	@test -x $(TPY) || $(PYTHON) -m venv $(TVENV)
	$(TPY) -m pip install -q --upgrade pip
	$(TPY) -m pip install -q --no-cache-dir -e '.[dev]' torch==2.11.0 torchvision==0.26.0
	@touch $(TSTAMP)

test-torch211: $(TSTAMP) data
	$(TPY) -m pytest -q -m "not slow and not xla and not slurm and not ray and not netns" $(ARGS)

# On this machine: .gpu/ with what the offline GPU machine lacks (Fashion-MNIST, cp312 wheels).
gpu-pack: data
	PY=$(PY) bash benchmarks/gpu_pack.sh

# On the GPU machine, with .gpu/ carried: installs from .gpu/ only and prints one JSON line per check.
gpu-check:
	python3 benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
