"""Marker gating: nothing silently passes where it cannot run.

* ``kernel_lab`` tests outside the lab (SEGGUARD_KERNEL_LAB unset) are skipped with a
  pointer to the runner; inside the lab they FAIL if the lab kernel lacks the features.
* ``netns`` tests are skipped when not root.

Fixtures belong in other conftest files; keep this one to the gating, and to one
piece of isolation: outside the kernel lab (whose /run dies with its VM) the session
gets its own SEGGUARD_STATE, so no test writes locks or applied plans under the
host's /run/segguard; a test that sets its own still does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

IN_LAB = os.environ.get("SEGGUARD_KERNEL_LAB") == "1"
LAB_SKIP = ("needs kernel features the host lacks; runs in the kernel lab: "
            "python -m tests.kernel_lab.runner")
NETNS_SKIP = "needs root (creates network namespaces and nftables rules); runs as root in ./dev.sh test, which CI runs"
# Modules the lab kernel must provide (loaded, or built in).
LAB_MODULES = ("bridge", "8021q", "nf_conntrack_bridge")

_lab_missing: list[str] | None = None


def _module_present(name: str) -> bool:
    if Path("/sys/module", name).exists():
        return True
    subprocess.run(["modprobe", name], capture_output=True)
    return Path("/sys/module", name).exists()


def _bridge_vlan_filtering_works() -> bool:
    """Try vlan_filtering=1 on a bridge in a throwaway namespace."""
    from pyroute2 import NetNS, netns

    name = f"sgkprobe{os.getpid()}"
    try:
        with NetNS(name) as ipr:
            ipr.link("add", ifname="sgkprobe0", kind="bridge", br_vlan_filtering=1)
        return True
    except Exception:
        return False
    finally:
        try:
            netns.remove(name)
        except OSError:
            pass


_state_dir: str | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _lab_missing, _state_dir
    if not IN_LAB and "SEGGUARD_STATE" not in os.environ:
        _state_dir = os.environ["SEGGUARD_STATE"] = tempfile.mkdtemp(prefix="sgt-state-")
    if IN_LAB:
        _lab_missing = [m for m in LAB_MODULES if not _module_present(m)]
        if not _bridge_vlan_filtering_works():
            _lab_missing.append("bridge vlan_filtering")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _state_dir is not None:
        os.environ.pop("SEGGUARD_STATE", None)
        shutil.rmtree(_state_dir, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = os.geteuid() == 0
    for item in items:
        if item.get_closest_marker("kernel_lab") and not IN_LAB:
            item.add_marker(pytest.mark.skip(reason=LAB_SKIP))
        elif item.get_closest_marker("netns") and not root:
            item.add_marker(pytest.mark.skip(reason=NETNS_SKIP))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if IN_LAB and _lab_missing and item.get_closest_marker("kernel_lab"):
        pytest.fail(f"the lab kernel ({os.uname().release}) lacks: "
                    f"{', '.join(_lab_missing)}", pytrace=False)
