"""Fixtures for tests that build the lab in network namespaces on the host kernel.

Every lab gets a unique short prefix (``sgt<4 hex>-``) so parallel runs, and
other people's labs on the same machine, never collide; teardown destroys the
prefix even when the test (or the build itself) failed.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import pytest

from segguard.lab import topology
from segguard.lab.topology import Lab
from segguard.verify.probes import ProbeSession


def unique_prefix(stem: str = "sgt") -> str:
    return f"{stem}{secrets.token_hex(2)}-"


@contextlib.contextmanager
def scratch_netns(suffix: str, stem: str = "sgt") -> Iterator[str]:
    """A namespace of a unique name, entered for the body, deleted even on failure."""
    from segguard.lab import netns as nl

    name = unique_prefix(stem) + suffix
    nl.create_netns(name)
    try:
        with nl.enter_netns(name):
            yield name
    finally:
        nl.delete_netns(name)


@pytest.fixture
def lab_prefix() -> str:
    return unique_prefix()


@pytest.fixture
def lab(lab_prefix: str) -> Iterator[Lab]:
    try:
        built = topology.build(lab_prefix)
        yield built
    finally:
        topology.destroy(lab_prefix)


# Every host that can be a sink; the mgmt/inet sinks sit behind the router.
SINK_ROLES = ("hypervisor", "xp", "scada", "guest", "dc", "app", "jump", "router", "mgmt", "inet")


@pytest.fixture
def session(lab: Lab) -> Iterator[ProbeSession]:
    """Senders on every lab host, sinks on every lab host."""
    endpoints = {role: lab.sink(role) for role in SINK_ROLES}
    with ProbeSession(endpoints, endpoints, settle=0.5) as s:
        yield s
