"""Parent side: the report. The markdown table, the ratio lines, the notes, and the chart.

Runs in the parent only, once every child has handed back its JSON; reads those results (a
dict per pool, as the children wrote them) and never measures anything itself.
"""

from __future__ import annotations

from typing import Any

from .config import (
    C_SLEEP_S,
    CPU_TASK_S,
    DASK_A_TASKS,
    DASK_POOLS,
    F_DEADLINE_S,
    G_TIMEOUT_S,
    H_TASK_S,
    NOISE_NOTE,
    POOL_LABELS,
    REMOTE_POOLS,
)
from .harness import describe


def print_report(children: dict[str, Any], pools: list[str], meta: dict[str, Any]) -> None:
    """The whole report on stdout: title, table, what the sections measure, ratios, notes."""
    reps, warmup = meta["reps"], meta["warmup"]
    if reps == 1:
        how = "1 repetition" + (" after a warm-up" if warmup else ", no warm-up")
    else:
        how = f"medians of {reps}" + (" after a warm-up" if warmup else "")
    print(f"## taskorch benchmark ({meta['mode']}: {meta['workers']} workers per pool, {how}; "
          f"Python {meta['python']}, {meta['cpu_count']} CPUs)\n")
    print(render(children, pools, meta))
    print()
    print("Pools: " + "; ".join(f"{p} = {POOL_LABELS[p]}"
                                + (f" {children[p]['version']}" if children[p].get("version")
                                   and p in ("loky", "pebble", "taskorch") else "")
                                for p in pools) + ".")
    print("C times each submit call alone (perf_counter_ns) while "
          f"{meta['c_tasks']:,} tasks of {C_SLEEP_S * 1e3:g} ms keep the workers busy. "
          f"D is the first pool built in a fresh interpreter that has imported the library "
          f"(the import is timed apart), median over {meta['d_reps']} such "
          f"interpreter(s) per pool, no warm-up ('restart' = a second pool in the same "
          f"interpreter). E: RSS of the interpreter that owns the pool (+ what importing the "
          f"library and running the pool added); USS of each worker. F: {meta['f_tasks']} "
          f"tasks, the 50th calls os._exit(1); the worst repetition is shown, and a future "
          f"unresolved after {F_DEADLINE_S:g} s counts as lost. "
          f"G: {G_TIMEOUT_S:g} s per-task timeout, lateness from the task's "
          f"start; 'none' = no per-task timeout. H: {meta['h_tasks']} tasks of "
          f"{H_TASK_S * 1e3:g} ms.\n")
    print("Ratios (one run; compare ratios, not absolute numbers across runs; '(noisy)': other "
          f"processes used more than {NOISE_NOTE * 100:.0f}% of a core during that section):")
    for line in ratio_lines(children, pools):
        print("- " + line)
    notes = notes_for(children, pools, meta)
    if notes:
        print("\nNotes:")
        for note in notes:
            print("- " + note)
    print(f"\n(total {meta['elapsed_s']:.1f} s)")


# -- the table -------------------------------------------------------------------------------------

ROWS: list[tuple[str, str]] = [  # (section, row title); a section may have several rows
    ("A", "A no-op throughput, tasks/s"),
    ("B", "B CPU-bound speedup vs serial"),
    ("C", "C submit latency while busy, p50 / p99 us"),
    ("D", "D cold start to first result, ms"),
    ("E", "E parent RSS, MiB (+ library and pool)"),
    ("E2", "E worker USS, MiB (mean of N)"),
    ("F", "F crash: innocent tasks ok; usable after"),
    ("G", "G hard timeout: failure seen late by, ms"),
    ("H", "H drain: last result to stop() returned, ms"),
    ("I", "I bulk map, items/s"),
    ("M", "M metrics overhead: no-op tasks/s, metrics off / on (on vs off)"),
    ("P", "P no-op tasks/s without / with delayed tasks waiting (100,000; --quick 5,000)"),
    ("Q", "Q no-op tasks/s plain / one dependency each / a key each"),
    ("R", "R serve's task records, 10,000 retained: ms per page of 100 (newest / middle / "
          "failed / by name); taskorch.progress() in a loop, ns a call"),
]


