"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class PlanError(ValueError):
    """Bad input: an unknown model, an impossible configuration, a malformed file."""
