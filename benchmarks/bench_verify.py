"""`verify` in the lab (real frames from each guest's namespace, observed at L2 by
segguard.verify.lab): every guard rail, allow rule both ways, default, anti-spoofing
case and control.

Two guests (the built-in lab, namespaces `sgbp-*`): one guest's full expectation set
alone, each lab guest alone and both in one session (their probes interleaved in the
same batches), which must give exactly the verdicts each gets alone.

100 guests in parallel (`--guests 100`, the default): the built-in lab plus 98 extra
legacy guests, copies of the xp-line3-hmi kind, each with its own namespace, port, MAC,
IPv4 address (one in four dual-stack) and profile (`topology.lab(prefix,
extra_legacy=98)`, config from `segguard.lab.scaled.write_config`, applied in the
hypervisor namespace), in namespaces `sgbp-*`, deleted in a `finally`. "In parallel" is
what an admin runs to verify every guest: `segguard verify --config DIR --lab-prefix
sgbp-` without `--guest`, i.e. one `verify_lab` over all guests (called in-process here,
as the two-guest case does, so the CLI's ~1 s of imports is not counted): one probe
session, one worker process per namespace, every guest's probes in the same two
batches (flows, then the replies that need them), all senders sending at once. (N
verify processes at once would each start ~10 workers and import scapy, ~1 s of CPU
each, on two cores: not what anyone would run for 100 guests.)

Interference: every verdict of the 100-guest run is compared with the same guest
verified alone (`verify_lab(..., guests=[g])`, same lab, same table). Alone costs
~1.7 s a guest, so by default a fixed sample of 10 guests spread over the range (both
built-in guests, 8 extra ones, 4 of them dual-stack) is verified alone in every run;
`--alone all` verifies all 100 alone (~3 more minutes a run). Also reported: where
the parallel run's time goes (worker start, frame building, batches) and peak memory
(the orchestrator's RSS; the workers' summed RSS and PSS, sampled every 0.25 s)."""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from benchmarks import common as c

PREFIX = "sgbp-"
GUESTS = ["xp-line3-hmi", "scada-line4-srv"]
BUILTIN_LEGACY = len(GUESTS)
SAMPLE = 10


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--guests", type=int, default=100,
                    help="legacy guests verified in parallel: the lab's 2 plus guests-2 extra ones (0: skip)")
    ap.add_argument("--alone", choices=("sample", "all"), default="sample",
                    help=f"verify alone a fixed sample of {SAMPLE} guests (default) or every guest")
    args = ap.parse_args(argv)
    c.require_root()
    data = two_guests(args.runs)
    if args.guests:
        par = parallel(args.guests, args.runs, args.alone)
        data["parallel"] = par
        data["targets"]["parallel_100"] = {
            "guests": par["guests"], "expectations": par["expectations"],
            "wall_median_s": par["stats"]["median"], "wall_p99_s": par["stats"]["p99"],
            "all_held": par["all_held"], "verdicts_differ_alone_vs_parallel": len(par["differ"]),
            "verdicts_compared": par["verdicts_compared"],
            "alone_checked": par["alone_mode"], "alone_guests": len(par["alone_guests"]),
            "met": par["guests"] >= 100 and par["all_held"] and not par["differ"],
        }
    # The default run is the figures file; a run checking all guests alone is kept beside it.
    c.write_result("verify" if args.alone == "sample" else "verify-alone-all", data)
    return data


def two_guests(runs: int) -> dict:
    from segguard.lab import topology
    from segguard.verify.lab import apply_in_lab, verify_lab

    times: dict[str, list[float]] = {g: [] for g in GUESTS}
    times["both"] = []
    verdicts: dict[str, list[dict]] = {}
    counts: dict[str, int] = {}
    with topology.lab(PREFIX) as lab:
        apply_in_lab(lab.topology, None)
        for r in range(runs):
            for g in GUESTS:
                t, res = c.timed(lambda: verify_lab(None, PREFIX, guests=[g]))
                times[g].append(t)
                counts[g] = len(res)
                verdicts.setdefault(g, []).append({x["id"]: x["pass"] for x in res})
            t, res = c.timed(lambda: verify_lab(None, PREFIX, guests=GUESTS))
            times["both"].append(t)
            counts["both"] = len(res)
            verdicts.setdefault("both", []).append({x["id"]: x["pass"] for x in res})
            print(f"  run {r + 1}/{runs}: " + ", ".join(f"{k} {c.fmt_s(v[-1])}" for k, v in times.items()), flush=True)
    alone = {}
    for g in GUESTS:
        for v in verdicts[g]:
            alone.update(v)
    together = verdicts["both"]
    interference = [pid for v in together for pid, ok in v.items() if alone.get(pid) != ok]
    all_pass = all(all(v.values()) for vs in verdicts.values() for v in vs)
    rows = [c.stat_row(f"{k} ({counts[k]} expectations)", c.summarize(v)) for k, v in times.items()]
    c.table("verify in the lab (real frames, observed at L2)", c.STAT_HEADERS, rows)
    print(f"every expectation held: {all_pass}; verdicts that differ between alone and together: {len(interference)}")
    return {"stats": {k: c.summarize(v) for k, v in times.items()}, "expectations": counts, "all_pass": all_pass,
            "interference": sorted(set(interference)),
            "targets": {"one_guest_under_3s": all(c.summarize(times[g])["median"] < 3 for g in GUESTS),
                        "parallel_100": "not measured (run with --guests 100)"}}


