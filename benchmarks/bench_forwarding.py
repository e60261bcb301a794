"""Bridge forwarding with 1,000 guests' policies loaded, traffic to the LAST guest:
throughput (iperf3, TCP) and request/response latency (1-byte TCP ping-pong, p50/p99),
for eight configurations of the same bridge, interleaved round by round:
  none      no nftables table at all
  empty     one bridge table with one empty forward base chain: the floor, what any
            bridge-family filter costs before it matches anything
  empty2    empty prerouting and forward base chains: the floor of any design that
            judges a frame before the bridge learns its source (prerouting) and
            toward the port it leaves by (forward), as segguard must
  dispatch  segguard's table with nothing dispatched (its verdict maps empty): the
            base chains (toward a guest the fast path, then the dispatch; from a port
            the dispatch, then the MAC guard) and the guest port's netdev ingress
            chain, no class chain
  -macguard "dispatch" without prerouting/input's legacy-MAC guard rule, and
  -netdev   "dispatch" without the netdev ingress table: NOT safe policies, only
            what each part of the fixed cost is (removal experiments)
  segguard  segguard's table: dispatch by port through a verdict map to the profile
            kind's chain, each allow one lookup in a port-keyed set
  naive     the foil: one linear chain of per-guest rules (22 per guest), the last
            guest's rules at the end, as a per-guest-rules design would be
Namespaces: sgb-fhv (bridge br0), sgb-fcli (the sender, a jump host the profile admits
on tcp/5201 and tcp/3389), sgb-fsrv (guest g00999 on port vnet999). Offloads (TSO, GSO,
GRO, checksums, SG) are off on every veth end, so the filter sees every packet as sent.
With --cpu K the sender and the receiver run on core K only: a veth delivers in the
sender's context, so the bridge and its filters run there too and the figures are one
core's cost per packet: every nanosecond of filtering is throughput lost, and the
scheduler moves nothing between the two cores.

The 1,000 guests share one profile; with one profile per guest the table is the same
(per-guest policy is elements keyed by port either way), so the per-packet path is too."""
from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common as c

N = 1000
LAST = N - 1
CLI_MAC = "52:54:00:66:00:50"
IPERF_PORT, RR_PORT = 5201, 3389


def build(hv: str, cli: str, srv: str) -> None:
    from segguard.lab import netns as nl

    with nl.ipr(hv) as ip:
        br = nl.create_bridge(ip, c.BRIDGE, "52:54:00:64:00:01")
        for port, pmac, ns, mac in (("cli0", "fe:54:00:66:00:50", cli, CLI_MAC),
                                    (c.guest_port(LAST), c.tap_mac(LAST), srv, c.guest_mac(LAST))):
            idx = nl.create_veth(ip, port, pmac, "eth0", mac, ns)
            nl.enslave(ip, idx, br)
            nl.set_up(ip, idx)
        nl.set_up(ip, br)
    nl.write_sysctls(hv, {"net.bridge.bridge-nf-call-iptables": 0, "net.bridge.bridge-nf-call-ip6tables": 0,
                          "net.bridge.bridge-nf-call-arptables": 0}, missing_ok=True)
    for ns, addr, peer, peer_mac in ((cli, c.CLIENT_V4, c.guest_v4(LAST), c.guest_mac(LAST)),
                                     (srv, c.guest_v4(LAST), c.CLIENT_V4, CLI_MAC)):
        with nl.ipr(ns) as ip:
            idx = nl.link_index(ip, "eth0")
            nl.add_address(ip, idx, addr + "/8")
            nl.set_up(ip, idx)
            nl.add_permanent_neighbor(ip, idx, peer, peer_mac)
    for ns, ifs in ((hv, ["cli0", c.guest_port(LAST)]), (cli, ["eth0"]), (srv, ["eth0"])):
        for ifname in ifs:
            subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off",
                            "tx", "off", "rx", "off", "sg", "off"], check=True, capture_output=True)


