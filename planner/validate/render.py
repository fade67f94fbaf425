"""Output of `tuneplan validate`: a rich table for people, JSON for machines, Markdown for
the README's Accuracy section. Data on stdout; progress on stderr (the command's job)."""
from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

from planner.validate.core import ERROR, FAIL, NO_ROWS, NO_TOLERANCE, PASS, Comparison, GiB, SuiteResult

_STATUS_STYLE = {PASS: "bold green", FAIL: "bold red", ERROR: "bold red", NO_TOLERANCE: "bold red",
                 NO_ROWS: "bold yellow"}


def fmt_value(v: float, unit: str) -> str:
    if unit == "bytes":
        return f"{v / GiB:,.3f} GiB" if abs(v) < 10 * GiB else f"{v / GiB:,.2f} GiB"
    if unit.startswith("tokens"):
        return f"{v:,.0f} tok/s"
    return f"{v:,.4g} {unit}"


def fmt_err(e: float) -> str:
    if e != e or e in (float("inf"), float("-inf")):
        return "n/a"
    return f"{e * 100:+.1f}%"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def _row_ok(r: Comparison, suite: SuiteResult) -> bool:
    for s in suite.stats:
        if s.metric == r.metric and s.tol_max is not None:
            return abs(r.rel_error) <= s.tol_max
    return False


# ------------------------------------------------------------------------------ rich
def print_rich(report: Any, console: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if console is None:
        import os
        import sys
        wide = None if (sys.stdout.isatty() or os.environ.get("COLUMNS")) else 180
        console = Console(width=wide, soft_wrap=False)
    con = console
    t = Table(title=f"tuneplan validate --suite {report.selection}: measured vs predicted",
              box=box.SIMPLE_HEAVY, show_lines=False, title_justify="left")
    for col, kw in (("case", {"overflow": "fold", "max_width": 48}), ("suite", {}), ("metric", {}),
                    ("measured", {"justify": "right"}), ("predicted", {"justify": "right"}),
                    ("error", {"justify": "right"})):
        t.add_column(col, **kw)
    for suite in report.suites:
        if not suite.rows:
            t.add_row(f"[dim]({NO_ROWS.lower() if not suite.errors else 'errors'})[/]", suite.name, "", "", "", "")
        prev = None
        for r in suite.rows:
            style = "green" if _row_ok(r, suite) else "red"
            t.add_row(r.case if r.case != prev else "", suite.name, r.metric, fmt_value(r.measured, r.unit),
                      fmt_value(r.predicted, r.unit), f"[{style}]{fmt_err(r.rel_error)}[/]")
            prev = r.case
        t.add_section()
    con.print(t)

    s = Table(title="per suite: |relative error| vs tables/tolerances.yaml", box=box.SIMPLE_HEAVY,
              title_justify="left")
    for col in ("suite", "metric", "n", "median", "max", "tol median", "tol max", "worst", "status"):
        s.add_column(col, justify="right" if col in ("n", "median", "max", "tol median", "tol max") else "left")
    for suite in report.suites:
        st = _STATUS_STYLE.get(suite.status, "")
        if not suite.stats:
            s.add_row(suite.name, "—", "0", "—", "—", "—", "—", "", f"[{st}]{suite.status}[/]")
        for stat in suite.stats:
            ok = "[green]ok[/]" if stat.ok else "[red]over[/]" if stat.tol_max is not None else "[red]no tolerance[/]"
            is_all = stat.metric == "all"
            s.add_row(suite.name if is_all or stat is suite.stats[0] else "", stat.metric, str(stat.n),
                      fmt_pct(stat.median), fmt_pct(stat.max), fmt_pct(stat.tol_median), fmt_pct(stat.tol_max),
                      stat.worst_case if not stat.ok or is_all else "",
                      f"[{st}]{suite.status}[/]" if is_all else ok)
        s.add_section()
    con.print(s)

    for suite in report.suites:
        lines = []
        lines += [f"[red]error[/] {e}" for e in suite.errors]
        lines += [f"{m}" for m in suite.messages]
        if suite.excluded:
            lines.append(f"{len(suite.excluded)} row(s) excluded:")
            lines += [f"  [dim]{i}[/]: {w}" for i, w in suite.excluded]
        if suite.timings:
            tot = sum(suite.timings.values())
            lines.append(f"{len(suite.timings)} case(s) in {tot:.0f} s "
                         f"(per case {min(suite.timings.values()):.1f}-{max(suite.timings.values()):.1f} s)")
        if lines:
            con.print(f"[bold]{suite.name}[/] [{_STATUS_STYLE.get(suite.status, '')}]{suite.status}[/]")
            for line in lines:
                con.print("  " + line, highlight=False)
    if report.sensitivity:
        print_sensitivity(report.sensitivity, con)
    verdict = {"PASS": "[bold green]PASS[/]", "FAIL": "[bold red]FAIL[/]"}.get(report.verdict, "[bold yellow]NO ROWS[/]")
    con.print(f"validate {report.selection}: {verdict} (exit {report.exit_code}) in {report.seconds:.0f} s",
              highlight=False)


def print_sensitivity(items: list[dict[str, Any]], con: Any) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title="calibration constants: error with the table value vs with a reference value (no re-measurement)",
              box=box.SIMPLE_HEAVY, title_justify="left")
    for col in ("constant", "table value", "reference", "suite/metric", "median: table → ref", "max: table → ref"):
        t.add_column(col)
    for it in items:
        if "error" in it:
            t.add_row(it.get("constant", ""), "", "", "", f"[red]{it['error']}[/]", "")
            continue
        if not it.get("effects"):
            t.add_row(it["constant"], str(it.get("value", "")), str(it.get("reference", "")),
                      "[dim]no effect on this run's suites[/]", "", "")
            t.add_section()
            continue
        first = True
        for eff in it["effects"]:
            t.add_row(it["constant"] if first else "", str(it.get("value", "")) if first else "",
                      str(it.get("reference", "")) if first else "", f"{eff['suite']}/{eff['metric']}",
                      f"{fmt_pct(eff['median'])} → {fmt_pct(eff['median_ref'])}",
                      f"{fmt_pct(eff['max'])} → {fmt_pct(eff['max_ref'])}")
            first = False
        t.add_section()
    con.print(t)


