# The two commands a user needs: `make run` and `make test`. Both do all set-up
# on a fresh Debian machine (root): system packages, then a virtualenv in .venv.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PKGS := fuse3 libfuse3-dev pkg-config e2fsprogs util-linux python3-libnbd
# The NBD servers the remote-plex tests start (tests/test_nbd.py), and fio, which
# the tests under load run (verify under writes, crashes under fio verify=crc32c).
TEST_PKGS := fio qemu-utils nbdkit
BENCH_PKGS := fio qemu-system-common qemu-utils nbdkit
# libnbd's Python binding, as Debian installs it (python3-libnbd).
NBD_PY := /usr/lib/python3/dist-packages
NBD_LINKED := $(VENV)/.nbd-linked
CONFIG ?= config/vmd.yaml
# `make install` puts the command on root's PATH as a link into this checkout's
# virtualenv (so the link follows `make setup` here, and `make uninstall` undoes it).
PREFIX ?= /usr/local
SBINDIR ?= $(PREFIX)/sbin

.PHONY: run test test-slow bench bench-full docs setup venv-here sysdeps testdeps benchdeps clean install uninstall

# $(call apt_install,WHAT,PACKAGES): install only what is missing, so that a
# second `make` is instant and offline.
define apt_install
	@missing=""; for p in $(2); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(1):$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

run: setup
	$(VENV)/bin/vmd daemon -c $(CONFIG)

test: setup testdeps
	$(VPY) -m pytest -q tests

# The long versions of the crash loops (pytest marker `slow`), left out of `make test`.
test-slow: setup testdeps
	$(VPY) -m pytest -q -m slow tests

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

# About 13 minutes; bench-full runs the long form (about 32).
bench: setup benchdeps
	$(VPY) bench/run.py

bench-full: setup benchdeps
	$(VPY) bench/run.py --full

setup: sysdeps venv-here $(STAMP) $(NBD_LINKED)

# A .venv copied along with the checkout (`cp -a . /opt/vmd`) still runs the
# old directory's python and imports the old checkout's vmd (its scripts'
# shebangs and the editable install name it): make it again here.
venv-here:
	@if [ -e $(VENV)/bin/pip ] && ! head -2 $(VENV)/bin/pip | grep -qF -e "#!$(CURDIR)/$(VENV)/bin/python" -e "'$(CURDIR)/$(VENV)/bin/python'"; then \
	  echo "$(VENV) was made for another directory; making it again in $(CURDIR)"; \
	  rm -rf $(VENV); \
	fi

sysdeps:
	$(call apt_install,system packages,$(APT_PKGS))

testdeps:
	$(call apt_install,test packages,$(TEST_PKGS))

benchdeps:
	$(call apt_install,benchmark packages,$(BENCH_PKGS))

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The virtualenv sees libnbd through links to Debian's two files of it: pip
# has no libnbd, --system-site-packages would give the site of whichever
# python3 made the venv (not Debian's when it is pyenv's), and a .pth of the
# whole dist-packages would slip every Debian Python package into the venv.
$(NBD_LINKED): $(STAMP)
	@site=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	ln -sfn $(NBD_PY)/nbd.py $$site/nbd.py; \
	for so in $(NBD_PY)/libnbdmod.cpython-*.so; do ln -sfn $$so $$site/; done
	@$(VPY) -c 'import nbd' || { echo "$(VPY) cannot import libnbd from $(NBD_PY) (python3-libnbd is built for Debian's python3; make the venv with it: make clean setup PY=/usr/bin/python3)" >&2; exit 1; }
	touch $@

clean:
	rm -rf $(VENV) var bench/results
