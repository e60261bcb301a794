"""Reloading a config with the previous one at hand re-parses only the files whose bytes
changed, and gives exactly what a fresh load gives: same profiles, same errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from segguard.compile import compile_plan
from segguard.config.validate import load_config
from segguard.errors import ConfigError
from segguard.host import HostFacts

SITE = """\
domain_controllers: [10.30.0.10]
management: {networks: [10.30.250.0/24], vlans: [250]}
groups:
  db: [10.30.0.20]
"""


def prof(i: int, port: int = 1433, mac: str | None = None) -> str:
    return (f"name: p{i}\nbridge: br0\nvlan: 30\nguests:\n  - name: g{i}\n"
            f"    mac: \"{mac or f'52:54:00:00:00:{i:02x}'}\"\n    port: vnet{i}\n    ipv4: [10.30.1.{i}]\n"
            f"egress:\n  - {{to: db, proto: tcp, ports: [{port}]}}\n")


@pytest.fixture
def cfgdir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "site.yaml").write_text(SITE)
    for i in range(1, 4):
        (tmp_path / "profiles" / f"p{i}.yaml").write_text(prof(i))
    return tmp_path


def test_unchanged_files_are_reused_and_the_result_is_a_fresh_load(cfgdir):
    first = load_config(cfgdir)
    (cfgdir / "profiles" / "p2.yaml").write_text(prof(2, port=1434))
    again = load_config(cfgdir, previous=first)
    reused = [a is b for a, b in zip(first.profiles, again.profiles)]
    assert reused == [True, False, True]
    assert again.profiles[1].egress[0].ports != first.profiles[1].egress[0].ports
    fresh = load_config(cfgdir)
    assert compile_plan(again, HostFacts()).to_json() == compile_plan(fresh, HostFacts()).to_json()


def test_a_changed_site_reparses_every_profile(cfgdir):
    first = load_config(cfgdir)
    (cfgdir / "site.yaml").write_text(SITE.replace("10.30.0.20", "10.30.0.21"))
    again = load_config(cfgdir, previous=first)
    assert not any(a is b for a, b in zip(first.profiles, again.profiles))
    # the group's new address reaches profiles whose files did not change
    assert [str(p) for p in again.profiles[0].egress[0].peers] == ["10.30.0.21/32"]


def test_cross_file_checks_still_see_reused_profiles(cfgdir):
    first = load_config(cfgdir)
    (cfgdir / "profiles" / "p3.yaml").write_text(prof(3, mac="52:54:00:00:00:01"))  # p1's MAC
    with pytest.raises(ConfigError) as err:
        load_config(cfgdir, previous=first)
    assert [str(p) for p in err.value.problems] == [
        "profiles/p3.yaml:6: guests[0].mac: MAC 52:54:00:00:00:01 is also used by profiles/p1.yaml:6"]


def test_a_broken_edit_is_reported_with_its_line_despite_previous(cfgdir):
    first = load_config(cfgdir)
    (cfgdir / "profiles" / "p2.yaml").write_text(prof(2).replace("ports: [1433]", "ports: [70000]"))
    with pytest.raises(ConfigError) as err:
        load_config(cfgdir, previous=first)
    assert [p.file for p in err.value.problems] == ["profiles/p2.yaml"] and err.value.problems[0].line == 10


def test_removed_and_added_files(cfgdir):
    first = load_config(cfgdir)
    (cfgdir / "profiles" / "p1.yaml").unlink()
    (cfgdir / "profiles" / "p4.yaml").write_text(prof(4))
    again = load_config(cfgdir, previous=first)
    assert [lp.name for lp in again.profiles] == ["p2", "p3", "p4"]
    assert again.profiles[0] is first.profiles[1] and again.profiles[1] is first.profiles[2]
