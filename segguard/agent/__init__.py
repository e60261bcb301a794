"""The host agent: apply, then react to events (links, nftables changes, config edits,
SIGHUP), repair drift, verify on a schedule, and report.

It never fails open and never takes protection down: the kernel keeps the last table
it was given whatever happens to this process (crash, kill -9, SIGTERM, upgrade), a
restart that finds the kernel already holding the plan sends nothing, and only
`segguard remove --yes` deletes the table.
"""
from __future__ import annotations

import contextlib
import os
import resource
import selectors
import signal
import socket
import time
from pathlib import Path

from segguard.agent.log import Log

LEFTOVER_QUIET = 2.0  # seconds without a reconcile before unbound ports' leftovers are deleted
LEFTOVER_CAP = 64     # ports with leftovers past which they are deleted even without a lull


def _sd_notify(msg: str) -> None:
    """systemd Type=notify readiness: libvirt's units are ordered after us, and "after"
    means after READY=1, i.e. after the first apply, not after exec."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.send(msg.encode())
    except OSError:
        pass


class Agent:
    def __init__(self, config_dir: str | Path | None, metrics_addr: tuple[str, int] | None = None,
                 verify_every: float | None = None, drift_every: float | None = 30.0, min_interval: float = 0.05,
                 log: Log | None = None, leftover_quiet: float = LEFTOVER_QUIET):
        from segguard.agent.forked import ForkedWriter
        from segguard.agent.metrics import Metrics
        from segguard.agent.reconcile import Reconciler
        from segguard.agent.schedule import BoundedRunner, Deferred, Periodic, Scheduler, WhenQuiet
        from segguard.agent.verify import VerifyRounds

        self.log = log or Log()
        self.metrics = Metrics()
        self.metrics_addr = metrics_addr
        self.rec = Reconciler(config_dir, self.log, self.metrics)
        self.rec.load_in_child = True
        self.cfgwatch = None
        self.verify_results: dict = {}
        self.verifying: dict | None = None
        self.started = time.time()
        self.ready = False
        self.stop = False
        self.sched = Scheduler()
        self.base_interval = min_interval
        self.runner = self.sched.add(BoundedRunner(self._reconcile, min_interval))
        self.drift_every = drift_every
        self.drift_tick = self.sched.add(Periodic(self._drift_tick, drift_every))
        self.sel: selectors.BaseSelector | None = None
        self._checker: tuple[int, int, int, float] | None = None  # pid, read fd, generation, started
        self._collecting = None  # (reconcile.LeftoverCollection, child.Child) while a child encodes one
        self.plan_writer = ForkedWriter()  # the applied plan's file
        self.links = None  # events.LinkMonitor, once running
        # after the runner: a reconcile requested meanwhile runs before the next guest's verify
        self.verify_tick = self.sched.add(VerifyRounds(self._verify_guest, self._verify_targets, verify_every))
        # the applied plan's file (hook, status) trails a tap bind by a second instead of
        # costing the bind a serialization of the whole plan
        self.persist = self.sched.add(Deferred(lambda: self._persist(sync=False), 1.0))
        # the status file: 2 MB of JSON at 5,000 guests (~40 ms in the loop), written
        # when a burst is over, and at least every 2 s through a stream of taps (written
        # 0.2 s after the first event of each, it held up one bind in four at 5,000)
        self.state_writer = self.sched.add(Deferred(self._write_state, 0.2, settle=2.0))
        # an unbind leaves its port's interval-set elements (inert without a dispatch
        # element: apply/incremental.py says why); deleting one port's costs the kernel
        # up to ~0.5 s with 900 ports bound, so they are deleted by a rebuild of their
        # sets when the reconciles lull (encoded by a child, committed in ~50 ms)
        self.collector = self.sched.add(WhenQuiet(self._collect, leftover_quiet))
        self._reload = False

    # -- tasks ------------------------------------------------------------------------
    def _config_urgent(self, now: float) -> bool:
        """An edit waits out the runner's interval only right after another edit (the
        last run took in a config change): a burst of saves still costs one reload per
        interval, but the first edit after a tap's bind is not held back 50 ms."""
        r = self.runner
        return (r.min_interval <= self.base_interval
                and ("config" not in r.last_reasons or r.last_run is None or now - r.last_run >= r.min_interval))

    def _reconcile(self, reasons: frozenset[str]) -> None:
        if self._reload or "config" in reasons:
            # the watcher's names let the reload read only the edited files; SIGHUP
            # (or no watcher) reads everything
            changed = self.cfgwatch.take() if self.cfgwatch is not None else None
            if not self.rec.load(changed=None if self._reload else changed) and self.cfgwatch is not None:
                # the names are relative to the last good config: a failed load must
                # not forget them, or fixing one of two broken files would leave the
                # other one's old version in force
                self.cfgwatch.put_back(changed)
            self._reload = False
        outcome = self.rec.reconcile(reasons)
        # A refused or differing apply notifies nft listeners like any other change;
        # back off so a kernel that keeps refusing does not get a transaction per event.
        if outcome.action == "error":
            self.runner.min_interval = min(30.0, max(1.0, self.runner.min_interval * 2))
        else:
            self.runner.min_interval = self.base_interval
        if self.rec.dirty:
            self.persist.request(time.monotonic())
        self._reap()
        if self.rec.road == "full":
            self._trim()
        # the status file is a report: written off the event's path and merged over a
        # burst (at 5,000 guests it is 2 MB of JSON, ~40 ms, per reconcile)
        self.state_writer.request(time.monotonic())
        if left := len(self.rec.leftover_ports):
            # a backlog past the cap is collected even through a stream of events: the
            # kernel's sets must not grow without bound
            self.collector.touch(time.monotonic(), at_once=left > LEFTOVER_CAP)

    def _collect(self) -> None:
        """Unbound ports' leftovers, when no reconcile is waiting (or past the cap). The
        rebuild that deletes them is encoded by a forked child while the loop goes on
        (Reconciler.begin_collect); its answer is committed in the loop (_collected)."""
        from segguard.child import fork_child

        if self._collecting is not None:
            return  # its answer touches the collector again if more are left by then
        if self.runner.pending and len(self.rec.leftover_ports) <= LEFTOVER_CAP:
            self.collector.touch(time.monotonic())  # the reconcile first; it touches again
            return
        if self.sel is None:  # no loop to wait in
            self.rec.collect_leftover()
            self._after_collect()
            return
        job = self.rec.begin_collect()
        if job is None:  # nothing to encode apart: done (or nothing to do)
            self._after_collect()
            return
        try:
            child = fork_child(job.encode)
        except OSError as exc:
            self.log.warning("fork-failed", what="leftover collection", error=str(exc))
            self.rec.collect_leftover()
            self._after_collect()
            return
        self._collecting = (job, child)
        self.sel.register(child.fd, selectors.EVENT_READ, "collect-child")
        self.log.info("leftover-collect-started", ports=job.ports[:20], port_count=len(job.ports), elements=job.elements)

    # reconciles that say the kernel may not hold what the agent thinks: until one has
    # run, a collection's rebuild would be written on top of someone else's table
    _TABLE_IN_DOUBT = frozenset({"nft-change", "drift-check"})

    def _collected(self) -> None:
        job, child = self._collecting
        self._collecting = None
        self.sel.unregister(child.fd)
        try:
            ok, answer = child.answer()
            if doubt := sorted(self.runner.pending & self._TABLE_IN_DOUBT):
                self.log.info("leftover-collect-moot", ports=job.ports[:20], why=f"a reconcile is due first: {', '.join(doubt)}")
                return
            self.rec.finish_collect(job, ok, answer)
        finally:  # whatever went wrong, what is left is collected later, or a reconcile repairs
            self._after_collect()

    def _after_collect(self) -> None:
        if left := len(self.rec.leftover_ports):  # unbinds while it was encoded
            self.collector.touch(time.monotonic(), at_once=left > LEFTOVER_CAP)
        if not self.rec.in_sync():
            self.runner.request("leftover-collect-failed")
            return
        if self.rec.road == "full":
            self._trim()
        self.state_writer.request(time.monotonic())
        if self.rec.dirty:
            self.persist.request(time.monotonic())

    def _persist(self, sync: bool = True) -> None:
        """The applied plan's file. Asynchronously (a forked child writes the copy-on-write
        snapshot) when called from the loop: serializing a 1,000-guest plan takes about a
        second, and a tap plugged meanwhile must not wait for it."""
        from segguard.agent.state import write_applied

        if self.rec.applied is None or not self.rec.dirty:
            return
        self._reap()
        if not sync:
            applied = self.rec.applied
            if not self.plan_writer.start(lambda: write_applied(applied)):
                self.persist.request(time.monotonic())  # one writer at a time, or an older one could land last
                return
            self.rec.dirty = False
            return
        self.plan_writer.wait()
        # synchronous, yet still by a forked writer: the encoder's copy of a 1,000-guest
        # plan (+4 MB) stays out of the agent's heap; in process only if no fork
        try:
            started = self.plan_writer.start(lambda: write_applied(self.rec.applied))
        except OSError:
            started = False
        if started:
            status = self.plan_writer.wait()
            if status == 0:
                self.rec.dirty = False
            else:
                self.log.error("state-write-failed", error=f"the writer's exit status {status}")
            return
        try:
            write_applied(self.rec.applied)
            self.rec.dirty = False
        except OSError as exc:
            self.log.error("state-write-failed", error=repr(exc))

    def _reap(self) -> None:
        if self.plan_writer.reap():
            self.rec.dirty = True
            self.log.error("state-write-failed", error="applied plan writer exited with an error")

    # -- the periodic drift check ------------------------------------------------------------
    def _drift_tick(self) -> None:
        """Every drift period: compare the live table with the plan.

        Where the host has a VLAN layer the whole check (hardening knobs included) runs
        in the loop, as a reconcile. Otherwise only nftables is checked, and that in a
        forked child: listing a 1,000-guest table takes libnftables ~20 s, which the
        loop must not spend while taps wait. The child only reads and answers '=' (the
        kernel holds the plan) or '!'; a '!' is confirmed and repaired by a reconcile
        in the loop, under the writer lock. A check that overlapped one of our own
        writes proves nothing and is simply run again.

        The link table the binds read (LinkMonitor, fed by events) is compared with a
        fresh dump here too, by the child where there is one (a dump of 10,000 links is
        not free): whatever it missed without the kernel saying so is found within a
        period, and then read again and reconciled."""
        if self.rec.topology.caps().vlan_filtering or self.sel is None:
            if self.links is not None and not self._links_current():
                self._resync_links()
            self.runner.request("drift-check")
            return
        if self._checker is not None or self.rec.applied is None:
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            answer = b"?"
            try:
                os.close(r)
                if self.links is not None and not self._links_current():
                    answer = b"L"
                else:
                    answer = b"=" if self.rec.kernel_matches() else b"!"
            except BaseException:  # noqa: BLE001
                pass
            try:
                os.write(w, answer)
            finally:
                os._exit(0)
        os.close(w)
        self._checker = (pid, r, self.rec.generation, time.monotonic())
        self.sel.register(r, selectors.EVENT_READ, "drift-child")

    def _links_current(self) -> bool:
        from segguard.host import rtnl

        def seen(links):
            return {(l.name, l.master, l.mac) for l in links.values()}
        return seen(rtnl.links()) == seen(self.links.links)

    def _resync_links(self) -> None:
        self.log.warning("link-table-resync", why="the event-fed link table differed from the kernel's")
        self.links.snapshot()
        self.runner.request("link-resync")

    def _drift_answer(self) -> None:
        pid, r, gen, t0 = self._checker
        try:
            answer = os.read(r, 1)
        finally:
            self.sel.unregister(r)
            os.close(r)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._checker = None
        took = time.monotonic() - t0
        # a check that costs more than a fifth of the period stretches it: at most ~20 % of a core
        if self.drift_every and self.drift_tick.next_at is not None:
            self.drift_tick.next_at = max(self.drift_tick.next_at, time.monotonic() + 4 * took)
        if answer == b"=":
            return
        if answer == b"L":
            self._resync_links()
            return
        if gen != self.rec.generation:
            self._drift_tick()  # we wrote meanwhile: look again
            return
        self.runner.request("drift-check")

    def _verify_targets(self) -> list[str]:
        guests = [b.guest for b in self.rec.bindings]
        for gone in set(self.verify_results) - set(guests):
            self.verify_results.pop(gone, None)
            self.metrics.forget_guest(gone)
        return guests

    def _verify_guest(self, guest: str) -> None:
        """Real packets through probe ports (verify/live.py), under the writer lock: its
        switch to the stand-in plan and back is one writer's work, and nobody's apply
        lands in between."""
        from segguard.agent.verify import errored, summarize
        from segguard.flow import writer_lock
        from segguard.verify.live import verify_live

        if self.rec.config is None:
            return
        at, t0 = time.time(), time.monotonic()
        self.log.info("verify-start", guest=guest)
        self.verifying = {"guest": guest, "since": at}
        self._write_state()
        with writer_lock():
            try:
                summary = summarize(verify_live(None, guests=[guest], config=self.rec.config), at, time.monotonic() - t0)
            except Exception as exc:  # noqa: BLE001 - a run that could not probe is a failed result, not a crash
                summary = errored(exc, at, time.monotonic() - t0)
            # put the agent's plan back now, in the same lock; the switch was ours, not drift
            try:
                self.rec.reconcile(frozenset({"after-verify"}))
                if self.rec.dirty:
                    self.persist.request(time.monotonic())
            except Exception as exc:  # noqa: BLE001
                self.log.error("task-failed", error=repr(exc))
        self.verifying = None
        self.verify_results[guest] = summary
        self.metrics.verified(guest, summary)
        log = self.log.info if summary["ok"] else self.log.warning
        log("verified", guest=guest, method="live", ok=summary["ok"], passed=summary["passed"], failed=summary["failed"],
            failing=summary["failing"][:10], error=summary.get("error"), seconds=summary["seconds"])
        self._write_state()

    def _write_state(self) -> None:
        from segguard.agent.state import snapshot, write_agent_state

        try:
            data = snapshot(self.rec, self.verify_results, self.started, os.getpid(), self.ready)
            # while a live verify runs the table holds its stand-in plan: status says why
            data["verifying"] = self.verifying
            # the forked children's largest RSS (a commit, a load, a writer, a drift
            # check): pages shared with the agent included, so an upper bound of what
            # one of them cost the machine beside it
            data["children_rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            write_agent_state(data)
        except Exception as exc:  # noqa: BLE001 - status is a report; enforcement goes on without it
            self.log.error("state-write-failed", error=repr(exc))

    @staticmethod
    def _trim() -> None:
        """A full compile and read-back are transient (the whole table as JSON dicts,
        twice); hand the freed heap back so the idle agent's RSS is what it keeps."""
        import ctypes
        import gc

        gc.collect()
        # what survives is the long-lived plan: out of the collector's sight, or every
        # full collection walks a million dicts (a ~1 s stall at 1,000 guests, in
        # the middle of some tap's bind)
        gc.freeze()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    # -- events -------------------------------------------------------------------------
    def _on_links(self, events) -> None:
        from segguard.agent.events import AddrEvent, BridgePortEvent

        if self.links.overflowed:
            # the kernel dropped link events: look at everything, not at one binding
            self.links.overflowed = False
            self.runner.request("link-overflow")
        guarded = set(self.rec.bridges)
        guarded_idx = {i for i, l in self.links.links.items() if l.name in guarded}
        explicit = {b.port for b in self.rec.bindings if b.port}
        for ev in events:
            if isinstance(ev, AddrEvent):
                if ev.index in guarded_idx:
                    self.runner.request("bridge-address")
                continue
            if isinstance(ev, BridgePortEvent):
                # a port's VLAN table or bridge flags changed (`bridge vlan add`, ...)
                if self.rec.topology.caps().vlan_filtering and (ev.index in guarded_idx or ev.master in guarded_idx):
                    self.runner.request("bridge-port")
                continue
            if ev.ifname.startswith("sgprobevf"):
                continue  # the capability probe's scratch bridge
            # a bound tap's DELLINK can name no master: it left the bridge (an event of
            # its own, seen while it was still listed) before it was deleted
            relevant = (ev.ifname in guarded or ev.ifname in explicit or ev.master in guarded_idx
                        or ev.prev_master in guarded_idx
                        or (ev.kind == "del" and any(b.port == ev.ifname for b in self.rec.bindings)))
            if not relevant:
                continue
            if ev.kind == "moved":
                b = self.rec.guest_by_port(ev.ifname)
                frm, to = self.links.name_of(ev.prev_master), self.links.name_of(ev.master)
                if b is not None:
                    self.rec.record_drift("tap-moved", f"{ev.ifname} of {b.guest} moved from bridge {frm} to {to}", [b.guest])
                else:
                    self.log.info("link", kind="moved", ifname=ev.ifname, frm=frm, to=to)
            else:
                self.log.info("link", kind=ev.kind, ifname=ev.ifname, mac=ev.mac, master=self.links.name_of(ev.master))
            # a bind is one small transaction: no need to wait out the runner's period
            # (unless it is backing off from a kernel that refuses)
            self.runner.request(f"link-{ev.kind}", urgent=self.runner.min_interval <= self.base_interval)

    def _on_signal(self, signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
            self.runner.request("config")
        else:
            self.stop = True

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        from segguard.agent.events import ConfigWatcher, LinkMonitor, NftMonitor
        from segguard.apply.nftables import NftablesApplier

        self.log.info("agent-start", pid=os.getpid(), config=str(self.rec.config_dir or "/etc/segguard"))
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        # probe kernel capabilities before listening, so the probe's own links are not events
        self.rec.topology.caps()
        self.links = LinkMonitor()
        self.rec.topology.monitor = self.links  # the bind road's links: no dump per tap
        sel = self.sel = selectors.DefaultSelector()
        sel.register(self.links, selectors.EVENT_READ, "link")
        sel.register(rfd, selectors.EVENT_READ, "signal")
        if isinstance(self.rec.applier, NftablesApplier):
            self.rec.applier.in_child = True
        try:
            self.nftmon = NftMonitor()
            sel.register(self.nftmon, selectors.EVENT_READ, "nft")
            if isinstance(self.rec.applier, NftablesApplier):
                self.rec.applier.quiet = self.nftmon.quiet
        except OSError as exc:
            self.log.warning("nft-monitor-unavailable", error=str(exc), fallback="periodic drift check only")
        config_dir = Path(self.rec.config_dir or os.environ.get("SEGGUARD_CONFIG") or "/etc/segguard")
        try:
            self.cfgwatch = ConfigWatcher(config_dir)
            sel.register(self.cfgwatch, selectors.EVENT_READ, "config")
        except OSError as exc:
            self.log.warning("config-watch-unavailable", error=str(exc), fallback="SIGHUP")

        if self.cfgwatch is not None:
            # the watch is armed: what changes from here on is named by its events, so
            # the first edit's reload need not read every file again
            self.cfgwatch.take()
        self.rec.load()
        self.rec.reconcile(frozenset({"start"}))
        # before READY: libvirt's hook may consult the applied plan the moment we say so
        self.rec.dirty = True
        self._persist()
        self._trim()
        now = time.monotonic()
        self.runner.last_run = now
        for t in (self.drift_tick, self.verify_tick):
            t.start(now)
        self.ready = True
        self._write_state()
        if self.metrics_addr:
            self.metrics.serve(self.metrics_addr[1], self.metrics_addr[0])
            self.log.info("metrics", addr=f"{self.metrics_addr[0]}:{self.metrics_addr[1]}")
        _sd_notify("READY=1")
        self.log.info("agent-ready", table_present=self.rec.table_present, guests=len(self.rec.bindings))
        while not self.stop:
            nftmon = getattr(self, "nftmon", None)
            if nftmon is not None and nftmon.take_missed():  # committed while we did not listen
                self.runner.request("nft-change")
            for key, _ in sel.select(self.sched.timeout(time.monotonic())):
                try:
                    if key.data == "link":
                        self._on_links(self.links.read())
                    elif key.data == "nft":
                        if self.nftmon.read():
                            self.runner.request("nft-change")
                    elif key.data == "config":
                        if self.cfgwatch.read():
                            self.runner.request("config", urgent=self._config_urgent(time.monotonic()))
                    elif key.data == "drift-child":
                        self._drift_answer()
                    elif key.data == "collect-child":
                        self._collected()
                    elif key.data == "signal":
                        os.read(rfd, 4096)
                except Exception as exc:  # noqa: BLE001 - a bad event must not stop enforcement
                    self.log.error("event-failed", source=key.data, error=repr(exc))
            if self.stop:
                break
            try:
                self.sched.run_due(time.monotonic())
            except Exception as exc:  # noqa: BLE001
                self.log.error("task-failed", error=repr(exc))
        self._persist()
        self._end_children()
        self._write_state()
        # Stopping removes nothing: the table stays exactly as the kernel holds it.
        self.log.info("agent-stop", table_left_in_place=True)
        return 0

    def _end_children(self) -> None:
        """No child outlives the agent: the plan writer is waited for (it may be in the
        middle of a 5,000-guest plan, and its file must be whole), a drift checker is
        only reading and is stopped."""
        self.plan_writer.wait()
        if self._collecting is not None:  # only encoding: the kernel has not seen it
            self._collecting[1].kill()
            self._collecting = None
        if self._checker is not None:
            pid = self._checker[0]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._checker = None
