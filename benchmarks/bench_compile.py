"""Compile time and memory for synthetic fleets: load (YAML + schema + cross-checks) and
compile (pure) of N single-guest profiles, each guest dual-stack with ten allow rules.

Each N runs in a fresh subprocess so its peak RSS (ru_maxrss) belongs to that N alone;
the RSS at N=1,000 stands in for the agent's (no agent exists yet: it is the process
that holds the config and the compiled plan, which the agent would hold too)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks import common as c


def child(n: int, runs: int) -> dict:
    import resource
    import tracemalloc

    from segguard.compile import compile_plan
    from segguard.config.validate import load_config

    facts = c.facts(n)
    load_t, comp_t = [], []
    with c.tempdir("compile") as d:
        c.write_fleet(d, n)
        for _ in range(runs):
            t, cfg = c.timed(lambda: load_config(d))
            load_t.append(t)
            t, plan = c.timed(lambda: compile_plan(cfg, facts))
            comp_t.append(t)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        del cfg, plan
        # one more run under tracemalloc (it slows Python down, so it is not timed)
        tracemalloc.start()
        cfg = load_config(d)
        plan = compile_plan(cfg, facts)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    kinds: dict[str, int] = {}
    for o in plan.nft:
        k = next(iter(o))
        kinds[k] = kinds.get(k, 0) + 1
    return {"n": n, "load": c.summarize(load_t), "compile": c.summarize(comp_t),
            "total": c.summarize([a + b for a, b in zip(load_t, comp_t)]),
            "tracemalloc_peak_mb": peak / 2**20, "maxrss_mb": rss_mb, "objects": kinds}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000, 5000])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per N (N >= 5000: 1)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per N before it counts as not finished")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.runs)))
        return {}
    results, unfinished = [], []
    for n in args.n:
        runs = 1 if n >= 5000 else args.runs
        t = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_compile", "--child", str(n), "--runs", str(runs)],
                                 cwd=c.ROOT, capture_output=True, text=True, check=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            # subprocess.run kills the child on timeout; the miss is a result, not an error
            print(f"  N={n}: did not finish within {args.timeout} s", flush=True)
            unfinished.append({"n": n, "timeout_s": args.timeout})
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t
        results.append(res)
        print(f"  N={n}: load {c.fmt_s(res['load']['median'])}, compile {c.fmt_s(res['compile']['median'])}", flush=True)
    rows = []
    for r in results:
        rows.append(c.stat_row(f"N={r['n']} load", r["load"]))
        rows.append(c.stat_row(f"N={r['n']} compile", r["compile"]))
    c.table("compile: load_config + compile_plan (single-guest profiles, 10 allow rules each, v4+v6)", c.STAT_HEADERS, rows)
    c.table("compile: memory and plan size", ["N", "tracemalloc peak", "process max RSS", "nft rules", "sets", "chains"],
            [[r["n"], f"{r['tracemalloc_peak_mb']:.0f} MB", f"{r['maxrss_mb']:.0f} MB", r["objects"].get("rule", 0),
              r["objects"].get("set", 0), r["objects"].get("chain", 0)] for r in results])
    at1000 = next((r for r in results if r["n"] == 1000), None)
    targets = {}
    if at1000:
        targets["agent_rss_1000_mb"] = {"measured": at1000["maxrss_mb"], "target": 80, "met": at1000["maxrss_mb"] < 80,
                                        "note": "RSS of a process holding the loaded config and compiled plan of 1,000 guests (agent proxy; no agent yet)"}
        print(f"RSS with 1,000 guests loaded and compiled: {at1000['maxrss_mb']:.0f} MB (target < 80 MB: "
              f"{'met' if targets['agent_rss_1000_mb']['met'] else 'MISSED'})")
    for u in unfinished:
        print(f"N={u['n']}: not finished within {u['timeout_s']} s (load + compile + a tracemalloc pass)")
    data = {"results": results, "unfinished": unfinished, "targets": targets}
    c.write_result("compile", data)
    return data


if __name__ == "__main__":
    main()