def short(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def fmt_cell(row: str, res: dict[str, Any] | None) -> str:
    section = row[0]
    if res is None:
        return "—"
    if "error" in res:
        return "error: " + short(res["error"])
    if section == "A":
        return f"{res['tasks_per_s']:,.0f}"
    if section == "M":
        return (f"{res['off_tasks_per_s']:,.0f} / {res['on_tasks_per_s']:,.0f} "
                f"({res['on_vs_off']:.3f}x; by parent CPU {res['cpu_on_vs_off']:.3f}x)")
    if section == "P":
        return (f"{res['without_tasks_per_s']:,.0f} / {res['with_tasks_per_s']:,.0f} "
                f"({res['with_vs_without']:.3f}x; enqueue {res['enqueue_delayed_us']:.1f} us)")
    if section == "R":
        return (f"{res['newest_ms']:.2f} / {res['middle_ms']:.2f} / {res['failed_ms']:.2f} / "
                f"{res['name_ms']:.2f}; progress {res['progress_call_ns']:.0f} ns")
    if section == "Q":
        return (f"{res['plain_tasks_per_s']:,.0f} / {res['after_tasks_per_s']:,.0f} / "
                f"{res['key_tasks_per_s']:,.0f} ({res['after_vs_plain']:.2f}x, "
                f"{res['key_vs_plain']:.2f}x; by parent CPU "
                f"{res['cpu_after_vs_plain']:.2f}x, {res['cpu_key_vs_plain']:.2f}x)")
    if section == "B":
        return f"{res['speedup']:.2f}x"
    if section == "C":
        return f"{res['p50_us']:.1f} / {res['p99_us']:.1f}"
    if section == "D":
        extra = [f"import {res['import_ms']:.0f}"] if res.get("import_ms") is not None else []
        if "restart_ms" in res:
            extra.append(f"restart {res['restart_ms']:.0f}")
        return f"{res['cold_ms']:.0f}" + (f" ({'; '.join(extra)})" if extra else "")
    if row == "E":
        return f"{res['parent_rss_mib']:.1f} (+{res['parent_rss_over_bare_mib']:.1f})"
    if row == "E2":
        return f"{res['worker_uss_mib']:.1f} (N={res['workers_found']})"
    if section == "F":
        lost = []
        if res.get("lost_pending"):
            lost.append(f"{res['lost_pending']:g} never resolved")
        lost += [f"{count} {kind}" for kind, count in res["lost_kinds"].items()]
        text = f"{res['ok']:g}/{res['innocent']}, usable: {'yes' if res['usable'] else 'no'}"
        each = res.get("ok_each") or []
        if len(set(each)) > 1:
            text += f" (worst rep; reps: {', '.join(str(n) for n in each)})"
        return text + (f" (lost: {'; '.join(lost)})" if lost else "")
    if section == "G":
        if not res.get("supported"):
            return "none"
        return f"+{res['late_ms']:.0f}" + ("" if res.get("usable") else ", then unusable")
    if section == "H":
        return f"{res['drain_ms']:.1f}"
    if section == "I":
        return f"{res['items_per_s']:,.0f}"
    return "?"


def pool_cell(row: str, child: dict[str, Any]) -> str:
    if "import_error" in child:
        return "error: import failed: " + short(child["import_error"], 50)
    res = child.get("sections", {}).get(row[0])
    if res is None and child.get("killed"):
        current = child.get("current")
        if current and current != row[0]:
            return f"not run (child killed during {current})"
        return "error: " + short(child["killed"])
    return fmt_cell(row, res)


def noise_cell(child: dict[str, Any]) -> str:
    overall = (child.get("noise_overall") or {}).get("cores")
    text = "—" if overall is None else f"{overall * 100:.0f}%"
    noise = {k: v["cores"] for k, v in (child.get("noise") or {}).items()
             if v.get("cores") is not None}
    if noise:
        worst = max(noise, key=lambda k: noise[k])
        text += f" (max {noise[worst] * 100:.0f}% in {worst})"
    return text


# -- the ratio lines -------------------------------------------------------------------------------

# (section, field, label, higher_is_better) for the ratio lines
RATIOS = [
    ("A", "tasks_per_s", "A no-op tasks/s", True),
    ("B", "speedup", "B CPU speedup", True),
    ("C", "p50_us", "C submit p50", False),
    ("C", "p99_us", "C submit p99", False),
    ("D", "cold_ms", "D cold start", False),
    ("E", "parent_rss_mib", "E parent RSS", False),
    ("E", "worker_uss_mib", "E worker USS", False),
    ("G", "late_ms", "G timeout lateness", False),
    ("H", "drain_ms", "H drain", False),
    ("I", "items_per_s", "I bulk map items/s", True),
]


def number(children: dict[str, Any], pool: str, section: str, field: str) -> float | None:
    res = children.get(pool, {}).get("sections", {}).get(section) or {}
    value = res.get(field)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def noisy(children: dict[str, Any], pool: str, section: str) -> bool:
    cores = ((children.get(pool, {}).get("noise") or {}).get(section) or {}).get("cores")
    return cores is not None and cores > NOISE_NOTE


def ratio_lines(children: dict[str, Any], pools: list[str]) -> list[str]:
    lines = dask_ratio_lines(children, pools) + remote_ratio_lines(children, pools)
    on_vs_off = number(children, "taskorch", "M", "on_vs_off")
    if on_vs_off is not None:
        cpu = number(children, "taskorch", "M", "cpu_on_vs_off") or 0.0
        lines.append(f"M taskorch no-op throughput with metrics on: {on_vs_off:.3f}x of metrics "
                     f"off (same pool, alternating blocks; by the parent's CPU time "
                     f"{cpu:.3f}x; target >= 0.95)"
                     + (" (noisy)" if noisy(children, "taskorch", "M") else ""))
    pools = [p for p in pools if p not in DASK_POOLS and p not in REMOTE_POOLS]
    anchors = [a for a in pools if a != "taskorch"]
    if "taskorch" not in pools or not anchors:
        return lines or ["(ratio lines compare taskorch with the anchors: include taskorch and "
                         "at least one anchor in --pools)"]
    for section, field, label, higher in RATIOS:
        mine = number(children, "taskorch", section, field)
        if section not in children.get("taskorch", {}).get("sections", {}):
            continue
        parts = []
        for anchor in anchors:
            theirs = number(children, anchor, section, field)
            if mine is None or theirs is None:
                why = "none" if section == "G" and theirs is None else "n/a"
                parts.append(f"taskorch/{anchor} = {why}")
            elif section == "G" or theirs <= 0 or mine <= 0:
                # A lateness can be ~0 ms: a ratio of two such numbers means nothing.
                parts.append(f"taskorch {mine:+.0f} ms vs {anchor} {theirs:+.0f} ms")
            else:
                parts.append(f"taskorch/{anchor} = {mine / theirs:.2f}x")
            if noisy(children, "taskorch", section) or noisy(children, anchor, section):
                parts[-1] += " (noisy)"
        better = "higher is better" if higher else "lower is better"
        lines.append(f"{label} ({better}): " + ", ".join(parts))
    mine_f = children.get("taskorch", {}).get("sections", {}).get("F")
    if mine_f and "ok" in mine_f:
        parts = [f"{pool} {fmt_cell('F', children.get(pool, {}).get('sections', {}).get('F'))}"
                 for pool in anchors]
        lines.append(f"F crash (more is better): taskorch {fmt_cell('F', mine_f)}; "
                     + "; ".join(parts))
    return lines


def remote_ratio_lines(children: dict[str, Any], pools: list[str]) -> list[str]:
    """Remote run() through taskorch serve against a local TaskOrchestrator (section A)."""
    figures = {p: number(children, p, "A", "tasks_per_s")
               for p in ("taskorch", *REMOTE_POOLS) if p in pools}
    local, on, off = (figures.get(p) for p in ("taskorch", *REMOTE_POOLS))
    parts = []
    if on and local:
        parts.append(f"journal on/local = {on / local:.2f}x (target >= 0.5x)")
    if off and local:
        parts.append(f"journal off/local = {off / local:.2f}x")
    if on and off:
        parts.append(f"journal on/off = {on / off:.2f}x (target >= 0.8x)")
    if any(noisy(children, p, "A") for p in figures):
        parts.append("(noisy)")
    return ["A no-op tasks/s, remote run() through connect() (higher is better): "
            + ", ".join(parts)] if parts else []


def dask_ratio_lines(children: dict[str, Any], pools: list[str]) -> list[str]:
    """taskorch on Dask against plain Client.submit on the same kind of cluster."""
    if not all(p in pools for p in DASK_POOLS):
        return []
    parts = []
    for section, field, label in (("A", "tasks_per_s", "A no-op tasks/s"),
                                  ("B", "speedup", "B CPU speedup")):
        mine = number(children, "taskorch-dask", section, field)
        theirs = number(children, "dask", section, field)
        if mine is not None and theirs is not None and theirs > 0:
            noisy_mark = " (noisy)" if noisy(children, "taskorch-dask", section) or \
                noisy(children, "dask", section) else ""
            parts.append(f"{label} taskorch-dask/dask = {mine / theirs:.2f}x{noisy_mark}")
    return [f"Dask LocalCluster, 2 workers x 1 thread ({DASK_A_TASKS:,} no-op tasks): "
            + "; ".join(parts)] if parts else []


def render(children: dict[str, Any], pools: list[str], meta: dict[str, Any]) -> str:
    sections = meta["sections"]
    head = ["section"] + pools
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| start method | " + " | ".join(
        str(children[p].get("start_method", "?")) for p in pools) + " |")
    for row, title in ROWS:
        if row[0] not in sections:
            continue
        if row[0] == "B":
            title += f" ({meta['b_tasks']} x {CPU_TASK_S * 1e3:.0f} ms; serial " \
                     f"{meta['serial']['serial_s']:.2f} s)"
        if row[0] == "A":
            title += f" ({meta['a_tasks']:,} tasks"
            title += (f"; Dask pools {DASK_A_TASKS:,})" if any(p in pools for p in DASK_POOLS)
                      else ")")
        if row[0] == "I":
            title += (f" ({meta['i_items']:,} items; taskorch map(), automatic chunks; others "
                      "map/imap with Pool.map's chunksize)")
        lines.append(f"| {title} | " + " | ".join(pool_cell(row, children[p]) for p in pools)
                     + " |")
    lines.append("| noise: other processes' CPU, % of a core: whole run (worst section) | "
                 + " | ".join(noise_cell(children[p]) for p in pools) + " |")
    return "\n".join(lines)


