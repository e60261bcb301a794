"""Run every benchmark, one after the other (they share two cores; never in parallel),
then draw the plot. `python -m benchmarks.run_all [--quick]` from the repo root, as root.
Results: benchmarks/results/*.json and the tables on stdout; plot: docs/bench-apply.png."""
from __future__ import annotations

import argparse
import time
import traceback

from benchmarks import bench_apply, bench_compile, bench_forwarding, bench_nwfilter, bench_plug, bench_verify, common as c, plot

QUICK = {
    "compile": ["--n", "10", "100", "1000", "--runs", "2"],
    "apply": ["--per-guest", "10", "100", "--shared", "10", "100", "--runs", "2"],
    "forwarding": ["--rounds", "2", "--seconds", "3", "--rr", "1000"],
    "forwarding-pinned": ["--rounds", "2", "--seconds", "3", "--rr", "1000", "--cpu", "1"],
    "verify": ["--runs", "1"],
    "nwfilter": ["--n", "5", "--runs", "1"],
    "plug": ["--guests", "10", "100", "--plugs", "20", "--idle-seconds", "5", "--budget", "60"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller N and fewer runs (a few minutes)")
    ap.add_argument("--only", nargs="*", choices=list(QUICK), help="run only these")
    args = ap.parse_args()
    c.require_root()
    mods = {"compile": bench_compile, "apply": bench_apply, "forwarding": bench_forwarding,
            "forwarding-pinned": bench_forwarding, "verify": bench_verify, "nwfilter": bench_nwfilter, "plug": bench_plug}
    # the pinned run: sender, receiver and the bridge's filtering on one core, the
    # cost per packet of one core, the scheduler moving nothing, and perf's count of
    # that core's time in nftables (results/forwarding-cpu1.json)
    full = {"forwarding-pinned": ["--cpu", "1", "--perf"]}
    failed, spent = [], {}
    for name, mod in mods.items():
        if args.only and name not in args.only:
            continue
        print(f"\n######## {name} ########", flush=True)
        t = time.perf_counter()
        try:
            mod.main(QUICK[name] if args.quick else full.get(name, []))
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
        spent[name] = time.perf_counter() - t
    try:
        plot.main([])
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        failed.append("plot")
    c.table("suite", ["benchmark", "wall time"], [[k, c.fmt_s(v)] for k, v in spent.items()])
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