def sample_guests(names: list[str], extra: int) -> list[str]:
    """Both built-in guests and 8 extra ones spread over the range, every other one
    moved to the nearest dual-stack copy (i % 4 == 1)."""
    from segguard.lab import topology

    if extra <= 0:
        return list(names)
    picks: list[int] = []
    for j in range(SAMPLE - BUILTIN_LEGACY):
        i = round(j * (extra - 1) / max(1, SAMPLE - BUILTIN_LEGACY - 1))
        if j % 2 and i - i % 4 + 1 < extra:
            i = i - i % 4 + 1
        if i not in picks:
            picks.append(i)
    return GUESTS + [topology.extra_domain(i) for i in picks]


def parallel(n_guests: int, runs: int, alone_mode: str) -> dict:
    from segguard.lab import scaled, topology
    from segguard.verify.lab import apply_in_lab, verify_lab

    extra = n_guests - BUILTIN_LEGACY
    if extra < 0:
        raise SystemExit(f"--guests must be 0 or at least {BUILTIN_LEGACY}")
    par_times: list[float] = []
    alone_times: dict[str, list[float]] = {}
    par_verdicts: list[dict[str, tuple]] = []
    alone_verdicts: list[dict[str, tuple]] = []
    phases: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    failures: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sgbp-cfg-") as tmp, \
            topology.lab(PREFIX, extra_legacy=extra) as lab:
        cfg = scaled.write_config(Path(tmp), lab.topology)
        t_apply, _ = c.timed(lambda: apply_in_lab(lab.topology, cfg))
        print(f"\nscaled lab: {len(lab.hosts)} namespaces built in {lab.build_seconds:.1f} s, "
              f"{n_guests} legacy guests' config applied in {c.fmt_s(t_apply)}", flush=True)
        names: list[str] | None = None
        for r in range(runs):
            with _phases(phases), _memory(memory):
                t, res = c.timed(lambda: verify_lab(cfg, PREFIX))
            par_times.append(t)
            par_verdicts.append({x["id"]: _verdict(x) for x in res})
            failures += [x for x in res if not x["pass"]]
            if names is None:
                names = list(dict.fromkeys(x["guest"] for x in res))
                per_guest = Counter(x["guest"] for x in res)
                pick = names if alone_mode == "all" else sample_guests(names, extra)
            got: dict[str, tuple] = {}
            for g in pick:
                ta, ra = c.timed(lambda: verify_lab(cfg, PREFIX, guests=[g]))
                alone_times.setdefault(g, []).append(ta)
                got.update({x["id"]: _verdict(x) for x in ra})
                failures += [x for x in ra if not x["pass"]]
            alone_verdicts.append(got)
            print(f"  run {r + 1}/{runs}: {len(names)} in parallel {c.fmt_s(t)} ({len(res)} expectations), "
                  f"{len(pick)} alone {c.fmt_s(sum(v[-1] for v in alone_times.values()))} in all", flush=True)
    assert names is not None
    # A verdict differs if the same expectation passed alone and failed in parallel or
    # the reverse, in the same run; an expectation alone has that the parallel run lacks
    # (or the reverse, for the guests checked alone) counts too.
    differ: set[str] = set()
    observed_differ: set[str] = set()
    compared = 0
    for par, alo in zip(par_verdicts, alone_verdicts):
        checked = {i for i in par if i.split("/", 1)[0] in pick}
        compared += len(checked | set(alo))
        for i in checked | set(alo):
            if i not in par or i not in alo or par[i][0] != alo[i][0]:
                differ.add(i)
            elif par[i] != alo[i]:
                observed_differ.add(i)
    n_exp = len(par_verdicts[0])
    all_held = not failures and all(len(v) == n_exp for v in par_verdicts)
    st = c.summarize(par_times)
    rows = [c.stat_row(f"{len(names)} guests in parallel ({n_exp} expectations)", st)]
    rows += [c.stat_row(f"  of which {k}", c.summarize(v)) for k, v in phases.items()]
    alone_all = [t for v in alone_times.values() for t in v]
    rows.append(c.stat_row(f"one guest alone ({len(alone_times)} guests x {runs} runs)", c.summarize(alone_all)))
    c.table(f"verify {len(names)} legacy guests at once: one session, as `segguard verify` without --guest",
            c.STAT_HEADERS, rows)
    kinds = Counter(per_guest.values())
    print("expectations per guest: " + ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())))
    print(f"every expectation held (parallel and alone, every run): {all_held}; verdicts that differ between "
          f"alone and parallel: {len(differ)} of {compared} compared (guests checked alone: {len(pick)}, {alone_mode}); "
          f"same verdict, other observation: {len(observed_differ)}")
    if memory:
        print(f"peak memory: orchestrator RSS {memory['orchestrator_rss_mb']:.0f} MB; "
              f"{memory['workers']:.0f} workers, summed RSS {memory['workers_rss_mb']:.0f} MB, "
              f"PSS {memory['workers_pss_mb']:.0f} MB")
    return {"guests": len(names), "extra_legacy": extra, "expectations": n_exp,
            "expectations_per_guest": dict(per_guest), "stats": st, "samples": par_times,
            "phases": {k: c.summarize(v) for k, v in phases.items()},
            "alone_mode": alone_mode, "alone_guests": pick,
            "alone_stats": {g: c.summarize(v) for g, v in alone_times.items()},
            "verdicts_compared": compared, "all_held": all_held, "failures": [{k: x[k] for k in ("id", "observed", "control", "why")} for x in failures][:50],
            "differ": sorted(differ), "observed_differ": sorted(observed_differ),
            "memory": memory, "apply_s": t_apply, "build_s": lab.build_seconds,
            "orchestrator_maxrss_mb_whole_benchmark": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _verdict(x: dict) -> tuple:
    return (x["pass"], x["observed"], x["control"])


@contextlib.contextmanager
def _phases(out: dict[str, list[float]]) -> Iterator[None]:
    """Time the probe session's start and batches, and the frames built in each batch
    (wrapping the methods for the duration, no change to segguard)."""
    from segguard.verify import probes

    start, run, build = probes.ProbeSession.start, probes.ProbeSession.run_detailed, probes.build_frame
    acc = {"build": 0.0}
    batch = [0]

    def timed_start(self):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return start(self)
        finally:
            out.setdefault(f"worker start ({len(self._workers)} workers)", []).append(time.perf_counter() - t)

    def timed_run(self, items):  # type: ignore[no-untyped-def]
        items = list(items)
        acc["build"] = 0.0
        t = time.perf_counter()
        try:
            return run(self, items)
        finally:
            batch[0] += 1
            total = time.perf_counter() - t
            out.setdefault(f"batch {batch[0]} ({len(items)} frames)", []).append(total)
            out.setdefault(f"frame building in batch {batch[0]}", []).append(acc["build"])

    def timed_build(*a, **kw):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return build(*a, **kw)
        finally:
            acc["build"] += time.perf_counter() - t

    probes.ProbeSession.start, probes.ProbeSession.run_detailed, probes.build_frame = timed_start, timed_run, timed_build
    try:
        yield
    finally:
        probes.ProbeSession.start, probes.ProbeSession.run_detailed, probes.build_frame = start, run, build


@contextlib.contextmanager
def _memory(out: dict[str, float], every: float = 0.25) -> Iterator[None]:
    """Peak summed RSS/PSS of the processes inside the benchmark's namespaces (the probe
    workers) and this process's RSS, sampled every `every` seconds."""
    from segguard.lab import netns as nl

    inodes = set()
    for name in nl.list_netns(PREFIX):
        with contextlib.suppress(OSError):
            inodes.add(os.stat(nl.NETNS_DIR / name).st_ino)
    page = os.sysconf("SC_PAGE_SIZE")
    stop = threading.Event()

    def kb(path: str, field: str) -> int:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
        return 0

    def sample() -> None:
        while not stop.is_set():
            rss = 0
            pids: list[str] = []
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    if os.stat(f"/proc/{entry}/ns/net").st_ino not in inodes:
                        continue
                    with open(f"/proc/{entry}/statm") as fh:
                        rss += int(fh.read().split()[1]) * page
                    pids.append(entry)
                except (OSError, ValueError, IndexError):
                    continue
            me = kb("/proc/self/status", "VmRSS:") * 1024
            if rss > out.get("workers_rss_mb", 0) * 2**20:
                # PSS (shared pages split among their users) only at a new peak: reading
                # smaps_rollup walks each process's page tables
                pss = 0
                for entry in pids:
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        pss += kb(f"/proc/{entry}/smaps_rollup", "Pss:") * 1024
                out.update(workers=len(pids), workers_rss_mb=rss / 2**20, workers_pss_mb=pss / 2**20)
            out["orchestrator_rss_mb"] = max(out.get("orchestrator_rss_mb", 0), me / 2**20)
            stop.wait(every)

    th = threading.Thread(target=sample, name="mem-sampler", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


if __name__ == "__main__":
    main()
