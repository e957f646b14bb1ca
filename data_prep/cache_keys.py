"""Where caches live and what invalidates their entries (standard library only)."""

from __future__ import annotations

import os
from pathlib import Path

from segan.errors import UserError


def default_cache_dir() -> Path:
    """``$SEGAN_CACHE`` or ``~/.cache/segan``."""
    env = os.environ.get("SEGAN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "segan"


def file_key(path: str | Path) -> list:
    """``[resolved path, size, mtime_ns]``: what cache keys hold, so an edited file gets a new key."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise UserError(f"{p}: file not found; check the data set (segan prepare check <root>)") from None
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]
