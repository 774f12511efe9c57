"""`make install` / `make uninstall` put `vmd` on PATH, and the README calls it
one way throughout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import REPO, run


def _make(target: str, sbindir: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["make", "-s", "-C", str(REPO), target, f"SBINDIR={sbindir}"], check=check,
               timeout=300)


def test_make_install_links_vmd_and_uninstall_removes_it(tmp_path: Path) -> None:
    sbin = tmp_path / "sbin"  # SBINDIR, so that the test leaves /usr/local alone
    _make("install", sbin)
    link = sbin / "vmd"
    assert link.is_symlink() and link.resolve() == (REPO / ".venv/bin/vmd").resolve()
    p = run([str(link), "--help"])
    assert p.stdout.startswith("usage: vmd"), p.stdout
    _make("install", sbin)  # again: idempotent
    _make("uninstall", sbin)
    assert not link.exists() and not link.is_symlink()
    # Someone else's vmd there is not removed.
    link.write_text("#!/bin/sh\n")
    p = _make("uninstall", sbin, check=False)
    assert p.returncode != 0 and "left alone" in p.stderr, p
    assert link.read_text() == "#!/bin/sh\n"


def test_readme_calls_vmd_one_way() -> None:
    """After `make install` the README's commands are plain `vmd …`, never the
    virtualenv path, and it says how to get there."""
    readme = (REPO / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```sh\n(.*?)```", readme, re.S))
    code = [line.split("#")[0] for line in blocks.splitlines()]  # comments may name it
    assert any(line.strip() == "make install" or "make setup install" in line for line in code)
    called = [line for line in code if re.search(r"\S*bin/vmd\b", line)]
    assert called == [], f"README calls vmd through a path; use the installed `vmd`: {called}"


def test_setup_remakes_a_virtualenv_copied_from_another_directory(tmp_path: Path) -> None:
    """`cp -a . /opt/vmd` copies .venv too: its scripts would run the old
    directory's python and import the old checkout's vmd (README, "Running
    under systemd"). `make setup` makes it again in place; one made here stays."""
    copy = tmp_path / "opt vmd"  # a blank in the path, as a careless admin may have
    copy.mkdir()
    (copy / "Makefile").write_text((REPO / "Makefile").read_text())
    pip = copy / ".venv/bin/pip"
    pip.parent.mkdir(parents=True)
    pip.write_text(f"#!{REPO}/.venv/bin/python\nimport pip\n")
    p = run(["make", "-s", "-C", str(copy), "venv-here"])
    assert "was made for another directory" in p.stdout and not (copy / ".venv").exists(), p
    pip.parent.mkdir(parents=True)
    pip.write_text(f"#!{copy}/.venv/bin/python\nimport pip\n")
    p = run(["make", "-s", "-C", str(copy), "venv-here"])
    assert p.stdout == "" and pip.exists(), p
    # A long path's scripts start with /bin/sh and name python on line 2.
    pip.write_text(f"#!/bin/sh\n'''exec' '{copy}/.venv/bin/python' \"$0\" \"$@\"\n' '''\n")
    p = run(["make", "-s", "-C", str(copy), "venv-here"])
    assert p.stdout == "" and pip.exists(), p