def naive_batch() -> dict:
    """One bridge forward chain, 22 rules per guest matched in order."""
    t = "sgb_naive"
    cmds: list[dict] = [{"metainfo": {"json_schema_version": 1}}, {"add": {"table": {"family": "bridge", "name": t}}},
                        {"add": {"chain": {"family": "bridge", "table": t, "name": "forward", "type": "filter",
                                           "hook": "forward", "prio": -190, "policy": "accept"}}}]

    def rule(*exprs):
        cmds.append({"add": {"rule": {"family": "bridge", "table": t, "chain": "forward", "expr": list(exprs)}}})

    def m(left, right, op="=="):
        return {"match": {"op": op, "left": left, "right": right}}

    def pl(proto, field):
        return {"payload": {"protocol": proto, "field": field}}

    acc = {"accept": None}
    peers_in = ["10.65.0.30", c.CLIENT_V4, "10.65.0.24"]
    for k in range(N):
        port, own = c.guest_port(k), c.guest_v4(k)
        oif, iif = m({"meta": {"key": "oifname"}}, port), m({"meta": {"key": "iifname"}}, port)
        # to the guest: ingress services from its peers, replies from its egress peers
        for peer in peers_in[:2]:
            for dport in (22, 3389, 5201):
                rule(oif, m(pl("ip", "saddr"), peer), m(pl("tcp", "dport"), dport), acc)
        rule(oif, m(pl("ip", "saddr"), "10.65.0.20"), m(pl("tcp", "sport"), 1433), acc)
        rule(oif, m(pl("ether", "type"), "arp"), acc)
        rule(oif, {"drop": None})
        # from the guest: its own address only, then egress rules and replies
        rule(iif, m(pl("ether", "saddr"), c.guest_mac(k), "!="), {"drop": None})
        rule(iif, m(pl("ether", "type"), "arp"), acc)
        rule(iif, m(pl("ip", "saddr"), own, "!="), {"drop": None})
        rule(iif, m(pl("ip", "daddr"), "10.65.0.20"), m(pl("tcp", "dport"), 1433), acc)
        for peer in peers_in[:2]:
            for sport in (22, 3389, 5201):
                rule(iif, m(pl("ip", "daddr"), peer), m(pl("tcp", "sport"), sport), acc)
        rule(iif, {"drop": None})
    return {"nftables": cmds}


def empty_batch(hooks: tuple[str, ...] = ("forward",)) -> dict:
    t = "sgb_naive"  # configure() deletes it between configurations
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, {"add": {"table": {"family": "bridge", "name": t}}},
                         *({"add": {"chain": {"family": "bridge", "table": t, "name": h, "type": "filter",
                                              "hook": h, "prio": -190, "policy": "accept"}}} for h in hooks)]}


def undispatched(batch: dict) -> dict:
    """segguard's batch with the verdict maps' elements dropped: every base chain and
    netdev ingress chain in place, no frame sent on to a class chain (and the MAC guard
    empty too: it judges only ports without a dispatch element, which would now be the
    guest's own)."""
    out = copy.deepcopy(batch)
    for cmd in out["nftables"]:
        m = cmd.get("add", {}).get("map")
        if m and (m["name"].endswith("_dispatch") or m["name"] == "legacy_macs"):
            m.pop("elem", None)
    return out


def without(batch: dict, pred) -> dict:
    return {"nftables": [cmd for cmd in copy.deepcopy(batch)["nftables"] if not pred(cmd)]}


def _is_mac_guard(cmd: dict) -> bool:
    r = cmd.get("add", {}).get("rule")
    return bool(r) and r["chain"] in ("prerouting", "input") and any(e.get("vmap", {}).get("data") == "@legacy_macs" for e in r["expr"])


def _is_netdev(cmd: dict) -> bool:
    for verb in ("add", "delete"):
        body = cmd.get(verb)
        inner = next(iter(body.values())) if isinstance(body, dict) else None
        if isinstance(inner, dict) and inner.get("family") == "netdev":
            return True
    return False


PIN: list[str] = []  # ["taskset", "-c", K] with --cpu: sender, receiver and their softirqs on one core
PERF: list[int] = []  # [K] with --perf: sample core K while iperf3 runs
# the kernel's nftables evaluation: the rule loop, expressions, set lookups and hashing
FILTER_SYMBOLS = re.compile(r"nft_|jhash|rhash|pipapo|nf_hook_slow|sized_strscpy")


