"""Errors a user can cause; the CLI prints them as one line and exits with their code."""

from __future__ import annotations

import difflib
from typing import Iterable


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


def did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    """``" (did you mean 'x'?)"`` naming the candidates closest to ``word``, or ``""``.

    For messages about a mistyped key, name or value: the caller puts it right after the
    word, e.g. ``f"unknown key {word!r}{did_you_mean(word, keys)}; allowed keys: ..."``.
    ``prefix`` is prepended to the suggestions only (``"train."`` for a config section), so
    the shared part does not make unrelated names look alike.
    """
    scored = sorted(((difflib.SequenceMatcher(None, str(word), str(c)).ratio(), str(c)) for c in candidates),
                    reverse=True)
    # the best match if it is close, and a runner-up only when it is about as close
    close = [c for score, c in scored[:2] if score >= 0.6 and score >= scored[0][0] - 0.15]
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{prefix}{c}'" for c in close) + "?)"