def notes_for(children: dict[str, Any], pools: list[str], meta: dict[str, Any]) -> list[str]:
    notes = []
    serial_noise = meta["serial"]["noise"]["cores"]
    if serial_noise is not None and serial_noise > NOISE_NOTE:
        notes.append(f"noise: {serial_noise * 100:.0f}% of a core used by other processes "
                     "during the serial baseline: B's speedups are less reliable")
    for pool in pools:
        child = children[pool]
        noisy = [f"{key} {noise['cores'] * 100:.0f}%"
                 for key, noise in sorted((child.get("noise") or {}).items())
                 if noise["cores"] is not None and noise["cores"] > NOISE_NOTE]
        if noisy:
            notes.append(f"noise: {pool}: other processes used more than "
                         f"{NOISE_NOTE * 100:.0f}% of a core during " + ", ".join(noisy)
                         + ": those figures are less reliable")
        if child.get("killed"):
            notes.append(f"{pool}: {child['killed']}")
        for note in child.get("notes", []):
            notes.append(f"{pool}: {note}")
        f_res = child.get("sections", {}).get("F") or {}
        if "crashed_task" in f_res:
            notes.append(f"{pool}: F: the crashed task itself: {short(f_res['crashed_task'], 80)};"
                         f" after it: {short(f_res['usable_detail'], 80)}")
            if f_res.get("lost_pending"):
                after = f_res.get("unresolved_after_stop") or {}
                notes.append(f"{pool}: F: task(s) {f_res['lost_pending_indices']} never resolved "
                             f"within {F_DEADLINE_S:g} s (worst rep); once the pool was stopped, "
                             "the unresolved futures (incl. the crashed one) were: "
                             + ", ".join(f"{n} {k}" for k, n in after.items()))
    return notes


def write_chart(path: str, children: dict[str, Any], pools: list[str]) -> str | None:
    """One small bar chart per measured figure; returns why not, if it was not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib not importable ({describe(exc)}); pip install matplotlib"
    figures = [(s, f, label + (" (higher is better)" if hi else " (lower is better)"))
               for s, f, label, hi in RATIOS]
    figures = [fig for fig in figures
               if any(number(children, p, fig[0], fig[1]) is not None for p in pools)]
    if not figures:
        return "no numeric results to chart"
    cols = 3
    rows = -(-len(figures) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (section, field, label) in zip(axes.flat, figures):
        values = [number(children, p, section, field) for p in pools]
        ax.bar(pools, [v or 0.0 for v in values],
               color=["tab:red" if p == "taskorch" else "tab:gray" for p in pools])
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
        for i, v in enumerate(values):
            text = ("none" if section == "G" else "n/a") if v is None else \
                f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
            ax.text(i, v or 0.0, text, ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(figures):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
