"""The agent's timing rules with a fake clock: bursts cost one run, periodic tasks do
not pile up."""
from __future__ import annotations

import os

import pytest

from segguard.agent.schedule import BoundedRunner, Periodic, Scheduler


def test_first_request_runs_at_once_and_a_burst_costs_one_run():
    runs = []
    r = BoundedRunner(lambda reasons: runs.append(set(reasons)), min_interval=0.1)
    r.request("link-new")
    assert r.maybe_run(10.0) and runs == [{"link-new"}]
    for i in range(1000):
        r.request("link-new" if i % 2 else "nft-change")
    assert not r.maybe_run(10.05)  # within min_interval of the last run
    assert r.deadline() == 10.1
    assert r.maybe_run(10.1) and runs[-1] == {"link-new", "nft-change"}
    assert r.runs == 2 and not r.maybe_run(20.0)  # nothing pending, no max_interval


def test_max_interval_forces_a_run_without_requests():
    runs = []
    r = BoundedRunner(lambda reasons: runs.append(reasons), min_interval=0.1, max_interval=5.0, last_run=0.0)
    assert not r.maybe_run(4.9)
    assert r.maybe_run(5.0) and runs == [frozenset({"periodic"})]


def test_periodic_skips_missed_periods_and_can_be_disabled():
    n = []
    p = Periodic(lambda: n.append(1), every=10.0)
    p.start(0.0)
    assert not p.maybe_run(9.9)
    assert p.maybe_run(55.0) and n == [1] and p.next_at == 60.0
    off = Periodic(lambda: n.append(2), every=None)
    off.start(0.0)
    assert off.deadline() is None and not off.maybe_run(1e9)


def test_scheduler_timeout_is_the_earliest_deadline():
    s = Scheduler()
    r = s.add(BoundedRunner(lambda _: None, min_interval=1.0, last_run=0.0))
    p = s.add(Periodic(lambda: None, every=30.0))
    p.start(0.0)
    assert s.timeout(0.0) == 30.0
    r.request("x")
    assert s.timeout(0.5) == 0.5
    assert s.run_due(1.0) == 1
    assert s.timeout(1.0, cap=5.0) == 5.0


def test_config_watcher_counts_only_what_load_config_reads(tmp_path):
    """A temporary file written next to a profile (then renamed over it) must not cost
    a reload of its own: that reload finds nothing and holds back the real one."""
    from segguard.agent.events import ConfigWatcher

    (tmp_path / "profiles").mkdir()
    w = ConfigWatcher(tmp_path)
    try:
        (tmp_path / "profiles" / "a.yaml.tmp").write_text("x")
        (tmp_path / "notes.txt").write_text("x")
        assert w.read() == 0
        os.replace(tmp_path / "profiles" / "a.yaml.tmp", tmp_path / "profiles" / "a.yaml")
        assert w.read() > 0
        (tmp_path / "site.yaml").write_text("x")
        assert w.read() > 0
        (tmp_path / "profiles" / "b.yml").write_text("x")
        assert w.read() > 0
        (tmp_path / "profiles" / "a.yaml").unlink()
        assert w.read() > 0
    finally:
        w.close()


def test_an_edit_right_after_a_bind_runs_at_once_a_second_edit_waits(tmp_path):
    from segguard.agent import Agent

    a = Agent(tmp_path, drift_every=None)
    runs = []
    a.runner.fn = runs.append  # the agent's real runner, without the reconcile behind it
    t = 100.0
    a.runner.request("link-new", urgent=True)
    assert a.runner.maybe_run(t)                       # the bind
    a.runner.request("config", urgent=a._config_urgent(t + 0.01))
    assert a.runner.maybe_run(t + 0.01)                # the edit 10 ms later: not held back
    a.runner.request("config", urgent=a._config_urgent(t + 0.02))
    assert not a.runner.maybe_run(t + 0.02)            # another edit 10 ms after that waits...
    assert a.runner.maybe_run(t + 0.01 + a.runner.min_interval)  # ...out the interval
    assert [sorted(r) for r in runs] == [["link-new"], ["config"], ["config"]]
    # a kernel that keeps refusing stretches the interval: then no edit jumps the queue
    a.runner.min_interval = 2.0
    assert not a._config_urgent(t + 10)


def test_deferred_runs_once_per_burst_when_it_settles_but_not_later_than_settle():
    from segguard.agent.schedule import Deferred

    runs: list[int] = []
    now = [0]  # milliseconds
    d = Deferred(lambda: runs.append(now[0]), 200, settle=2000)

    def step_to(until: int, request_every: int | None = None) -> None:
        while now[0] < until:
            now[0] += 50
            if request_every and now[0] % request_every == 0:
                d.request(now[0])
            d.maybe_run(now[0])

    d.request(0)
    step_to(500)
    assert runs == [200]  # a lone request: `delay` after it
    # a stream of requests every 100 ms for 5 s: a run every `settle`, not every `delay`
    step_to(5500, request_every=100)
    assert runs == [200, 2600, 4700], runs
    step_to(6000)
    assert runs == [200, 2600, 4700, 5700]  # the stream is over: `delay` after its last request


