"""Errors a person sees: one line, a non-zero exit, no traceback."""

from __future__ import annotations


class UserFacingError(Exception):
    """An error whose message is complete for a person at a terminal (missing QEMU, bad flag)."""

    exit_code = 1


class CliError(UserFacingError):
    """A bad command-line value."""

    exit_code = 2
