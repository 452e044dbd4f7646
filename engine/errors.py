"""Errors a user can cause and fix. Each prints as one line (file, field or value, and what to do)
and maps to exit code 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a preset, an override, a path, a dataset, a command-line argument."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(UserError):
    """One or more problems in a preset or its overrides, reported together."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        # A problem of an override names its `--set`; only the file's own problems follow its name.
        own = [p for p in problems if p.startswith("--set ")]
        rest = [p for p in problems if not p.startswith("--set ")]
        prefix = f"{source}: " if source else ""
        super().__init__("; ".join(own + ([prefix + "; ".join(rest)] if rest else [])))


class RunNotFound(UserError):
    pass
