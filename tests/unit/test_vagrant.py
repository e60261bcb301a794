"""The Vagrant lab's files parse: `vagrant validate` on vagrant/Vagrantfile and `bash -n`
on its scripts.  `vagrant up` itself needs a box download and a hypervisor, so it runs
on users' machines (vagrant/README.md), not here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"
SCRIPTS = sorted(VAGRANT_DIR.glob("*.sh"))
NO_VAGRANT = ("needs the vagrant binary; runs in CI and wherever ./dev.sh setup ran "
              "(it installs Debian's vagrant package)")

needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None, reason=NO_VAGRANT)


def validate(vagrant_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # --ignore-provider: with neither vagrant-libvirt nor VirtualBox installed, vagrant
    # finds no usable provider and refuses to validate at all.  Provider blocks are
    # still evaluated (a Ruby error in them fails), only their option names go unchecked.
    env = {
        **os.environ,
        "VAGRANT_CWD": str(vagrant_dir),
        "VAGRANT_HOME": str(tmp_path / "vagrant-home"),           # not ~/.vagrant.d
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"),        # not vagrant/.vagrant
        "VAGRANT_CHECKPOINT_DISABLE": "1",                        # no version check online
        "VAGRANT_NO_COLOR": "1",
    }
    return subprocess.run(["vagrant", "validate", "--ignore-provider"], env=env,
                          capture_output=True, text=True, timeout=120)


def broken_copy(tmp_path: Path, edit) -> Path:
    copy = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy, ignore=shutil.ignore_patterns(".vagrant"))
    vf = copy / "Vagrantfile"
    vf.write_text(edit(vf.read_text()))
    return copy


@needs_vagrant
def test_vagrantfile_validates(tmp_path: Path) -> None:
    res = validate(VAGRANT_DIR, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout


@needs_vagrant
@pytest.mark.parametrize("what, edit, message", [
    ("ruby syntax", lambda t: t + "\nend\n", "syntax error"),
    ("unknown setting", lambda t: t.replace('config.vm.hostname =', 'config.vm.hostnme ='),
     "hostnme"),
    ("error in a provider block",
     lambda t: t.replace("lv.nested = true", "lv.nested = no_such_thing"), "no_such_thing"),
    ("missing provisioner script",
     lambda t: t.replace('path: "run-lab.sh"', 'path: "run-lab-gone.sh"'), "run-lab-gone.sh"),
])
def test_validate_rejects_a_broken_vagrantfile(tmp_path: Path, what: str, edit, message: str) -> None:
    broken = broken_copy(tmp_path, edit)
    assert (broken / "Vagrantfile").read_text() != (VAGRANT_DIR / "Vagrantfile").read_text(), what
    res = validate(broken, tmp_path)
    assert res.returncode != 0, f"{what}: vagrant validate passed a broken Vagrantfile"
    assert message in res.stdout + res.stderr


def test_the_vagrantfile_names_scripts_that_exist() -> None:
    # the same check vagrant validate does, for machines without vagrant
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    for script in ("provision.sh", "run-lab.sh"):
        assert f'path: "{script}"' in text
        assert (VAGRANT_DIR / script).is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_with_bash_n(script: Path) -> None:
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_bash_n_catches_a_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text((VAGRANT_DIR / "run-lab.sh").read_text() + "\nif true; then\n")
    assert subprocess.run(["bash", "-n", str(bad)], capture_output=True).returncode != 0


def test_the_scripts_are_there() -> None:
    assert {p.name for p in SCRIPTS} >= {"provision.sh", "run-lab.sh", "nested-guest.sh"}
