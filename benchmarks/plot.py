"""Apply time vs N, segguard vs libvirt nwfilter, log-log, from benchmarks/results/*.json
-> docs/bench-apply.png (matplotlib: `pip install .[bench]` or apt python3-matplotlib)."""
from __future__ import annotations

import argparse
import json

from benchmarks import common as c


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(c.ROOT / "docs" / "bench-apply.png"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    apply_p = c.RESULTS / "apply.json"
    if apply_p.exists():
        data = json.loads(apply_p.read_text())
        for shape, marker in (("per-guest", "o"), ("shared", "s")):
            pts = sorted((r["n"], r["stats"]["full_apply"]["median"]) for r in data["results"] if r["shape"] == shape)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"segguard full atomic apply ({shape} profiles)")
    plug_p = c.RESULTS / "plug.json"
    if plug_p.exists():
        # the agent's incremental roads, end to end with real frames (bench_plug)
        data = json.loads(plug_p.read_text())
        cases = sorted(data["cases"], key=lambda r: r["guests"])
        for key, marker, label in (("enforced_frame", "o", "segguard agent: bind one tap, N configured (tap -> first frame)"),
                                   ("edit_enforced", "x", "segguard agent: change one profile, N configured (file -> first frame)")):
            pts = [(r["guests"], r[key]["median"]) for r in cases if r.get(key) and r[key].get("median") is not None]
            if pts:
                ax.plot(*zip(*pts), marker=marker, linestyle=":", label=label)
    before_p = c.RESULTS / "apply-before.json"
    if before_p.exists():
        # the previous design (per-profile chains of rules), kept for comparison
        data = json.loads(before_p.read_text())
        pts = sorted((r["n"], r["stats"]["full_apply"]["median"]) for r in data["results"] if r["shape"] == "per-guest")
        if pts:
            ax.plot(*zip(*pts), marker="o", color="grey", alpha=0.5, linestyle="-.",
                    label=f"previous design ({data.get('when', '')[:10]}): per-profile rule chains")
    # every nwfilter run (`bench_nwfilter --result nwfilter-200` keeps the long N=200 one
    # apart from run_all's capped one); each point is one run's, its segguard beside it
    nwf = [r for p in sorted(c.RESULTS.glob("nwfilter*.json")) for r in json.loads(p.read_text())["results"]]
    if nwf:
        pts = sorted((r["n"], r["nwfilter"]["create_total"]) for r in nwf)
        if pts:
            ax.plot(*zip(*pts), marker="^", color="crimson", label="libvirt nwfilter: bind N ports")
        pts = sorted((r["n"], r["segguard"]["create"]["median"]) for r in nwf)
        if pts:
            ax.plot(*zip(*pts), marker="v", color="green", linestyle="--", label="segguard: same N ports, same policy (shared)")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.text(11, 0.55, "target: full apply of 1,000 guests < 0.5 s", color="grey", fontsize=8)
    ax.axhline(0.02, color="grey", linewidth=0.8, linestyle=":")
    ax.text(11, 0.022, "target: one change or one tap < 20 ms", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (guests / ports)")
    ax.set_ylabel("seconds")
    ax.set_title("Apply time vs N (2 shared cores; each nwfilter point beside its segguard one, same run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the lines fill the plot
    fig.tight_layout()
    out = c.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
