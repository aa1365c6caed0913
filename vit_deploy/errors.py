"""Errors a user can cause: the CLI prints their message as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (path, option, file content, missing runtime)."""

    exit_code = 2


class CheckFailed(Exception):
    """A verification that ran to completion and found the artifact wrong (exit 1)."""

    exit_code = 1
