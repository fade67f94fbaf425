"""`tuneplan`: one typer app — plan, profile run|sweep, train, export, validate.

Data goes to stdout, messages and progress to stderr. Bad input of any kind ends with one
line on stderr and exit code 2, never a traceback. Sub-commands import torch lazily, inside
their functions, so `tuneplan plan` stays pure arithmetic.
"""
from __future__ import annotations

import sys

import typer

try:  # typer >= 0.2x vendors click as typer._click; its exceptions are not click's
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as _click_exc

from planner.errors import PlanError

app = typer.Typer(
    name="tuneplan",
    help="Will this fine-tuning run fit, how fast will it go, and which configuration is best?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from planner.plan_command import plan

    app.command("plan", help="Plan memory and speed per GPU; rank the configurations that fit.")(plan)
    try:  # the other sub-commands arrive with their packages
        from profiler.cli import app as profile_app
        app.add_typer(profile_app, name="profile", help="Run real (or fake-tensor) training steps and compare with the plan.")
    except ImportError as exc:  # pragma: no cover - only while a package is missing
        if "profiler.cli" not in str(exc) and "profiler" not in str(exc):
            raise
    try:
        from trainer.cli import train, export
        app.command("train", help="Train the chosen configuration end to end.")(train)
        app.command("export", help="Merge a LoRA adapter into its base model and save it.")(export)
    except ImportError as exc:  # pragma: no cover
        if "trainer" not in str(exc):
            raise
    try:
        from planner.validate_command import validate
        app.command("validate", help="Compare predictions with measurements; exit 1 when a tolerance is broken.")(validate)
    except ImportError as exc:  # pragma: no cover
        if "validate_command" not in str(exc):
            raise


_register()


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


_NO_ARGS_IS_HELP = tuple(getattr(_click_exc, n) for n in ("NoArgsIsHelpError", "NoArgsIsHelp") if hasattr(_click_exc, n))


def run_app(typer_app: typer.Typer, argv: list[str] | None, prog_name: str) -> int:
    """Run a typer app in non-standalone mode so every error is one line on stderr:
    bad input → exit 2, never a traceback. Shared by `tuneplan` and the `python -m` entries."""
    try:
        rv = typer_app(args=argv, standalone_mode=False, prog_name=prog_name)
        return rv if isinstance(rv, int) else 0
    except PlanError as exc:
        print(f"tuneplan: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except _NO_ARGS_IS_HELP:
        return 0  # the help text is already printed
    except _click_exc.ClickException as exc:  # usage errors, bad parameters, unreadable files
        print(f"tuneplan: error: {_one_line(exc.format_message())}", file=sys.stderr)
        return 2
    except _click_exc.Abort:
        print("tuneplan: aborted", file=sys.stderr)
        return 130
    except _click_exc.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        print("tuneplan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point `tuneplan`."""
    return run_app(app, argv, "tuneplan")


if __name__ == "__main__":
    sys.exit(main())
