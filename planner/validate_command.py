"""`tuneplan validate`: compare the planner's predictions with measurements; exit 1 when a
suite breaks its tolerance (tables/tolerances.yaml).

Registered by planner/cli.py as `app.command("validate")(validate)`. No torch at import:
the fake / cpu suites import it when their first case runs.
"""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer


def validate(
    suite: Annotated[str, typer.Option("--suite", help="quick (CI: ~5 min on 2 cores) | full (every case).")] = "quick",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the README 'Accuracy' section (Markdown) on stdout.")] = False,
    only: Annotated[Optional[str], typer.Option("--only", help="Comma-separated suites to run: fake,cpu,gpu,published (default all).")] = None,
    case: Annotated[Optional[str], typer.Option("--case", help="Only cases / rows whose id contains this text.")] = None,
    tolerances: Annotated[Optional[str], typer.Option("--tolerances", help="Tolerance file (default tables/tolerances.yaml).")] = None,
    cases: Annotated[Optional[str], typer.Option("--cases", help="Case file (default tables/validate_cases.yaml).")] = None,
    sensitivity: Annotated[bool, typer.Option("--sensitivity/--no-sensitivity", help="Show how much each calibration constant moves the error.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> int:
    """Compare predictions with measurements (fake-tensor, CPU, GPU, published); exit 1 on a broken tolerance."""
    from planner.errors import PlanError
    from planner.validate import run
    from planner.validate.render import markdown as to_markdown
    from planner.validate.render import print_rich

    if as_json and markdown:
        raise PlanError("--json and --markdown are exclusive")

    def progress(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    report = run(suite.strip().lower(), only, case_filter=case, cases_file=cases, tolerances_file=tolerances,
                 sensitivity=sensitivity, progress=progress)
    if as_json:
        import json
        print(json.dumps(report.to_json(), indent=2))
    elif markdown:
        sys.stdout.write(to_markdown(report))
    else:
        print_rich(report)
    code = report.exit_code
    if code:
        failed = [f"{s.name}: {s.status}" for s in report.suites if s.status in ("FAIL", "ERROR", "NO TOLERANCE")]
        print(f"tuneplan validate: {'; '.join(failed)}", file=sys.stderr)
        raise typer.Exit(code)
    return code
