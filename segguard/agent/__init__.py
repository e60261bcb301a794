"""The host agent: apply, then react to events (links, nftables changes, config edits,
SIGHUP), repair drift, verify on a schedule, and report.

It never fails open and never takes protection down: the kernel keeps the last table
it was given whatever happens to this process (crash, kill -9, SIGTERM, upgrade), a
restart that finds the kernel already holding the plan sends nothing, and only
`segguard remove --yes` deletes the table.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from pathlib import Path

from segguard.agent.log import Log


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
                 log: Log | None = None):
        from segguard.agent.metrics import Metrics
        from segguard.agent.reconcile import Reconciler
        from segguard.agent.schedule import BoundedRunner, Periodic, Scheduler
        from segguard.agent.verify import VerifyRounds

        self.log = log or Log()
        self.metrics = Metrics()
        self.metrics_addr = metrics_addr
        self.rec = Reconciler(config_dir, self.log, self.metrics)
        self.verify_results: dict = {}
        self.verifying: dict | None = None
        self.started = time.time()
        self.ready = False
        self.stop = False
        self.sched = Scheduler()
        self.base_interval = min_interval
        self.runner = self.sched.add(BoundedRunner(self._reconcile, min_interval))
        self.drift_tick = self.sched.add(Periodic(lambda: self.runner.request("drift-check"), drift_every))
        # after the runner: a reconcile requested meanwhile runs before the next guest's verify
        self.verify_tick = self.sched.add(VerifyRounds(self._verify_guest, self._verify_targets, verify_every))
        self._reload = False

    # -- tasks ------------------------------------------------------------------------
    def _reconcile(self, reasons: frozenset[str]) -> None:
        if self._reload or "config" in reasons:
            self._reload = False
            self.rec.load()
        outcome = self.rec.reconcile(reasons)
        # A refused or differing apply notifies nft listeners like any other change;
        # back off so a kernel that keeps refusing does not get a transaction per event.
        if outcome.action == "error":
            self.runner.min_interval = min(30.0, max(1.0, self.runner.min_interval * 2))
        else:
            self.runner.min_interval = self.base_interval
        self._write_state()

    def _verify_targets(self) -> list[str]:
        guests = [b.guest for b in self.rec.desired.bindings] if self.rec.desired else []
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
        from segguard.agent.state import STATE_NAME, snapshot
        from segguard.flow import write_state

        try:
            data = snapshot(self.rec, self.verify_results, self.started, os.getpid(), self.ready)
            # while a live verify runs the table holds its stand-in plan: status says why
            data["verifying"] = self.verifying
            write_state(STATE_NAME, data)
        except Exception as exc:  # noqa: BLE001 - status is a report; enforcement goes on without it
            self.log.error("state-write-failed", error=repr(exc))

    # -- events -------------------------------------------------------------------------
    def _on_links(self, events) -> None:
        from segguard.agent.events import AddrEvent, BridgePortEvent

        guarded = set(self.rec.bridges)
        guarded_idx = {i for i, (n, _) in self.links.links.items() if n in guarded}
        explicit = {b.port for b in (self.rec.desired.bindings if self.rec.desired else ()) if b.port}
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
            relevant = (ev.ifname in guarded or ev.ifname in explicit or ev.master in guarded_idx
                        or ev.prev_master in guarded_idx)
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
            self.runner.request(f"link-{ev.kind}")

    def _on_signal(self, signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
            self.runner.request("config")
        else:
            self.stop = True

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        from segguard.agent.events import ConfigWatcher, LinkMonitor, NftMonitor

        self.log.info("agent-start", pid=os.getpid(), config=str(self.rec.config_dir or "/etc/segguard"))
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        # probe kernel capabilities before listening, so the probe's own links are not events
        self.rec.topology.caps()
        self.links = LinkMonitor()
        sel = selectors.DefaultSelector()
        sel.register(self.links, selectors.EVENT_READ, "link")
        sel.register(rfd, selectors.EVENT_READ, "signal")
        try:
            self.nftmon = NftMonitor()
            sel.register(self.nftmon, selectors.EVENT_READ, "nft")
        except OSError as exc:
            self.log.warning("nft-monitor-unavailable", error=str(exc), fallback="periodic drift check only")
        config_dir = Path(self.rec.config_dir or os.environ.get("SEGGUARD_CONFIG") or "/etc/segguard")
        try:
            self.cfgwatch = ConfigWatcher(config_dir)
            sel.register(self.cfgwatch, selectors.EVENT_READ, "config")
        except OSError as exc:
            self.log.warning("config-watch-unavailable", error=str(exc), fallback="SIGHUP")

        self.rec.load()
        self.rec.reconcile(frozenset({"start"}))
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
        self.log.info("agent-ready", table_present=self.rec.realized is not None,
                      guests=len(self.rec.desired.bindings) if self.rec.desired else 0)
        while not self.stop:
            for key, _ in sel.select(self.sched.timeout(time.monotonic())):
                try:
                    if key.data == "link":
                        self._on_links(self.links.read())
                    elif key.data == "nft":
                        if self.nftmon.read():
                            self.runner.request("nft-change")
                    elif key.data == "config":
                        if self.cfgwatch.read():
                            self.runner.request("config")
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
        # Stopping removes nothing: the table stays exactly as the kernel holds it.
        self.log.info("agent-stop", table_left_in_place=True)
        return 0
