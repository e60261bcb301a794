"""segguard command line. The only place errors become messages and exit codes."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from segguard.errors import ApplyError, ConfigError, SegguardError
from segguard.plan import jsonable

EXIT_CODES = """Exit codes: 0 ok; 1 error; 2 invalid config (nothing applied); 3 host facts
unreadable; 4 the kernel refused the transaction or read-back differed (the previous
policy stays in force); 5 verification failed (an expectation did not hold); 6 lab
error; 7 a VLAN change was refused (it takes VLANs from ports that are not legacy
guests; site.yaml must allow it; nothing applied); 8 site.yaml requires the VLAN layer
and this host cannot carry it (nothing applied); 10 `plan` found changes to apply."""

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Wall off legacy VMs on a KVM host: nftables bridge rules, VLAN filters, "
                       "proven by real packets.\n\n" + EXIT_CODES)
lab_app = typer.Typer(no_args_is_help=True, help="A hypervisor, guests, a DC, a router and an 'internet' in network namespaces.")
app.add_typer(lab_app, name="lab")
audit_app = typer.Typer(no_args_is_help=True, help="Reports about the host, for the people who run its network.")
app.add_typer(audit_app, name="audit")

ConfigOpt = typer.Option(None, "--config", "-c", envvar="SEGGUARD_CONFIG",
                         help="config directory holding site.yaml and profiles/*.yaml [default: /etc/segguard]")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


@app.command()
def validate(config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Check the configuration; print every problem as file:line: field: message."""
    from segguard.config.validate import load_config

    cfg = load_config(config)
    guests = cfg.guests()
    if as_json:
        _out(json.dumps({"valid": True, "profiles": [lp.name for lp in cfg.profiles], "guests": [g.name for _, g in guests]}))
    else:
        _out(f"ok: {len(cfg.profiles)} profiles, {len(guests)} legacy guests in {cfg.directory}")


@app.command()
def plan(config: Optional[Path] = ConfigOpt, offline: bool = typer.Option(False, "--offline", help="print the compiled plan; touch no kernel"),
         facts: Optional[Path] = typer.Option(None, "--facts", help="host facts JSON to compile against (implies --offline)"),
         as_json: bool = JsonOpt) -> None:
    """What `apply` would change against the live kernel (or, --offline, the compiled plan)."""
    from segguard.flow import build_plan
    from segguard.host import HostFacts
    from segguard.report import bindings_table, console

    host_facts = None
    if facts is not None:
        host_facts = HostFacts.from_dict(json.loads(facts.read_text()))
        offline = True
    elif offline:
        host_facts = HostFacts()
    cfg, hf, p = build_plan(config, host_facts)
    if offline:
        _out(p.to_json() if as_json else _plan_summary(p))
        return
    from segguard.apply.nftables import NftablesApplier

    diff = NftablesApplier().diff(p)
    vlan_changes = any(bv.changed for bv in p.vlans)
    if as_json:
        _out(json.dumps({"changes": not diff.empty or vlan_changes, "missing": list(diff.missing), "unexpected": list(diff.unexpected),
                         "vlan_changes": vlan_changes, "plan": p.to_dict()}, indent=2, sort_keys=True,
                         default=jsonable))
    else:
        console.print(bindings_table(p))
        for w in p.warnings:
            _out(f"warning: {w}")
        if diff.empty:
            _out("no changes: the kernel already holds this plan")
        else:
            _out(f"{len(diff.missing)} objects to add, {len(diff.unexpected)} to remove:")
            for line in diff.describe(limit=50):
                _out("  " + line)
        from segguard.audit import vlan_plan_lines

        for line in vlan_plan_lines(p):
            _out(line)
    if not diff.empty or vlan_changes:
        raise typer.Exit(10)


