# flyproxy: `make run` (offline demo) and `make test` (everything) on a fresh Debian 12, as root.
SHELL := /bin/bash
PYTHON := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python

# Debian packages: what the product needs at run time, and what the tests drive.
RUNTIME_DEBS := python3-jsonschema python3-systemd python3-prometheus-client python3-pycares
BPF_DEBS := python3-bpfcc bpftool iproute2
TEST_DEBS := python3-venv python3-pip python3-pytest python3-pytest-timeout python3-testinfra \
	python3-uvloop \
	python3-yaml python3-hypothesis python3-dnspython python3-setuptools python3-wheel netcat-openbsd systemd debootstrap systemd-container openssh-client \
	ansible-core ansible-lint vagrant
BENCH_DEBS := haproxy nginx-light libnginx-mod-stream iperf3 wrk python3-matplotlib dnsmasq-base
ALL_DEBS := $(RUNTIME_DEBS) $(BPF_DEBS) $(TEST_DEBS)

.PHONY: help run test bench appliance-test deps deps-runtime venv bpf headers install clean

# `make install` lays the appliance out for Debian's /usr/bin/python3 (no downloads):
# code in /usr/lib/flyproxy, the entry point in /usr/bin, units in /lib/systemd/system.
DESTDIR ?=
LIBDIR := $(DESTDIR)/usr/lib/flyproxy

help:
	@echo "make run    - offline demo: the challenge's apps on local echo targets"
	@echo "make test   - install what the tests need, then run every test"
	@echo "make bpf    - compile and verify the sk_lookup program without attaching it"
	@echo "make bench  - measure flyproxy against HAProxy, nginx and systemd-socket-proxyd"
	@echo "make appliance-test - provision a Debian 12 container with Ansible, check it with testinfra"
	@echo "make install - install the appliance into DESTDIR (default /)"

# Install only the packages that are missing (apt-get update only when something is).
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

deps-runtime:
	$(call apt_install,$(RUNTIME_DEBS))

deps:
	$(call apt_install,$(ALL_DEBS))
	@bash bpf/kernel-headers.sh

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: deps $(VENV)/.done

run: deps-runtime
	$(PYTHON) -m appliance demo

test: venv
	$(VPY) -m pytest

# flyproxy side by side with HAProxy, nginx stream and systemd-socket-proxyd (about 10 min).
# Writes docs/bench/results.md, results.json and chart.png.
bench: deps
	$(call apt_install,$(BENCH_DEBS))
	$(PYTHON) tests/bench/bench.py

# Boot a Debian 12 container, provision it with the playbook (twice: the second run must
# change nothing), check it with testinfra, tear it down. Also part of `make test`.
appliance-test: venv
	$(VPY) -m pytest tests/infra

bpf: deps
	$(PYTHON) -m appliance bpf build

install:
	install -d $(LIBDIR)/bpf $(DESTDIR)/usr/bin \
		$(DESTDIR)/lib/systemd/system $(DESTDIR)/etc/flyproxy $(DESTDIR)/usr/share/doc/flyproxy
	install -m 0644 appliance/*.py appliance/*.json -t $(LIBDIR)/appliance -D
	for pkg in bpf cli dataplane service; do \
		install -m 0644 -D -t $(LIBDIR)/appliance/$$pkg appliance/$$pkg/*.py; done
	install -m 0644 bpf/steer.c $(LIBDIR)/appliance/bpf/steer.c
	install -m 0755 bpf/kernel-headers.sh $(LIBDIR)/bpf/
	install -m 0755 systemd/flyproxy $(DESTDIR)/usr/bin/flyproxy
	install -m 0644 systemd/*.socket systemd/*.service systemd/*.timer $(DESTDIR)/lib/systemd/system/
	install -m 0644 README.md NOTES.md $(DESTDIR)/usr/share/doc/flyproxy/
	[ -e $(DESTDIR)/etc/flyproxy/config.json ] || install -m 0644 config.json $(DESTDIR)/etc/flyproxy/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