def test_deferred_without_settle_runs_delay_after_the_first_request():
    from segguard.agent.schedule import Deferred

    runs: list[int] = []
    d = Deferred(lambda: runs.append(t), 200)
    for t in (0, 100, 150, 200, 300, 400, 500):
        d.request(t)
        d.maybe_run(t)
    assert runs == [200, 500]  # 200 after 0; 200 after 300, the first request since


def test_the_drift_tick_reads_the_link_table_afresh_and_reconciles_a_difference(tmp_path, monkeypatch):
    from segguard.agent import Agent
    from segguard.host import HostFacts, rtnl
    from segguard.host.rtnl import Link

    kernel = {1: Link(1, "br0", None, "02:00:00:00:00:01"), 2: Link(2, "vnet0", 1, "fe:54:00:00:00:01")}
    monkeypatch.setattr(rtnl, "links", lambda: dict(kernel))  # what a fresh dump says

    class Table:  # the LinkMonitor's event-fed table
        links: dict = {}

        def snapshot(self):
            self.links = rtnl.links()

    a = Agent(tmp_path, drift_every=None)
    a.rec.topology._caps = HostFacts(vlan_filtering=True)  # the check runs in the loop: a reconcile request
    a.links = Table()
    a.links.snapshot()
    a._drift_tick()
    assert a.runner.pending == {"drift-check"}  # the table held what the kernel has
    a.runner.pending.clear()
    kernel[3] = Link(3, "vnet1", 1, "fe:54:00:00:00:02")  # a tap whose events were missed
    a._drift_tick()
    assert a.runner.pending == {"drift-check", "link-resync"} and 3 in a.links.links


def test_the_drift_childs_link_answer_resyncs_the_table(tmp_path):
    """The forked checker (hosts without a VLAN layer) answers 'L' when the event-fed
    link table differs from a fresh dump: the loop reads the table again and reconciles."""
    import selectors

    from segguard.agent import Agent

    class Table:
        snapshots = 0
        links: dict = {}

        def snapshot(self):
            self.snapshots += 1

    a = Agent(tmp_path, drift_every=None)
    a.links = Table()
    a.sel = selectors.DefaultSelector()
    r, w = os.pipe()
    a.sel.register(r, selectors.EVENT_READ, "drift-child")
    pid = os.fork()
    if pid == 0:  # the checker: it already answered
        os._exit(0)
    os.write(w, b"L")
    os.close(w)
    a._checker = (pid, r, a.rec.generation, 0.0)
    a._drift_answer()
    assert a.links.snapshots == 1 and a.runner.pending == {"link-resync"} and a._checker is None


def test_when_quiet_waits_for_a_lull():
    from segguard.agent.schedule import WhenQuiet

    runs = []
    q = WhenQuiet(lambda: runs.append(1), quiet=2.0)
    assert not q.maybe_run(5.0) and q.deadline() is None  # never touched: never runs
    q.touch(0.0)
    q.touch(1.5)  # a reconcile meanwhile starts the quiet period over
    assert not q.maybe_run(3.0) and q.deadline() == 3.5
    assert q.maybe_run(3.5) and q.deadline() is None and runs == [1]
    assert not q.maybe_run(10.0)  # once per lull
    q.touch(11.0, at_once=True)
    assert q.deadline() == 11.0 and q.maybe_run(11.0) and runs == [1, 1]


@pytest.mark.parametrize("pending", [set(), {"nft-change"}, {"drift-check", "link-new"}])
def test_a_collections_answer_waits_for_a_reconcile_that_doubts_the_table(tmp_path, pending):
    """A collection's rebuild is encoded from what the agent thinks the kernel holds.
    If another writer changed the table meanwhile (an nft event, a drift check's '!'),
    the reconcile due for it runs first and the answer is dropped: what is left is
    collected later. Otherwise the answer is committed (finish_collect)."""
    import selectors

    from segguard.agent import Agent
    from segguard.agent.log import Log
    from segguard.child import fork_child

    logged = []

    class Recording(Log):
        def info(self, event, **kw):
            logged.append(event)

    a = Agent(tmp_path, drift_every=None, log=Recording())
    a.sel = selectors.DefaultSelector()
    finished = []
    a.rec.finish_collect = lambda job, ok, answer: finished.append((ok, answer))
    child = fork_child(lambda: "encoded")
    a.sel.register(child.fd, selectors.EVENT_READ, "collect-child")

    class Job:
        ports = ["vnet9"]
    a._collecting = (Job(), child)
    a.runner.pending = set(pending)
    a._collected()
    assert a._collecting is None and not a.sel.get_map()
    if pending & {"nft-change", "drift-check"}:
        assert finished == [] and "leftover-collect-moot" in logged
    else:
        assert finished == [(True, "encoded")] and "leftover-collect-moot" not in logged
