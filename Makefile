# flyproxy: `make run` (offline demo) and `make test` (everything) on a fresh Debian 12, as root.
SHELL := /bin/bash
PYTHON := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python

# Debian packages: what the product needs at run time, and what the tests drive (every
# package a test needs: under CI=true a skip fails the run, tests/conftest.py). chromium
# (headless, with a font) renders the status page in tests/test_status_page.py.
RUNTIME_DEBS := python3-jsonschema python3-systemd python3-prometheus-client python3-pycares
BPF_DEBS := python3-bpfcc bpftool iproute2
TEST_DEBS := python3-venv python3-pip python3-pytest python3-pytest-timeout python3-testinfra \
	python3-uvloop chromium fonts-dejavu-core \
	python3-yaml python3-hypothesis python3-dnspython python3-setuptools python3-wheel netcat-openbsd systemd debootstrap systemd-container openssh-client \
	ansible-core ansible-lint vagrant \
	haproxy nginx-light libnginx-mod-stream
# DEB_LINT=0: build without running lintian (a VM building its own package)
DEB_LINT ?= 1
DEB_BUILD_DEBS := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-jsonschema dpkg-dev $(if $(filter 0,$(DEB_LINT)),,lintian)
BENCH_DEBS := iperf3 wrk python3-matplotlib dnsmasq-base
# `vagrant up` for real (tests/vm): libvirt without libvirt-daemon-system, whose default
# network would start on the host; the box is built with debootstrap, fdisk and grub.
VM_DEBS := vagrant-libvirt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
	qemu-system-x86 qemu-utils dnsmasq-base iptables rsync fdisk apt-utils dpkg-dev
ALL_DEBS := $(RUNTIME_DEBS) $(BPF_DEBS) $(TEST_DEBS) $(VM_DEBS)

.PHONY: help run test check bench appliance-test fleet-test vagrant-test deps deps-runtime venv bpf headers install clean deb


help:
	@echo "make run    - offline demo: the challenge's apps on local echo targets"
	@echo "make test   - install what the tests need, then run every test"
	@echo "make check  - the fast loop (about 4 min): no container, VM, booted systemd or BPF"
	@echo "make bpf    - compile and verify the sk_lookup program without attaching it"
	@echo "make bench  - measure flyproxy against HAProxy, nginx and systemd-socket-proxyd"
	@echo "make appliance-test - provision a Debian 12 container with Ansible, check it with testinfra"
	@echo "make fleet-test - three appliances behind one address, rolled out under traffic (about 40 min)"
	@echo "make vagrant-test - vagrant up the project's Vagrantfile in a libvirt VM, check it (about 30 min)"
	@echo "make deb    - build the Debian package into build/ and lint it"
	@echo "make install - build the Debian package and install it (apt-get: its dependencies too)"

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

# Everything but the full fleet lab (make fleet-test); its two-host version is in.
test: venv deb
	$(VPY) -m pytest -m "not fleet"

# The fast loop while changing code (about 4 minutes on 2 cores): unit tests, per-port
# proxies, config, workers, upgrades in per-port mode. `make test` before a commit lands.
check: venv
	$(VPY) -m pytest -q -m "not root and not systemd and not vm" --ignore=tests/infra \
		--ignore=tests/vm tests

# flyproxy side by side with HAProxy, nginx stream and systemd-socket-proxyd (about 10 min).
# Writes docs/bench/results.md, results.json and chart.png.
bench: deps
	$(call apt_install,$(BENCH_DEBS))
	$(PYTHON) tests/bench/bench.py

# Boot a Debian 12 container, provision it with the playbook (twice: the second run must
# change nothing), check it with testinfra, tear it down. Also part of `make test`.
appliance-test: venv deb
	$(VPY) -m pytest tests/infra

# Three booted appliances behind one anycast-like address (a router namespace with a
# multipath route), each provisioned by the playbook; rollouts under 300 held connections
# and a new one every 10 ms, and a route withdrawal. The table: build/fleet/*.md.
fleet-test: venv deb
	$(VPY) -m pytest -m fleet tests/fleet
	@cat build/fleet/test_three_hosts.md

# `vagrant up` with the project's Vagrantfile on a Debian 12 box built here (cached in
# /var/cache/flyproxy), in a network namespace of its own; checks, then destroys it.
# Also part of `make test`.
vagrant-test: venv deb
	$(VPY) -m pytest tests/vm

# The Debian package (debian/): built from a copy of the tracked tree with Debian's own
# python3 (a PATH without pyenv and the like), then checked by lintian: no error, no warning.
deb:
	$(call apt_install,$(DEB_BUILD_DEBS))
	rm -rf build/deb && mkdir -p build/deb/flyproxy
	if git rev-parse --git-dir >/dev/null 2>&1; then git ls-files -z --cached --others --exclude-standard; \
	else find . \( -name build -o -name .venv -o -name .git -o -name .vagrant -o -name __pycache__ \) \
		-prune -o \( -type f -o -type l \) -print0; fi | xargs -0 cp -P --parents -t build/deb/flyproxy
	rm -f build/flyproxy_*_all.deb
	cd build/deb/flyproxy && PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		dpkg-buildpackage -us -uc -b > ../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
	mv build/deb/flyproxy_*_all.deb build/
	[ "$(DEB_LINT)" = 0 ] || PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --fail-on error,warning build/flyproxy_*_all.deb
	@ls build/flyproxy_*_all.deb

bpf: deps
	$(PYTHON) -m appliance bpf build

install: deb
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ./build/flyproxy_*_all.deb

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
