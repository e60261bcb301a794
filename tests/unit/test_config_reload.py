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


# ---- told which files changed (the agent's inotify names) ----------------------------

def _fresh_equal(cfg, cfgdir) -> None:
    fresh = load_config(cfgdir)
    assert [lp.name for lp in cfg.profiles] == [lp.name for lp in fresh.profiles]
    assert cfg.files == fresh.files and cfg.digests == fresh.digests
    assert compile_plan(cfg, HostFacts()).to_json() == compile_plan(fresh, HostFacts()).to_json()


def test_told_reload_reads_only_the_named_files(cfgdir):
    first = load_config(cfgdir)
    (cfgdir / "profiles" / "p2.yaml").write_text(prof(2, port=1434))
    # p3 changed too, but nobody said so: it is not read (inotify would have named it)
    (cfgdir / "profiles" / "p3.yaml").write_text(prof(3, port=1435))
    again = load_config(cfgdir, previous=first, changed={"p2.yaml"})
    assert [a is b for a, b in zip(first.profiles, again.profiles)] == [True, False, True]
    assert again.profiles[1].egress[0].ports == ((1434, 1434),)
    # named as it is: the same config a fresh load gives
    last = load_config(cfgdir, previous=again, changed={"p3.yaml"})
    _fresh_equal(last, cfgdir)


def test_told_reload_of_added_removed_and_renamed_files(cfgdir):
    first = load_config(cfgdir)
    (cfgdir / "profiles" / "p1.yaml").unlink()
    (cfgdir / "profiles" / "p4.yaml").write_text(prof(4))
    (cfgdir / "profiles" / "p3.yaml").rename(cfgdir / "profiles" / "a3.yml")
    again = load_config(cfgdir, previous=first, changed={"p1.yaml", "p4.yaml", "p3.yaml", "a3.yml", "x.swp"})
    assert [lp.name for lp in again.profiles] == ["p2", "p4", "p3"]
    assert again.profiles[0] is first.profiles[1]
    _fresh_equal(again, cfgdir)


def test_told_reload_still_runs_cross_checks_when_guests_change(cfgdir):
    """Only the named file is read; its new MAC clashes with a file that was not."""
    first = load_config(cfgdir)
    (cfgdir / "profiles" / "p3.yaml").write_text(prof(3, mac="52:54:00:00:00:01"))
    with pytest.raises(ConfigError) as err:
        load_config(cfgdir, previous=first, changed={"p3.yaml"})
    assert [str(p) for p in err.value.problems] == [
        "profiles/p3.yaml:6: guests[0].mac: MAC 52:54:00:00:00:01 is also used by profiles/p1.yaml:6"]


def test_told_reload_skips_cross_checks_only_when_nothing_they_read_changed(cfgdir, monkeypatch):
    from segguard.config import validate

    first = load_config(cfgdir)
    calls = []
    real = validate._cross_checks
    monkeypatch.setattr(validate, "_cross_checks", lambda *a: calls.append(1) or real(*a))
    (cfgdir / "profiles" / "p2.yaml").write_text(prof(2, port=1434))  # rules only
    again = load_config(cfgdir, previous=first, changed={"p2.yaml"})
    assert calls == []
    (cfgdir / "profiles" / "p2.yaml").write_text(prof(2, port=1434).replace("10.30.1.2", "10.30.1.99"))
    load_config(cfgdir, previous=again, changed={"p2.yaml"})
    assert calls == [1]


def test_told_reload_with_a_broken_file_names_its_line(cfgdir):
    first = load_config(cfgdir)
    (cfgdir / "profiles" / "p2.yaml").write_text(prof(2).replace("ports: [1433]", "ports: [70000]"))
    with pytest.raises(ConfigError) as err:
        load_config(cfgdir, previous=first, changed={"p2.yaml"})
    assert [(p.file, p.line) for p in err.value.problems] == [("profiles/p2.yaml", 10)]


def test_site_yaml_among_the_names_means_a_full_load(cfgdir):
    first = load_config(cfgdir)
    (cfgdir / "site.yaml").write_text(SITE.replace("10.30.0.20", "10.30.0.21"))
    again = load_config(cfgdir, previous=first, changed={"site.yaml"})
    assert not any(a is b for a, b in zip(first.profiles, again.profiles))
    assert [str(p) for p in again.profiles[0].egress[0].peers] == ["10.30.0.21/32"]


def test_config_watcher_names_the_files_and_says_when_it_cannot(cfgdir):
    import os

    from segguard.agent.events import ConfigWatcher

    w = ConfigWatcher(cfgdir)
    try:
        assert w.take() is None  # what profiles/ held before the watch was not seen arriving
        (cfgdir / "profiles" / "p2.yaml").write_text(prof(2, port=1434))
        tmp = cfgdir / "profiles" / ".p3.yaml.tmp"
        tmp.write_text(prof(3, port=1435))
        os.rename(tmp, cfgdir / "profiles" / "p3.yaml")
        (cfgdir / "profiles" / "notes.txt").write_text("x")
        assert w.read() > 0
        assert w.take() == {"p2.yaml", "p3.yaml"}  # not the temp file, not notes.txt
        assert w.take() == set()
        (cfgdir / "site.yaml").write_text(SITE)
        w.read()
        assert w.take() is None
    finally:
        w.close()