def _plan_summary(p) -> str:
    kinds: dict[str, int] = {}
    for o in p.nft:
        k = next(iter(o))
        kinds[k] = kinds.get(k, 0) + 1
    lines = [f"table bridge {p.table}: " + ", ".join(f"{n} {k}s" for k, n in sorted(kinds.items())),
             f"mode: {'stateful (ct state)' if p.stateful else 'stateless reply rules'}"]
    for b in p.bindings:
        lines.append(f"  {b.guest} ({b.profile}): {b.mac} on {b.bridge}/{b.port or 'UNBOUND'} [{b.source}] {b.mode}")
    lines += [f"warning: {w}" for w in p.warnings]
    from segguard.audit import vlan_plan_lines

    lines += vlan_plan_lines(p)
    return "\n".join(lines)


@app.command()
def apply(config: Optional[Path] = ConfigOpt, dry_run: bool = typer.Option(False, "--dry-run", help="compile and compare; change nothing"),
          as_json: bool = JsonOpt) -> None:
    """Replace segguard's table in one atomic transaction, then read it back."""
    from segguard.flow import apply_plan, build_plan

    cfg, hf, p = build_plan(config)
    result = apply_plan(p, dry_run=dry_run)
    state = "would change" if dry_run and result.changed else ("applied" if result.changed else "unchanged")
    if as_json:
        _out(json.dumps({"result": state, "stateful": p.stateful, "seconds": round(result.seconds, 4),
                         "guests": len(p.bindings), "warnings": list(p.warnings) + list(result.warnings),
                         "vlan": [r.to_dict() for r in result.vlan_reports]}))
        return
    for w in p.warnings:
        _out(f"warning: {w}")
    mode = "stateful (conntrack: ct state)" if p.stateful else "stateless reply rules (no nf_conntrack_bridge)"
    _out(f"{state}: table bridge {p.table}, {len(p.bindings)} legacy guests, {mode}, {result.seconds * 1000:.0f} ms")
    for r in result.vlan_reports:
        _out(f"VLAN layer, bridge {r.bridge}: {'applied' if r.changed else 'unchanged'}, read back equal to the plan")
    for w in result.warnings:
        _out(f"warning: {w}")


