# gho2kvm — the two set-up commands on a fresh Debian 12 machine:
#   make migrate    demo migration (configs/demo.yaml) through every step
#   make test       the whole test suite on the real tools
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml
IMAGE ?=
WORKERS ?= 1
SCHEDULER ?= local
LUIGID_PORT ?= 8082
LUIGID_DIR := var/luigid
DEMO_DISK := var/demo/xp-demo.vmdk
PYTEST_ARGS ?=

.PHONY: setup system venv migrate demo-disk test test-fast lint bench luigid luigid-stop clean plan report fuzz

setup: system venv

system:
	@sh scripts/setup-system.sh

venv: $(VENV)/.installed

# setup.py builds the C extension pipeline/gho/_native.c (gcc + python3-dev from scripts/setup-system.sh)
$(VENV)/.installed: pyproject.toml setup.py pipeline/gho/_native.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# PyPI's pip (Debian's strips distlib's Windows launchers, the real PE files the fake disks use)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

demo-disk: setup
	$(BIN)/python -m pipeline.app.fakedisk --force-tcg $(DEMO_DISK)

migrate: setup $(if $(filter configs/demo.yaml,$(CONFIG)),demo-disk) $(if $(filter configs/boot-demo.yaml,$(CONFIG)),libvirtd)
	$(BIN)/gho2kvm migrate --config $(CONFIG) $(if $(IMAGE),--image $(IMAGE)) --workers $(WORKERS) \
	  --scheduler $(SCHEDULER) $(if $(filter central,$(SCHEDULER)),--scheduler-url http://127.0.0.1:$(LUIGID_PORT))

plan: setup
	$(BIN)/gho2kvm plan --config $(CONFIG) $(if $(IMAGE),--image $(IMAGE))

report: setup
	$(BIN)/gho2kvm report --config $(CONFIG)

# the whole suite on the real tools (CI): appliance, libvirtd and the long fuzz runs included
test: setup
	GHO2KVM_FORCE_TCG=1 $(BIN)/pytest -q $(PYTEST_ARGS)

# the inner loop (< 2 min): no libguestfs appliance, no libvirtd, and only a small fixed-seed
# sample of the fuzz runs (tests/conftest.py marks the rest "slow")
test-fast: setup
	GHO2KVM_FORCE_TCG=1 $(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

# the long fuzz run: seeded GHO mutations (GHO_FUZZ_CASES, GHO_FUZZ_SEED) and hostile
# configs/.reg/VMDK sources (FUZZ_CASES per class)
FUZZ_CASES ?= 300
GHO_FUZZ_CASES ?= 2000
fuzz: setup
	GHO_FUZZ_CASES=$(GHO_FUZZ_CASES) $(BIN)/python -m tests.support.fuzz_gho
	$(BIN)/python -m tests.support.fuzz_ntfs
	GHO2KVM_FORCE_TCG=1 GHO2KVM_FUZZ_CASES=$(FUZZ_CASES) $(BIN)/pytest -q tests/test_fuzz_inputs.py

lint: setup
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports  # the layers ([tool.importlinter] in pyproject.toml)

# every benchmark, one table (var/bench/results.md); BENCH_QUICK=1 for a short check run,
# BENCH_IMAGES / BENCH_WORKERS for the many-images bench, BENCH=NAME… for some of them only
BENCH_IMAGES ?= $(if $(filter-out 0,$(BENCH_QUICK)),3,20)
BENCH_WORKERS ?= 2
BENCH ?=
bench: setup
	GHO2KVM_FORCE_TCG=1 BENCH_IMAGES=$(BENCH_IMAGES) BENCH_WORKERS=$(BENCH_WORKERS) $(BIN)/python -m bench.run $(BENCH)

luigid: setup
	@mkdir -p $(LUIGID_DIR)
	@if [ -f $(LUIGID_DIR)/luigid.pid ] && kill -0 $$(cat $(LUIGID_DIR)/luigid.pid) 2>/dev/null; then \
	  echo "luigid already running (pid $$(cat $(LUIGID_DIR)/luigid.pid))"; exit 0; fi; \
	nohup $(BIN)/luigid --address 127.0.0.1 --port $(LUIGID_PORT) \
	  --state-path $(LUIGID_DIR)/state.pickle >$(LUIGID_DIR)/luigid.log 2>&1 & echo $$! > $(LUIGID_DIR)/luigid.pid; \
	for i in $$(seq 50); do \
	  $(BIN)/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$(LUIGID_PORT)/api/graph', timeout=1)" \
	    2>/dev/null && { echo "luigid on http://127.0.0.1:$(LUIGID_PORT) (pid $$(cat $(LUIGID_DIR)/luigid.pid))"; exit 0; }; \
	  sleep 0.2; done; echo "luigid did not start; see $(LUIGID_DIR)/luigid.log" >&2; exit 1

luigid-stop:
	@if [ -f $(LUIGID_DIR)/luigid.pid ]; then pid=$$(cat $(LUIGID_DIR)/luigid.pid); \
	  kill $$pid 2>/dev/null || true; \
	  for i in $$(seq 50); do kill -0 $$pid 2>/dev/null || break; sleep 0.2; done; \
	  rm -f $(LUIGID_DIR)/luigid.pid; echo "luigid stopped (state in $(LUIGID_DIR)/state.pickle)"; \
	else echo "luigid not running"; fi

# a system libvirtd (qemu:///system) for configs/boot-demo.yaml on a machine without systemd (root)
# the systemd units of contrib/systemd/ (luigid, and a migrate run every 30 min), their paths
# rewritten to this checkout; /etc/default/gho2kvm written once (then it is yours). As root.
SYSTEMD_DIR ?= /etc/systemd/system
ENV_FILE ?= /etc/default/gho2kvm
.PHONY: install-service
install-service:
	@mkdir -p $(SYSTEMD_DIR) $(dir $(ENV_FILE))
	@for f in contrib/systemd/*.service contrib/systemd/*.timer; do \
	  sed -e 's|/opt/gho2kvm|$(CURDIR)|g' -e 's|/etc/default/gho2kvm|$(ENV_FILE)|g' $$f > $(SYSTEMD_DIR)/$$(basename $$f).tmp \
	  && mv $(SYSTEMD_DIR)/$$(basename $$f).tmp $(SYSTEMD_DIR)/$$(basename $$f) && echo "installed $(SYSTEMD_DIR)/$$(basename $$f)"; done
	@if [ -e $(ENV_FILE) ]; then echo "kept $(ENV_FILE)"; else \
	  sed 's|/opt/gho2kvm|$(CURDIR)|g' contrib/systemd/gho2kvm.env > $(ENV_FILE) && echo "wrote $(ENV_FILE)"; fi
	@if [ "$(SYSTEMD_DIR)" = /etc/systemd/system ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	  echo "now: systemctl enable --now gho2kvm-luigid.service gho2kvm-migrate.timer"; \
	else echo "(systemd is not running here: nothing reloaded)"; fi

.PHONY: libvirtd libvirtd-stop
libvirtd: setup
	$(BIN)/python -m pipeline.tools.libvirtd start

libvirtd-stop: setup
	$(BIN)/python -m pipeline.tools.libvirtd stop

clean:
	rm -rf var/work var/images var/bench var/luigid .pytest_cache .mypy_cache .ruff_cache
