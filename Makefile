# The two commands a user needs: `make run` and `make test`. Both do all set-up
# on a fresh Debian machine (root): system packages, then a virtualenv in .venv.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PKGS := fuse3 libfuse3-dev pkg-config e2fsprogs util-linux
BENCH_PKGS := fio qemu-system-common qemu-utils
CONFIG ?= config/vmd.yaml
# `make install` puts the command on root's PATH as a link into this checkout's
# virtualenv (so the link follows `make setup` here, and `make uninstall` undoes it).
PREFIX ?= /usr/local
SBINDIR ?= $(PREFIX)/sbin

.PHONY: run test bench docs setup sysdeps benchdeps clean install uninstall

run: setup
	$(VENV)/bin/vmd daemon -c $(CONFIG)

test: setup
	$(VPY) -m pytest -q tests

# The command reference, from the parser and vmd/errors.py (tests/test_docs.py
# fails when the committed file differs).
docs: setup
	$(VPY) -m vmd.cli_docs > docs/commands.md.new && mv docs/commands.md.new docs/commands.md

install: setup
	mkdir -p $(DESTDIR)$(SBINDIR)
	ln -sfn $(CURDIR)/$(VENV)/bin/vmd $(DESTDIR)$(SBINDIR)/vmd

# Removes the link only if it is this checkout's, never another installed vmd.
uninstall:
	@link=$(DESTDIR)$(SBINDIR)/vmd; \
	if [ "$$(readlink $$link)" = "$(CURDIR)/$(VENV)/bin/vmd" ]; then rm -f $$link; \
	elif [ -e $$link ] || [ -L $$link ]; then echo "$$link is not a link to $(CURDIR)/$(VENV)/bin/vmd; left alone" >&2; exit 1; fi

bench: setup benchdeps
	$(VPY) bench/run.py

setup: sysdeps $(STAMP)

# Install only what is missing, so that a second `make` is instant and offline.
sysdeps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

benchdeps:
	@missing=""; for p in $(BENCH_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing benchmark packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) var bench/results