@app.command()
def status(config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Desired (config) vs realized (kernel) per guest, and which reply mode is live."""
    from segguard.apply.nftables import NftablesApplier, diff_objects, uses_conntrack
    from segguard.flow import build_plan, last_applied
    from segguard.report import bindings_table, console

    from segguard.flow import read_state

    agent = read_state("agent")
    config_problems = None
    try:
        cfg, hf, p = build_plan(config)
    except ConfigError as exc:
        # The agent keeps enforcing the last good config; say so, and judge the kernel by it.
        from segguard.agent.state import plan_from_dict
        from segguard.host import HostFacts

        config_problems = [str(pr) for pr in exc.problems]
        prev = last_applied()
        if prev is None:
            raise
        p, hf = plan_from_dict(prev), HostFacts(bridge_conntrack=bool(prev.get("stateful")))
    applier = NftablesApplier()
    leftover = 0
    if applier.holds_exactly(p):  # the common case, told from dumps without a listing
        present, diff, live_stateful = True, diff_objects([], []), uses_conntrack(list(p.nft))
    else:
        realized = applier.realized(p.table)
        if realized is not None and agent and agent.get("leftover_ports"):
            # what the agent left of unbound ports (inert: no dispatch element in this very
            # listing reaches them) is not drift; anything else still is
            from segguard.apply.incremental import strip_inert_leftovers

            realized, leftover = strip_inert_leftovers(realized, agent["leftover_ports"])
        diff = diff_objects(list(p.nft), realized)
        present, live_stateful = realized is not None, None if realized is None else uses_conntrack(realized)
    from segguard.audit import vlan_status, vlan_status_lines

    vlans = vlan_status(p)
    data = {
        "table": p.table, "table_present": present, "in_sync": diff.empty and present and vlans["in_sync"],
        "reply_mode_live": None if live_stateful is None else ("stateful (ct state)" if live_stateful else "stateless"),
        "conntrack_bridge_available": hf.bridge_conntrack,
        "vlan_layer": "missing: kernel lacks bridge VLAN filtering" if not hf.vlan_filtering else vlans["layer"],
        "vlans": vlans["bridges"],
        "guests": [b.__dict__ for b in p.bindings],
        "drift": diff.describe(limit=20),
        "leftover_elements": leftover,
        "last_applied_guests": len((last_applied() or {}).get("bindings", [])),
        "config_error": config_problems,
        "agent": agent,
    }
    if as_json:
        _out(json.dumps(data, indent=2, sort_keys=True))
    else:
        console.print(bindings_table(p, "legacy guests (desired)"))
        _out(f"table bridge {p.table}: {'present' if present else 'ABSENT'}; "
             f"{'realized == desired' if data['in_sync'] else 'DRIFT: ' + '; '.join(data['drift'][:5])}")
        _out(f"reply mode live: {data['reply_mode_live'] or '-'} (nf_conntrack_bridge {'available' if hf.bridge_conntrack else 'missing'})")
        for line in vlan_status_lines({**vlans, "layer": data["vlan_layer"]}):
            _out(line)
        for line in config_problems or ():
            _out(f"config INVALID (last good policy still enforced): {line}")
        if agent:
            _agent_status(agent)
    if config_problems:
        raise typer.Exit(2)
    if not data["in_sync"]:
        raise typer.Exit(1)


def _agent_status(agent: dict) -> None:
    import datetime

    def when(ts):
        return datetime.datetime.fromtimestamp(ts).strftime("%H:%M:%S") if ts else "-"

    la, ld = agent.get("last_apply") or {}, agent.get("last_drift") or {}
    _out(f"agent: pid {agent.get('pid')}, {'ready' if agent.get('ready') else 'starting'}; last apply {la.get('kind', '-')} "
         f"{la.get('result', '')} at {when(la.get('at'))}; last drift {ld.get('kind', '-')} at {when(ld.get('at'))}")
    for line in agent.get("config_error") or ():
        _out(f"agent config error (last good policy still enforced): {line}")
    if agent.get("vlan_layer"):
        _out(f"agent VLAN layer: {agent['vlan_layer']}")
    if left := agent.get("leftover_ports"):
        _out(f"agent: interval-set elements of {len(left)} unbound port(s) ({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}) "
             f"not deleted yet: no dispatch element reaches them; deleted when the agent is quiet")
    if agent.get("verifying"):
        _out(f"agent: live verify of {agent['verifying'].get('guest')} in progress; the table holds its probe stand-in "
             f"until it ends")
    for name, g in sorted((agent.get("guests") or {}).items()):
        d, v = g.get("last_drift") or {}, g.get("last_verify") or {}
        verdict = "-" if not v else ("pass" if v.get("ok") else "FAIL: " + "; ".join(v.get("problems", [])[:2]))
        if v and "passed" in v:
            verdict += f" ({v['passed']} held, {v['failed']} failed)"
        vl = g.get("vlan") or {}
        vlan = (f"; VLAN {vl.get('vlan')}: " + (f"desired {vl['desired']}, realized {vl.get('realized')}" if "desired" in vl
                                                  else vl.get("layer", "-"))) if vl else ""
        _out(f"  {name}: port {g.get('port') or 'UNBOUND'}; desired {g.get('desired')}; realized {g.get('realized')}{vlan}; "
             f"last drift {d.get('kind', '-')} {when(d.get('at')) if d else ''}; last verify {verdict} {when(v.get('at')) if v else ''}")


@app.command()
def remove(config: Optional[Path] = ConfigOpt, yes: bool = typer.Option(False, "--yes", help="confirm: take protection down")) -> None:
    """Delete segguard's table: the only way protection comes down."""
    from segguard.flow import remove as do_remove

    if not yes:
        typer.confirm("Remove every segguard rule? Legacy guests will be unprotected", abort=True)
    _out("removed table bridge segguard" if do_remove() else "nothing to remove")


@app.command()
def verify(config: Optional[Path] = ConfigOpt, guest: Optional[list[str]] = typer.Option(None, "--guest", help="only these guests"),
           lab_prefix: str = typer.Option("sglab-", "--lab-prefix", help="namespace prefix of a running lab (`segguard lab up`)"),
           live: bool = typer.Option(False, "--live", help="verify on this host through temporary probe ports on each guest's bridge"),
           as_json: bool = JsonOpt) -> None:
    """Send real packets and report, per expectation, what arrived where.

    Lab (default): from inside each legacy guest's namespace of a running lab.
    --live: on this host, without touching the guests: a stand-in probe port enrolled
    in the guest's policy sends, unenrolled probe ports observe; failed probes reach
    only those probe ports."""
    if live:
        from segguard.verify.live import verify_live

        results = verify_live(config, guests=guest)
    else:
        from segguard.verify.lab import verify_lab

        results = verify_lab(config, lab_prefix, guests=guest)
    _render_results(results, as_json)


def _render_results(results, as_json: bool) -> None:
    from segguard.errors import VerifyFailed
    from segguard.report import console

    failed = [r for r in results if not r["pass"]]
    if as_json:
        _out(json.dumps({"passed": len(results) - len(failed), "failed": len(failed), "results": results}, indent=2, sort_keys=True))
    else:
        console.print(_results_table(results))
        _out(f"{len(results) - len(failed)} expectations held, {len(failed)} failed")
    if failed or not results:
        raise VerifyFailed(f"{len(failed)} of {len(results)} expectations did not hold" if results else "no expectation was checked")


def _results_table(results):
    from segguard.report import results_table

    return results_table(results)


_MAX_EXTRA = 150  # segguard.lab.topology.MAX_EXTRA_LEGACY (checked by a test): typer needs it before the import
ExtraLegacyOpt = typer.Option(0, "--extra-legacy", min=0, max=_MAX_EXTRA,
                              help="K more legacy guests on br0, each with a copy of xp-line3's profile (a scaled lab)")


@lab_app.command("up")
def lab_up(prefix: str = typer.Option("sglab-", "--prefix"), config: Optional[Path] = ConfigOpt,
           extra_legacy: int = ExtraLegacyOpt) -> None:
    """Build the lab namespaces and apply the example config in the hypervisor namespace
    (with --extra-legacy, the example plus a profile per extra guest; `segguard verify`
    of this lab finds them by their namespaces)."""
    from segguard.verify.lab import lab_up as up

    lab = up(prefix, config, extra_legacy=extra_legacy)
    shown = [h.ns for h in lab.hosts]
    if len(shown) > 16:
        shown = shown[:12] + [f"... ({len(shown) - 12} more)"]
    _out(f"lab up: namespaces {', '.join(shown)}")


@lab_app.command("down")
def lab_down(prefix: str = typer.Option("sglab-", "--prefix")) -> None:
    """Delete every lab namespace with this prefix."""
    from segguard.lab.topology import destroy

    destroy(prefix)
    _out("lab down")


@lab_app.command("run")
def lab_run(prefix: str = typer.Option("sglab-", "--prefix"), config: Optional[Path] = ConfigOpt,
            keep: bool = typer.Option(False, "--keep", help="leave the lab up afterwards"), as_json: bool = JsonOpt,
            extra_legacy: int = ExtraLegacyOpt) -> None:
    """Build the lab, apply the example config, verify from inside the legacy guests,
    show the ordinary guest still reaching the internet, and tear it all down."""
    from segguard.verify.lab import lab_run as run

    results = run(prefix, config, keep=keep, extra_legacy=extra_legacy)
    _render_results(results, as_json)


@app.command()
def agent(config: Optional[Path] = ConfigOpt,
          metrics: Optional[str] = typer.Option(None, "--metrics", help="serve Prometheus metrics on ADDR:PORT (default addr 127.0.0.1)"),
          verify_every: float = typer.Option(0.0, "--verify-every", help="seconds between rounds of real-packet verification of "
                                             "every guest through probe ports, as `verify --live` (0, the default: never)"),
          drift_every: float = typer.Option(30.0, "--drift-every", help="seconds between full drift checks besides the event-driven ones"),
          leftover_quiet: float = typer.Option(2.0, "--leftover-quiet", help="seconds without a reconcile before an unbound "
                                               "port's leftover interval-set elements are deleted (they allow nothing "
                                               "meanwhile; see README)")) -> None:
    """The host agent: apply, then keep the kernel holding the plan as taps come and go,
    the config changes and hands change the ruleset. Stopping it removes nothing."""
    from segguard.agent import Agent

    addr = None
    if metrics:
        host, _, port = metrics.rpartition(":")
        addr = (host or "127.0.0.1", int(port))
    raise typer.Exit(Agent(config, metrics_addr=addr, verify_every=verify_every or None, drift_every=drift_every or None,
                           leftover_quiet=leftover_quiet).run())


@app.command("install-hook")
def install_hook(config: Optional[Path] = ConfigOpt,
                 path: Path = typer.Option(Path("/etc/libvirt/hooks/qemu"), "--path", help="hook file to write"),
                 force: bool = typer.Option(False, "--force", help="replace a hook segguard did not write")) -> None:
    """Install the libvirt qemu hook that refuses to start a legacy guest whose policy is not loaded."""
    from segguard.agent.install import write_hook

    _out(f"wrote {write_hook(path, config, force)}")


@app.command("install-unit")
def install_unit(config: Optional[Path] = ConfigOpt,
                 path: Path = typer.Option(Path("/etc/systemd/system/segguard-agent.service"), "--path", help="unit file to write"),
                 metrics: Optional[str] = typer.Option(None, "--metrics", help="ADDR:PORT for the agent's metrics")) -> None:
    """Install the systemd unit of the agent, ordered before libvirt's guest autostart."""
    from segguard.agent.install import write_unit

    _out(f"wrote {write_unit(path, config, metrics)}; run: systemctl daemon-reload && systemctl enable --now segguard-agent")


@audit_app.command("vlans")
def audit_vlans(config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt,
                facts: Optional[Path] = typer.Option(None, "--facts", help="host facts JSON instead of this host's kernel")) -> None:
    """Per bridge: the VLANs the uplink trunks, which ports use each, those nothing on this
    host uses, and every port (legacy or not) that can reach a management VLAN."""
    from segguard.audit import audit_lines, audit_vlans as build
    from segguard.config.validate import load_config
    from segguard.flow import build_plan
    from segguard.host import HostFacts

    cfg = load_config(config)
    if facts is not None:
        hf = HostFacts.from_dict(json.loads(facts.read_text()))
    else:
        names = sorted({lp.profile.bridge for lp in cfg.profiles} | set(cfg.site.bridges))
        from segguard.host.netlink import read_host_facts

        hf = read_host_facts(names)
    _, _, p = build_plan(config, hf)
    report = build(cfg, hf, p)
    _out(json.dumps(report, indent=2, sort_keys=True) if as_json else "\n".join(audit_lines(report)))


def main() -> None:
    try:
        # standalone: typer/click turn usage errors into exit 2 and typer.Exit into its code
        app(standalone_mode=True)
    except SegguardError as exc:
        _fail(exc)


def _fail(exc: SegguardError) -> None:
    if isinstance(exc, ConfigError):
        for p in exc.problems:
            sys.stderr.write(f"{p}\n")
        sys.stderr.write(f"segguard: configuration invalid ({len(exc.problems)} problems); nothing was applied\n")
    else:
        sys.stderr.write(f"segguard: {exc}\n")
        if isinstance(exc, ApplyError):
            for d in exc.details:
                sys.stderr.write(f"  {d}\n")
            if exc.batch is not None:
                dump = Path("/run/segguard/failed-batch.json")
                try:
                    dump.parent.mkdir(parents=True, exist_ok=True)
                    dump.write_text(json.dumps(exc.batch, indent=1, default=jsonable))
                    sys.stderr.write(f"  the exact batch sent is in {dump}; the previous policy is still in force\n")
                except OSError:
                    pass
    sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
