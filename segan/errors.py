"""Errors a user can cause; the CLI prints them as one line and exits with their code."""


class UserError(Exception):
    """Bad input (path, YAML, key, scan...). The message names the thing and the fix.

    The CLI prints ``error: <message>`` on stderr, no traceback, and exits with
    ``exit_code`` (2 for usage and input errors).
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(UserError):
    """Loss became NaN/inf; the last good checkpoint is kept. Exit status 3."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)
