"""Prometheus metrics of the agent (prometheus-client), served on localhost by default:
the numbers say which guests are exposed, and nobody off-host needs to know that."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

DEFAULT_ADDR = "127.0.0.1"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.guests = Gauge("segguard_guests", "Legacy guests by state: protected (bound, policy realized) or unbound "
                            "(MAC dropped on every port)", ["state"], registry=r)
        self.applies = Counter("segguard_applies", "Transactions sent to the kernel", ["kind", "result"], registry=r)
        self.apply_seconds = Histogram("segguard_apply_seconds", "Observe-diff-apply-read-back time of a reconcile that "
                                       "changed the kernel", ["kind"], registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.drift = Counter("segguard_drift_events", "Differences found between the live kernel and the plan, by kind",
                             ["kind"], registry=r)
        self.verify = Counter("segguard_verify", "Per-guest real-packet verify runs, by result (pass, fail, error)",
                              ["result"], registry=r)
        self.verify_expectations = Gauge("segguard_verify_expectations", "Expectations of a guest's last verify run, "
                                         "by result (passed, failed)", ["guest", "result"], registry=r)
        self.guest_verified = Gauge("segguard_guest_verify_ok", "1 if the guest's last verify run held every "
                                    "expectation, 0 if not", ["guest"], registry=r)
        self.guest_last_verify = Gauge("segguard_guest_last_verify_timestamp_seconds", "When the guest was last verified",
                                       ["guest"], registry=r)
        self.verify_seconds = Histogram("segguard_verify_seconds", "Time of one guest's real-packet verify run",
                                        registry=r, buckets=(1, 2.5, 5, 10, 20, 40, 80, 160, 320))
        self.config_valid = Gauge("segguard_config_valid", "1 if the config on disk is valid, 0 if the last good one "
                                  "is still enforced because the current one is not", registry=r)
        self.last_verify = Gauge("segguard_last_verify_timestamp_seconds", "When the last verify ran", registry=r)
        for state in ("protected", "unbound"):
            self.guests.labels(state).set(0)

    def verified(self, guest: str, summary: dict) -> None:
        result = "error" if summary.get("error") else ("pass" if summary["ok"] else "fail")
        self.verify.labels(result).inc()
        self.verify_expectations.labels(guest, "passed").set(summary["passed"])
        self.verify_expectations.labels(guest, "failed").set(summary["failed"])
        self.guest_verified.labels(guest).set(1 if summary["ok"] else 0)
        self.guest_last_verify.labels(guest).set(summary["at"])
        self.verify_seconds.observe(summary["seconds"])
        self.last_verify.set(summary["at"])

    def forget_guest(self, guest: str) -> None:
        """A guest no longer configured: its last verify describes nobody."""
        for g, labels in ((self.verify_expectations, [(guest, "passed"), (guest, "failed")]),
                          (self.guest_verified, [(guest,)]), (self.guest_last_verify, [(guest,)])):
            for lv in labels:
                try:
                    g.remove(*lv)
                except KeyError:
                    pass

    def serve(self, port: int, addr: str = DEFAULT_ADDR) -> None:
        start_http_server(port, addr=addr, registry=self.registry)