# ------------------------------------------------------------------------------ markdown
def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown(report: Any) -> str:
    import importlib.metadata as md

    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    out: list[str] = []
    out.append("## Accuracy")
    out.append("")
    out.append(f"Generated by `tuneplan validate --suite {report.selection} --markdown` on "
               f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d} ({platform.machine()}, Python "
               f"{platform.python_version()}, torch {ver('torch')}, transformers {ver('transformers')}, "
               f"peft {ver('peft')}); do not edit by hand. Relative error = (predicted − measured) / measured; "
               "medians and maxima are over |error|. Tolerances: `tables/tolerances.yaml`. "
               f"Verdict: {report.verdict} (exit code {report.exit_code}).")
    out.append("")
    out.append("| suite | what is measured | metric | n | median | max | tolerance (median / max) | status |")
    out.append("|---|---|---|---:|---:|---:|---|---|")
    what = {"fake": "fake-tensor HF step, full-size models (allocated bytes)",
            "cpu": "real CPU step, small models (allocated bytes)",
            "gpu": "real GPU runs in `tables/measured/`",
            "published": "published numbers in `tables/published.csv`"}
    for suite in report.suites:
        if not suite.stats:
            out.append(f"| {suite.name} | {what.get(suite.name, '')} | — | 0 | — | — | — | {suite.status} |")
        for i, stat in enumerate(suite.stats):
            out.append(f"| {suite.name if i == 0 else ''} | {what.get(suite.name, '') if i == 0 else ''} | "
                       f"{stat.metric} | {stat.n} | "
                       f"{fmt_pct(stat.median)} | {fmt_pct(stat.max)} | {fmt_pct(stat.tol_median)} / "
                       f"{fmt_pct(stat.tol_max)} | {suite.status if stat.metric == 'all' else ('ok' if stat.ok else 'over')} |")
    out.append("")
    for suite in report.suites:
        notes = list(suite.messages) + [f"error: {e}" for e in suite.errors]
        if suite.timings:
            notes.append(f"{len(suite.timings)} cases, {sum(suite.timings.values()):.0f} s on this machine "
                         f"({min(suite.timings.values()):.1f}-{max(suite.timings.values()):.1f} s per case)")
        if not suite.rows and not notes and not suite.excluded:
            continue
        out.append(f"### {suite.name}")
        out.append("")
        for n in notes:
            out.append(f"- {_md_escape(n)}")
        if notes:
            out.append("")
        if suite.rows:
            n_cases = len(dict.fromkeys(r.case for r in suite.rows))
            out.append(f"<details><summary>{suite.name}: {n_cases} cases, {len(suite.rows)} comparisons</summary>")
            out.append("")
            out.append("| case | metric | measured | predicted | error |")
            out.append("|---|---|---:|---:|---:|")
            prev = None
            for r in suite.rows:
                out.append(f"| {_md_escape(r.case) if r.case != prev else ''} | {r.metric} | "
                           f"{fmt_value(r.measured, r.unit)} | {fmt_value(r.predicted, r.unit)} | "
                           f"{fmt_err(r.rel_error)} |")
                prev = r.case
            out.append("")
            out.append("</details>")
            out.append("")
        if suite.excluded:
            out.append("Excluded rows:")
            out.append("")
            for i, w in suite.excluded:
                out.append(f"- `{i}`: {_md_escape(w)}")
            out.append("")
    if report.sensitivity:
        out.append("### Calibration constants")
        out.append("")
        out.append("How much each calibration constant moves the error: the same measurements, predictions "
                   "recomputed with the constant at a reference value (0 for the additive memory terms, 1 for the "
                   "compile speed-up, the nccl-tests prior for the collective efficiency, one global MFU instead of "
                   "the per-cell MFU table). Fitted by `tables/fit_calibration.py` (which drives `tables/fit_mfu.py`); "
                   "the memory terms stay priors until the gpu suite has rows.")
        out.append("")
        out.append("| constant | table value | reference | suite/metric | median: table → reference | max: table → reference |")
        out.append("|---|---|---|---|---|---|")
        for it in report.sensitivity:
            if "error" in it:
                out.append(f"| {_md_escape(it.get('constant', ''))} | | | | {_md_escape(it['error'])} | |")
                continue
            if not it.get("effects"):
                out.append(f"| {_md_escape(it['constant'])} | {it.get('value', '')} | {it.get('reference', '')} | "
                           "no effect on these suites | | |")
            for eff in it.get("effects") or []:
                out.append(f"| {_md_escape(it['constant'])} | {it.get('value', '')} | {it.get('reference', '')} | "
                           f"{eff['suite']}/{eff['metric']} | {fmt_pct(eff['median'])} → {fmt_pct(eff['median_ref'])} | "
                           f"{fmt_pct(eff['max'])} → {fmt_pct(eff['max_ref'])} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