def test_names_of_a_failed_reload_count_again(cfgdir, tmp_path):
    """Two files broken, one fixed: the reload after the fix must read both (the
    agent puts a failed reload's names back into the watcher)."""
    from segguard.agent.reconcile import Reconciler
    from segguard.agent.events import ConfigWatcher

    class Log:
        def info(self, *a, **k): pass
        warning = error = info

    w = ConfigWatcher(cfgdir)
    rec = Reconciler(cfgdir, Log())
    try:
        assert rec.load(changed=w.take())
        good = rec.config
        bad = prof(1).replace("ports: [1433]", "ports: [70000]")
        (cfgdir / "profiles" / "p1.yaml").write_text(bad)
        (cfgdir / "profiles" / "p2.yaml").write_text(prof(2).replace("ports: [1433]", "ports: [70001]"))
        w.read()
        names = w.take()
        assert names == {"p1.yaml", "p2.yaml"}
        assert not rec.load(changed=names)
        w.put_back(names)
        (cfgdir / "profiles" / "p2.yaml").write_text(prof(2))
        w.read()
        assert not rec.load(changed=w.take())  # p1 is still broken: read, and reported
        assert rec.config is good and any("p1.yaml:10" in p for p in rec.config_error)
    finally:
        w.close()


def test_told_reload_still_reads_symlinked_files(cfgdir, tmp_path):
    """A profile that is a symlink to a file elsewhere: editing the target raises no
    event in profiles/, so a told reload reads it anyway (and a symlinked site.yaml
    makes every reload a full one)."""
    elsewhere = tmp_path / "managed"
    elsewhere.mkdir()
    target = elsewhere / "p2.yaml"
    target.write_text(prof(2))
    (cfgdir / "profiles" / "p2.yaml").unlink()
    (cfgdir / "profiles" / "p2.yaml").symlink_to(target)
    first = load_config(cfgdir)
    assert first.links == {"p2.yaml"}
    target.write_text(prof(2, port=1434))
    again = load_config(cfgdir, previous=first, changed=set())
    assert again.profiles[1].egress[0].ports == ((1434, 1434),)
    assert again.profiles[0] is first.profiles[0] and again.profiles[2] is first.profiles[2]
    site_target = elsewhere / "site.yaml"
    site_target.write_text(SITE)
    (cfgdir / "site.yaml").unlink()
    (cfgdir / "site.yaml").symlink_to(site_target)
    third = load_config(cfgdir, previous=again, changed=set())
    site_target.write_text(SITE.replace("10.30.0.20", "10.30.0.21"))
    fourth = load_config(cfgdir, previous=third, changed=set())
    assert [str(p) for p in fourth.profiles[0].egress[0].peers] == ["10.30.0.21/32"]


class _Log:
    def __init__(self):
        self.events = []

    def info(self, event, **k):
        self.events.append((event, k))
    warning = error = info


def test_the_agents_first_load_runs_in_a_child_and_is_the_same_config(cfgdir, monkeypatch):
    """The first load is parsed in a fork and handed back pickled (its garbage stays in
    the child); what arrives compiles to the plan a load in process gives, and the
    next edit's reload reuses its unchanged profiles as it would its own."""
    from segguard import child
    from segguard.agent import reconcile
    from segguard.agent.reconcile import Reconciler

    children, in_parent = [], []
    real, real_load = child.result_of_child, reconcile.load_config
    monkeypatch.setattr(child, "result_of_child", lambda fn: children.append(fn) or real(fn))
    # counted in this process only: the child's calls land in the child's copy of the list
    monkeypatch.setattr(reconcile, "load_config", lambda *a, **k: in_parent.append(1) or real_load(*a, **k))
    rec = Reconciler(cfgdir, _Log())
    rec.load_in_child = True
    assert rec.load() and len(children) == 1
    assert in_parent == [], "the first load was parsed in the parent"
    fresh = load_config(cfgdir)
    assert compile_plan(rec.config, HostFacts()).to_json() == compile_plan(fresh, HostFacts()).to_json()
    first = rec.config
    (cfgdir / "profiles" / "p2.yaml").write_text(prof(2, port=1434))
    assert rec.load() and len(children) == 1 and in_parent == [1], "only the first load forks"
    assert [a is b for a, b in zip(first.profiles, rec.config.profiles)] == [True, False, True]


def test_a_bad_first_load_in_a_child_is_reported_with_its_file_and_line(cfgdir):
    from segguard.agent.reconcile import Reconciler

    (cfgdir / "profiles" / "p3.yaml").write_text(prof(3).replace("ports: [1433]", "ports: [70000]"))
    log = _Log()
    rec = Reconciler(cfgdir, log)
    rec.load_in_child = True
    assert not rec.load() and rec.config is None
    assert any("p3.yaml:10" in p for p in rec.config_error), rec.config_error
    assert [e for e, _ in log.events] == ["config-invalid"]


def test_result_of_child_hands_back_values_and_says_why_it_could_not():
    import os

    from segguard.child import result_of_child

    ok, got = result_of_child(lambda: {"pid": os.getpid()})
    assert ok and got["pid"] != os.getpid(), "run in another process"

    def boom():
        raise ValueError("no")
    assert result_of_child(boom) == (False, "ValueError('no')")
    ok, why = result_of_child(lambda: (lambda: 1))
    assert not ok and "pickle" in why.lower(), why  # an unpicklable result is no result
    ok, why = result_of_child(lambda: os._exit(3))
    assert not ok and "sent nothing" in why, why
