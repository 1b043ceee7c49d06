#!/usr/bin/env python3
"""Writes the README's results section from what scripts/results.sh measured.

Usage: scripts/results.py DIR README.md

DIR holds floor.json, fault-memslot.json, fault-uffd.json, dedup.json and
one directory per workload and view (WORKLOAD-VIEW) with its compare.json,
compare.svg and table.txt. The
section between the markers `<!-- results:begin -->` and
`<!-- results:end -->` of README.md is replaced; nothing else is touched.
"""

import datetime
import json
import os
import sys

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
WORKLOADS = [
    ("pagefill", "read-mostly after merge"),
    ("cowstorm", "write-heavy: a copy-on-write storm"),
    ("mixed", "mixed reads and writes, many phases"),
    ("volatile", "volatile: pages that never settle, ksmd running"),
]


def load(path):
    with open(path) as f:
        return json.load(f)


def fig(summary, name, policy):
    s = summary["figures"].get(name, {}).get(policy)
    return s["median"] if s else 0.0


def fmt_int(v):
    return f"{v:,.0f}"


def fmt_ms(ns):
    return f"{ns / 1e6:,.1f} ms"


def workload_table(rel, name, what, reports):
    """One table per workload: a row per (policy, view); `reports` maps a
    view to its compare.json."""
    first = next(iter(reports.values()))
    s = first["setup"]
    out = [f"#### {name}: {what}", ""]
    out.append(
        f"{s['mem_bytes'] >> 20} MiB of RAM, median of {s['repeat']} interleaved runs per policy "
        f"(`vmm compare {name} --mem {s['mem_bytes'] >> 20}M --repeat {s['repeat']} --view VIEW`). VM exits as the "
        "host KVM counts them (its binary stat `exits`, which also sees the faults it serves itself); "
        "secondary-MMU faults as the VMM serves them (`ept_read` + `ept_write` + `ept_fetch`)."
    )
    out.append("")
    out.append("| policy | view | VM exits (host KVM) | vs off | secondary-MMU faults (VMM) | deduplicator CPU | "
               "whole run (wall) | pages_sharing at the end |")
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for view, report in reports.items():
        total = report["total"]
        policies = report["policies"]
        off_exits = fig(total, "kvm.exits", "off") if "off" in policies else None
        for p in policies:
            exits = fig(total, "kvm.exits", p)
            faults = sum(fig(total, f"exits.{k}", p) for k in ("ept_read", "ept_write", "ept_fetch"))
            ratio = f"{exits / off_exits:.2f}x" if off_exits else "-"
            shown_view = "(host KVM)" if p == "kernel" else view
            out.append(
                f"| {p} | {shown_view} | {fmt_int(exits)} | {ratio} | {fmt_int(faults)} | "
                f"{fmt_ms(fig(total, 'ksm.cpu_ns', p))} | {fmt_ms(fig(total, 'wall_ns', p))} | "
                f"{fmt_int(fig(total, 'ksm.pages_sharing', p))} |"
            )
    out.append("")
    for view, report in reports.items():
        for sk in report["skipped"]:
            out.append(f"Skipped {sk['policy']} ({view}): {sk['reason']}")
    verdicts = []
    for view, report in reports.items():
        verdicts.append(f"{view}: " + ("identical under every policy" if report["reports_identical"]
                                       else "NOT identical: " + ", ".join(report["report_mismatches"])))
        if report["failed_runs"]:
            verdicts.append(f"{view}: failed runs: " + "; ".join(report["failed_runs"]))
    out.append("Guest checksums: " + "; ".join(verdicts) + ". Every phase side by side: " + ", ".join(
        f"[{view}]({rel}/{name}-{view}/table.txt)" for view in reports) + ".")
    out.append("")
    for view in reports:
        out.append(f"![{name}, {view} view: exits and time per phase per policy]({rel}/{name}-{view}/compare.svg)")
        out.append("")
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    d, readme = sys.argv[1], sys.argv[2]
    rel = os.path.relpath(d, os.path.dirname(os.path.abspath(readme)))
    floor = load(os.path.join(d, "floor.json"))
    faults = {v: load(os.path.join(d, f"fault-{v}.json")) for v in ("memslot", "uffd")}
    dedup = load(os.path.join(d, "dedup.json"))
    first = load(os.path.join(d, WORKLOADS[0][0] + "-memslot", "compare.json"))["setup"]
    when = datetime.datetime.fromtimestamp(first["started_unix"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    out = [BEGIN, ""]
    out.append(
        f"Measured {when} on `{first['host']}` (Linux {first['kernel']}, {first['cpus']} CPUs) by "
        "`scripts/results.sh`, which regenerates this section. On the development machine KVM is software "
        "virtualisation (PVM: an exit costs about 26 us; see 'Reading the results' below); machines like it are shared "
        "and noisy: read ratios measured side by side, not absolute times."
    )
    out.append("")
    out.append("### Costs, each a ratio measured side by side in one run")
    out.append("")
    out.append("| benchmark | ours | baseline | ratio | command |")
    out.append("| --- | ---: | ---: | ---: | --- |")
    out.append(
        f"| exit floor: one port-I/O exit through the VMM vs a bare KVM_RUN loop | "
        f"{floor['port_io_exit']['median_ns'] / 1e3:.1f} us | {floor['bare_exit']['median_ns'] / 1e3:.1f} us | "
        f"{floor['ratio']:.3f} | `vmm bench floor` |"
    )
    for v, r in faults.items():
        out.append(
            f"| secondary-MMU fault ({v} view) vs its bare mechanism | {r['fault_ns'] / 1e3:.1f} us | "
            f"{r['bare_ns'] / 1e3:.1f} us | {r['ratio']:.2f} | `vmm bench fault --view {v}` |"
        )
    kernel = dedup["policies"].get("kernel")
    mib = dedup["mem_bytes"] >> 20
    for name in ("range-flush", "change-pte"):
        r = dedup["policies"].get(name)
        if not r:
            continue
        k = r.get("ratio_to_kernel") or {}
        kv = lambda f: f"{kernel[f] / 1e3:.2f} us" if kernel else "-"
        rat = lambda f: f"{k[f]:.2f}" if f in k else "-"
        out.append(f"| scan cost per page, {name} vs Linux KSM (`unique`, {mib} MiB) | {r['scan_ns_per_page'] / 1e3:.2f} us | "
                   f"{kv('scan_ns_per_page')} | {rat('scan_ns_per_page')} | `vmm bench dedup` |")
        out.append(f"| merge cost per page, {name} vs Linux KSM (`converge`) | {r['merge_ns_per_page'] / 1e3:.2f} us | "
                   f"{kv('merge_ns_per_page')} | {rat('merge_ns_per_page')} | `vmm bench dedup` |")
        kw = f"{kernel['converge']['wall_ns'] / 1e9:.2f} s" if kernel else "-"
        kc = f"{kernel['converge']['cpu_ns'] / 1e9:.2f} s" if kernel else "-"
        out.append(f"| time to converge, {name} vs Linux KSM (`converge`, {mib} MiB, 64 groups) | "
                   f"{r['converge']['wall_ns'] / 1e9:.2f} s | {kw} | {rat('converge_wall')} | `vmm bench dedup` |")
        out.append(f"| CPU to converge, {name} vs Linux KSM | {r['converge']['cpu_ns'] / 1e9:.2f} s | {kc} | "
                   f"{rat('converge_cpu')} | `vmm bench dedup` |")
    if dedup.get("kernel_skipped"):
        out.append("")
        out.append(f"The kernel policy did not run: {dedup['kernel_skipped']}")
    out.append("")
    out.append(f"Medians of {dedup['repeat']} runs per policy ({dedup['view']} view for ours). Linux KSM's CPU is "
               "ksmd's, from /proc/PID/schedstat; a pass drives it at 4,096 pages per batch with no sleep and "
               "smart_scan off, like ours.")
    out.append("")
    out.append("### Exits per workload and policy")
    out.append("")
    for name, what in WORKLOADS:
        reports = {}
        for view in ("memslot", "uffd"):
            path = os.path.join(d, f"{name}-{view}", "compare.json")
            if os.path.exists(path):
                reports[view] = load(path)
        if reports:
            out += workload_table(rel, name, what, reports)
    out.append(END)

    text = open(readme).read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{readme} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(head + "\n".join(out) + tail)


if __name__ == "__main__":
    main()