def iperf(cli: str, seconds: int) -> tuple[float, float | None]:
    """Throughput, and with --perf the share of core K's samples spent in nftables
    (the core is saturated when pinned: that share is what filtering costs it)."""
    rec = None
    if PERF:
        data = Path(tempfile.mkdtemp(prefix="sgb-perf-")) / "perf.data"
        # (the sampling window sits inside the transfer: iperf3 connects first)
        rec = subprocess.Popen(["perf", "record", "-q", "-C", str(PERF[0]), "-o", str(data), "--", "sleep", str(max(seconds - 1, 1))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = subprocess.run(["ip", "netns", "exec", cli, *PIN, "iperf3", "-c", c.guest_v4(LAST), "-p", str(IPERF_PORT),
                          "-t", str(seconds), "-J"], capture_output=True, text=True, check=True, timeout=seconds + 30)
    bps = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
    if rec is None:
        return bps, None
    rec.wait(30)
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-n", "--no-children", "--sort", "symbol", "-g", "none"],
                         capture_output=True, text=True, check=True).stdout
    shutil.rmtree(data.parent, ignore_errors=True)
    total = filt = 0
    for line in rep.splitlines():
        f = line.split()
        if len(f) >= 4 and f[0].endswith("%") and f[1].isdigit():
            total += int(f[1])
            filt += int(f[1]) if FILTER_SYMBOLS.search(f[3]) else 0  # "7.8%  1565  [k] nft_do_chain  -  -"
    return bps, (filt / total if total else None)


def rr(cli: str, count: int) -> list[float]:
    out = subprocess.run(["ip", "netns", "exec", cli, *PIN, sys.executable, "-m", "benchmarks._rr", "client",
                          c.guest_v4(LAST), str(RR_PORT), str(count)], capture_output=True, text=True, check=True,
                         cwd=c.ROOT, timeout=120)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4, help="iperf3 duration per sample")
    ap.add_argument("--rr", type=int, default=3000, help="round trips per latency sample")
    ap.add_argument("--cpu", type=int, default=None,
                    help="pin sender and receiver to this core: a veth delivers in the sender's context, so the "
                         "bridge and its filters run there too, and the run measures one core's cost per packet")
    ap.add_argument("--only", default=None,
                    help="comma-separated configurations to run, e.g. dispatch,-netdev,segguard (none is always included)")
    ap.add_argument("--compare", metavar="NAME=FILE", action="append", default=[],
                    help="one more configuration: a libnftables JSON batch from FILE (e.g. segguard's table as an "
                         "older commit compiles it: python -m benchmarks.bench_forwarding --dump FILE there), run as NAME")
    ap.add_argument("--dump", metavar="FILE", help="write segguard's batch for the 1,000 guests to FILE and exit")
    ap.add_argument("--perf", action="store_true",
                    help="with --cpu: sample that core with perf while iperf3 runs and report the share spent in "
                         "nftables (a per-packet cost that the throughput's run-to-run noise hides)")
    args = ap.parse_args(argv)
    if args.perf and args.cpu is None:
        ap.error("--perf needs --cpu (the share is of one saturated core)")
    PIN[:] = ["taskset", "-c", str(args.cpu)] if args.cpu is not None else []
    PERF[:] = [args.cpu] if args.perf else []
    c.require_root()
    c.apt_install("iperf3", "ethtool", *(["linux-perf"] if args.perf else []))
    from segguard.apply.nftables import Nft, replace_batch
    from segguard.compile import compile_plan
    from segguard.config.validate import load_config
    from segguard.lab import netns as nl
    from segguard.plan import jsonable

    servers: list[subprocess.Popen] = []
    if args.dump:
        with c.tempdir("fwd") as d:
            c.write_fleet(d, N, shared=True)
            Path(args.dump).write_text(json.dumps(replace_batch(compile_plan(load_config(d), c.facts(N))), default=jsonable))
        return {}
    compare = dict(x.split("=", 1) for x in args.compare)
    kinds = ("none", "empty", "empty2", "dispatch", "-macguard", "-netdev", "segguard", *compare, "naive")
    if args.only:
        kinds = tuple(k for k in kinds if k == "none" or k in args.only.split(","))
    res = {k: {"bps": [], "rtt": [], "filter_share": []} for k in kinds}
    with c.tempdir("fwd") as d, c.bench_netns("fhv") as hv, c.bench_netns("fcli") as cli, c.bench_netns("fsrv") as srv:
        try:
            build(hv, cli, srv)
            c.write_fleet(d, N, shared=True)
            plan = compile_plan(load_config(d), c.facts(N))
            naive = naive_batch()
            seg_batch = replace_batch(plan)
            batches = {"none": None, "empty": empty_batch(), "empty2": empty_batch(("prerouting", "forward")), "dispatch": undispatched(seg_batch), "segguard": seg_batch,
                       "-macguard": without(undispatched(seg_batch), _is_mac_guard),
                       "-netdev": without(undispatched(seg_batch), _is_netdev),
                       "naive": naive, **{k: json.loads(Path(f).read_text()) for k, f in compare.items()}}
            servers.append(subprocess.Popen(["ip", "netns", "exec", srv, *PIN, "iperf3", "-s", "-p", str(IPERF_PORT)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            servers.append(subprocess.Popen(["ip", "netns", "exec", srv, *PIN, sys.executable, "-m", "benchmarks._rr", "server",
                                             str(RR_PORT)], cwd=c.ROOT))
            time.sleep(1.0)
            with nl.enter_netns(hv):
                nft = Nft()
            seg_rules = sum(1 for o in plan.nft if "rule" in o)
            naive_rules = sum(1 for x in naive["nftables"] if "rule" in x.get("add", {}))

            def configure(kind: str) -> None:
                with nl.enter_netns(hv):
                    # every table, the netdev one included: a leftover netdev ingress
                    # chain would tax the "none" baseline of every later round
                    for fam, tbl in sorted(nft.tables()):
                        # text command: libnftables 1.0.6's JSON `delete table` refuses
                        # (ENOENT) a table this context has just added through JSON
                        rc, _, err = nft._nft.cmd(f"delete table {fam} {tbl}")
                        if rc != 0:
                            raise RuntimeError(f"cannot delete table {fam} {tbl}: {err}")
                    assert not nft.tables(), f"tables still loaded: {nft.tables()}"
                    if batches[kind] is not None:
                        nft.run(batches[kind], f"bench {kind}")

            for r in range(args.rounds):
                for kind in kinds:
                    configure(kind)
                    bps, share = iperf(cli, args.seconds)
                    res[kind]["bps"].append(bps)
                    if share is not None:
                        res[kind]["filter_share"].append(share)
                    res[kind]["rtt"].extend(rr(cli, args.rr))
                    print(f"  round {r + 1}/{args.rounds} {kind}: {bps / 1e9:.2f} Gbit/s"
                          + (f", nftables {100 * share:.1f} % of the core" if share is not None else ""), flush=True)
            configure("none")
        finally:
            for p in servers:
                p.terminate()
            for p in servers:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
    summary = {k: {"gbps": c.summarize([b / 1e9 for b in v["bps"]]), "rtt": c.summarize(v["rtt"]),
                   **({"filter_share": c.summarize(v["filter_share"])} if v["filter_share"] else {})} for k, v in res.items()}
    base = summary["none"]
    rows = []
    rule_count = {"none": 0, "empty": 0, "empty2": 0, "dispatch": seg_rules, "segguard": seg_rules, "naive": naive_rules}
    rule_count.update({k: sum(1 for x in batches[k]["nftables"] if "rule" in x.get("add", {})) for k in ("-macguard", "-netdev", *compare)})
    for k in kinds:
        s = summary[k]
        rows.append([k, rule_count[k], s["gbps"]["n"], f"{s['gbps']['median']:.2f}",
                     f"{s['gbps']['min']:.2f} - {s['gbps']['max']:.2f}", f"{100 * s['gbps']['median'] / base['gbps']['median']:.0f} %",
                     c.fmt_s(s["rtt"]["median"]), c.fmt_s(s["rtt"]["p99"])]
                    + ([f"{100 * s['filter_share']['median']:.1f} % ({100 * s['filter_share']['min']:.1f} - "
                        f"{100 * s['filter_share']['max']:.1f})" if "filter_share" in s else "-"] if PERF else []))
    c.table(f"forwarding through br0, {N} guests loaded, traffic to the last guest (offloads off)",
            ["config", "rules", "runs", "Gbit/s median", "min - max", "of none", "RTT p50", "RTT p99"]
            + (["nftables share of the core"] if PERF else []), rows)

    def pct(kind: str) -> float | None:
        return 100 * summary[kind]["gbps"]["median"] / base["gbps"]["median"] if kind in summary else None

    targets: dict = {"floor_pct_of_none": pct("empty"),  # what no bridge-family design beats here: one empty chain
                     "two_hook_floor_pct_of_none": pct("empty2"),  # two empty chains: prerouting and forward
                     "dispatch_pct_of_none": pct("dispatch"), "throughput_pct_of_none": pct("segguard")}
    if "segguard" in summary:
        seg = summary["segguard"]
        targets.update({"throughput_met": seg["gbps"]["median"] >= 0.95 * base["gbps"]["median"],
                        "p99_rtt_ratio": seg["rtt"]["p99"] / base["rtt"]["p99"],
                        "p99_met_strict": seg["rtt"]["p99"] <= base["rtt"]["p99"]})
    data = {"n_guests": N, "rules": {"segguard": seg_rules, "naive": naive_rules}, "summary": summary,
            "samples_gbps": {k: v["bps"] for k, v in res.items()}, "targets": targets,
            "pinned_cpu": args.cpu, "configs": list(kinds), "perf": bool(PERF),
            "samples_filter_share": {k: v["filter_share"] for k, v in res.items() if v["filter_share"]}}
    # a partial or pinned run does not replace the full one's file
    name = "forwarding" + (f"-cpu{args.cpu}" if args.cpu is not None else "") + ("-only" if args.only else "")
    c.write_result(name, data)
    return data


if __name__ == "__main__":
    main()
