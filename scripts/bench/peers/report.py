"""The peers section's report: a markdown table, ratios to taskorch, notes. Orchestrator only.

Each figure is the median over rounds; each ratio is taken within a round (the peer against
taskorch serve with its journal, measured minutes apart at most), then its median over rounds.
W4's counts are summed over rounds.
"""

from __future__ import annotations

from typing import Any

BASE = "taskorch"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def figures(runs: list[dict[str, Any]], w: str, key: str) -> list[float]:
    return [r["w"][w][key] for r in runs if key in r.get("w", {}).get(w, {})]


def first_error(runs: list[dict[str, Any]], w: str) -> str:
    for r in runs:
        cell = r.get("w", {}).get(w)
        if cell and "error" in cell:
            return f"error: {cell['error']}"
        if cell and "skipped" in cell:
            return f"({cell['skipped']})"
    for r in runs:
        if r.get("killed"):
            return r["killed"]
    return "no result"


def ratios(results: dict[str, list[dict[str, Any]]], system: str, w: str,
           key: str) -> list[float]:
    """The system's figure over taskorch's, round by round (rounds where both have one)."""
    base = results.get(BASE, [])
    out = []
    for k, run in enumerate(results.get(system, [])):
        if k < len(base):
            mine = run.get("w", {}).get(w, {}).get(key)
            theirs = base[k].get("w", {}).get(w, {}).get(key)
            if mine and theirs:
                out.append(mine / theirs)
    return out


def row(system: str, label: str, runs: list[dict[str, Any]],
        results: dict[str, list[dict[str, Any]]]) -> list[str]:
    version = next((r["version"] for r in runs if r.get("version")), "?")
    enq, e2e = figures(runs, "W1", "enqueue_per_s"), figures(runs, "W1", "e2e_per_s")
    p50, p99 = figures(runs, "W2", "p50_ms"), figures(runs, "W2", "p99_ms")
    wall, speed = figures(runs, "W3", "wall_s"), figures(runs, "W3", "speedup")
    cells = [label, version]
    cells.append(f"{median(enq):,.0f}" if enq else first_error(runs, "W1"))
    cells.append(f"{median(e2e):,.0f}" if e2e else "")
    cells.append(f"{median(p50):.2f} / {median(p99):.2f}" if p50 else first_error(runs, "W2"))
    cells.append(f"{median(wall):.2f} s ({median(speed):.2f}x)" if wall
                 else first_error(runs, "W3"))
    cells.append(w4_cell(runs))
    if system == BASE:
        cells += ["1", "1"]
    else:
        e2e_r, p50_r = ratios(results, system, "W1", "e2e_per_s"), ratios(results, system, "W2",
                                                                          "p50_ms")
        cells.append(f"{median(e2e_r):.3f}" if e2e_r else "")
        cells.append(f"{median(p50_r):.1f}" if p50_r else "")
    return cells


def w4_cell(runs: list[dict[str, Any]]) -> str:
    done = [r["w"]["W4"] for r in runs if "accepted" in r.get("w", {}).get("W4", {})]
    if not done:
        return first_error(runs, "W4")
    accepted = sum(d["accepted"] for d in done)
    lost = sum(d["lost"] for d in done)
    twice = sum(d["twice"] for d in done)
    return f"{lost} lost, {twice} twice (of {accepted:,})"


HEADER = ["system", "version", "enqueue/s", "end-to-end/s", "round trip p50 / p99 ms",
          "CPU tasks: wall (speedup)", "SIGKILL mid-load", "end-to-end, x taskorch",
          "p50, x taskorch"]


def print_report(results: dict[str, list[dict[str, Any]]], why_not: dict[str, str],
                 systems: list[str], labels: dict[str, str], meta: dict[str, Any]) -> None:
    print(f"## Peers: taskorch serve against the job queues ({meta['mode']} mode, "
          f"{meta['rounds']} round(s), {meta['workers']} worker processes each)")
    print()
    print(f"W1 {meta['w1']:,} no-op tasks; W2 {meta['w2']} sequential round trips; W3 "
          f"{meta['w3']} CPU tasks of ~50 ms (serial {meta['serial_s']:.2f} s); W4 SIGKILL of "
          f"the broker or server after half of {meta['w4']:,} short tasks ended, then a "
          f"restart; \"lost\": accepted (the enqueue call returned) but not ended by the time "
          f"{meta['stall_s']:g} s passed without a task ending. Python "
          f"{meta['python']}, redis-server {meta['redis'] or 'absent'}, {meta['cpu_count']} "
          f"CPUs, load average at the end {meta['loadavg_end'][0]:.2f}.")
    print()
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for system in systems:
        if system in why_not:
            cells = [labels[system], "", f"not run: {why_not[system]}"] + [""] * 6
        else:
            cells = row(system, labels[system], results.get(system, []), results)
        print("| " + " | ".join(cells) + " |")
    print()
    print("Ratios: a system's figure over taskorch serve's (journal, full sync) in the same round, "
          "median over rounds: end-to-end above 1 is faster than taskorch, p50 above 1 slower.")
    notes = [f"{system}: {r['killed']}: {r.get('stderr_tail', '').strip()[-200:]}"
             for system, runs in results.items() for r in runs if r.get("killed")]
    notes += [f"{system}: {note}" for system, runs in results.items() for r in runs
              for note in r.get("notes", [])]
    restarted = {system: sum(r["w"]["W4"].get("workers_restarted", 0) for r in runs
                             if "accepted" in r.get("w", {}).get("W4", {}))
                 for system, runs in results.items()}
    notes += [f"{system}: W4 restarted {n} worker process(es) that exited after the broker's "
              "death (as a supervisor would)" for system, n in restarted.items() if n]
    if "huey-sqlite" in results:
        notes.append("huey-sqlite: W4 has no broker to kill (SQLite is a file in the "
                     "producer's and consumer's processes): it SIGKILLs the consumer instead")
    if notes:
        print()
        print("Notes:")
        for note in notes:
            print(f"- {note}")
