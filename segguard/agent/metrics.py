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
        self.verify = Counter("segguard_verify", "Per-guest verification results", ["result"], registry=r)
        self.config_valid = Gauge("segguard_config_valid", "1 if the config on disk is valid, 0 if the last good one "
                                  "is still enforced because the current one is not", registry=r)
        self.last_verify = Gauge("segguard_last_verify_timestamp_seconds", "When the last verify ran", registry=r)
        for state in ("protected", "unbound"):
            self.guests.labels(state).set(0)

    def serve(self, port: int, addr: str = DEFAULT_ADDR) -> None:
        start_http_server(port, addr=addr, registry=self.registry)
