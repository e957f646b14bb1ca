"""The preprocessing cache folder: where it is, how its entries are keyed, and keeping it bounded.

Layout (``preprocess.cache_dir``, else ``$SEGAN_CACHE``, else ``~/.cache/segan``)::

    spec-<hash>/spec.json                   the preprocessing spec of the entries below it
    spec-<hash>/<case>-<key>/               one preprocessed case (data_prep.preprocess.CaseCache):
                                            image.npy, label.npy, meta.json
    checked.json                            cases that passed the file checks training runs first

An entry's key hashes its source files' paths, sizes and mtimes: an edited or regenerated
file gets a new entry, and the old one is *stale*. An entry's last use is the mtime of its
``meta.json`` (``CaseCache.get`` touches it). After a training run has its cases,
:func:`enforce_limit` drops the stale entries, then the least recently used ones until the
folder is under the limit (``$SEGAN_CACHE_MAX_GB``, default 2 GB). It never drops an entry
of the running job, nor one used in the last 10 minutes (another run may be starting on
it); a job larger than the limit keeps all its entries, and the limit then holds for the rest.

Imports nothing heavy, so that ``segan cache info|clear`` starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from segan.errors import UserError

if TYPE_CHECKING:
    from data_prep.msd import Case

LIMIT_ENV = "SEGAN_CACHE_MAX_GB"
DEFAULT_LIMIT_GB = 2.0
GRACE_S = 600.0  # entries used this recently belong to a run that may still be starting
CHECKS_FILE = "checked.json"
CHECKS_VERSION = 1
_SPEC_DIR = re.compile(r"^spec-[0-9a-f]{16}$")


def default_cache_dir() -> Path:
    """``$SEGAN_CACHE`` or ``~/.cache/segan``."""
    env = os.environ.get("SEGAN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "segan"


def file_key(path: str | Path) -> list:
    """``[resolved path, size, mtime_ns]`` of a source file; raises UserError if it is missing."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise UserError(f"{p}: file not found; check the data set (segan prepare check <root>)") from None
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def entry_key(images: list[str], label: str | None, spec_hash: str) -> str:
    """The 16-hex key of a case's entry: its files (paths, sizes, mtimes) and the spec."""
    files = {"images": [file_key(p) for p in images], "label": file_key(label) if label else None,
             "spec": spec_hash}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def limit_bytes() -> int:
    """The cache size limit: ``$SEGAN_CACHE_MAX_GB`` (a positive number of GB), else 2 GB."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return int(DEFAULT_LIMIT_GB * 1e9)
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise UserError(f"${LIMIT_ENV}={raw!r}: expected a positive number of GB, e.g. {LIMIT_ENV}=5")
    return int(gb * 1e9)


def human_size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------- entries
@dataclass
class Entry:
    """One cached case (or a writer's leftover temporary folder)."""

    path: Path
    size: int         # bytes
    last_used: float  # seconds since the epoch
    stale: bool       # source files changed or gone, unreadable, or an abandoned temporary folder


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _is_stale(entry: Path, spec_hash: str) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        return entry.name.rsplit("-", 1)[-1] != entry_key(meta["images"], meta.get("label"), spec_hash)
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return True


def scan(cache_dir: Path, now: float | None = None) -> list[Entry]:
    """Every entry under ``cache_dir``'s spec folders, with its size, last use and staleness."""
    now = time.time() if now is None else now
    entries = []
    for spec in _spec_dirs(cache_dir):
        for sub in sorted(p for p in spec.iterdir() if p.is_dir()):
            try:
                if sub.name.startswith("."):  # CaseCache's temporary folder: a writer at work, or a crash
                    used = sub.stat().st_mtime
                    entries.append(Entry(sub, _folder_size(sub), used, stale=now - used > GRACE_S))
                else:
                    used = (sub / "meta.json").stat().st_mtime if (sub / "meta.json").exists() else sub.stat().st_mtime
                    entries.append(Entry(sub, _folder_size(sub), used, _is_stale(sub, spec.name[len("spec-"):])))
            except OSError:
                continue  # removed meanwhile by another process
    return entries


def _spec_dirs(cache_dir: Path) -> list[Path]:
    root = Path(cache_dir).expanduser()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _SPEC_DIR.match(p.name))


def _remove(entries: list[Entry]) -> None:
    for e in entries:
        shutil.rmtree(e.path, ignore_errors=True)
    for spec in {e.path.parent for e in entries}:
        if spec.is_dir() and not any(p.is_dir() for p in spec.iterdir()):
            shutil.rmtree(spec, ignore_errors=True)


def enforce_limit(cache_dir: Path, keep: Iterable[Path], limit: int | None = None,
                  grace_s: float = GRACE_S) -> list[Entry]:
    """Drop stale entries, then least recently used ones until ``cache_dir`` is under ``limit``
    bytes (default :func:`limit_bytes`). ``keep`` (the running job's entries) and entries used
    in the last ``grace_s`` seconds stay. Returns what was removed."""
    limit = limit_bytes() if limit is None else limit
    now = time.time()
    kept = {Path(p).resolve() for p in keep}
    entries = scan(cache_dir, now)

    def protected(e: Entry) -> bool:
        return e.path.resolve() in kept or now - e.last_used < grace_s

    removed = [e for e in entries if e.stale and not protected(e)]
    total = sum(e.size for e in entries) - sum(e.size for e in removed)
    for e in sorted((e for e in entries if not e.stale), key=lambda e: e.last_used):
        if total <= limit:
            break
        if not protected(e):
            removed.append(e)
            total -= e.size
    _remove(removed)
    return removed


def cache_info(cache_dir: Path) -> str:
    """``segan cache info``: size, entry count, stale entries, the limit, remembered checks."""
    root = Path(cache_dir).expanduser().absolute()
    if not root.is_dir():
        return f"{root}: no cache yet (nothing has been preprocessed here)"
    entries = scan(root)
    stale = [e for e in entries if e.stale]
    source = f"${LIMIT_ENV}" if os.environ.get(LIMIT_ENV, "").strip() else f"default; set ${LIMIT_ENV} to change"
    checks = len(CheckRecord(root).cases)
    return "\n".join([
        f"{root}: {len(entries)} preprocessed case(s), {human_size(sum(e.size for e in entries))} in "
        f"{len(_spec_dirs(root))} preprocessing spec(s)",
        f"  stale (source files changed or gone): {len(stale)}, {human_size(sum(e.size for e in stale))}",
        f"  limit: {human_size(limit_bytes())} ({source}); applied after each training run's preprocessing",
        f"  file checks remembered: {checks} case(s)",
    ])


def clear_cache(cache_dir: Path) -> str:
    """``segan cache clear``: remove every entry and the remembered checks (only what segan wrote)."""
    root = Path(cache_dir).expanduser().absolute()
    entries = scan(root)
    size = sum(e.size for e in entries)
    for spec in _spec_dirs(root):
        shutil.rmtree(spec, ignore_errors=True)
    (root / CHECKS_FILE).unlink(missing_ok=True)
    return f"{root}: removed {len(entries)} preprocessed case(s), {human_size(size)}, and the remembered file checks"


# ---------------------------------------------------------------- remembered file checks
class CheckRecord:
    """Cases that passed ``check_dataset``'s per-case checks (``checked.json``), keyed by their
    files' paths, sizes and mtimes and the label ids they were checked against: a clean data
    set is read once, and an edited file is checked again. Only clean cases are recorded."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = Path(cache_dir).expanduser() / CHECKS_FILE
        self.cases: dict[str, dict] = {}
        self._changed = False
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and data.get("version") == CHECKS_VERSION:
                self.cases = dict(data.get("cases") or {})
        except (OSError, ValueError):
            pass  # none yet, or unreadable: check again

    @staticmethod
    def _key(case: Case, labels: Iterable[int]) -> tuple[str, list] | None:
        try:
            files = [file_key(p) for p in [*case.images, *([case.label] if case.label else [])]]
        except UserError:
            return None  # a missing file: the check reports it
        text = json.dumps({"files": files, "labels": sorted(int(i) for i in labels)})
        return hashlib.sha256(text.encode()).hexdigest()[:24], files

    def get(self, case: Case, labels: Iterable[int]) -> dict | None:
        """The table row of a case that passed with these very files, else None."""
        found = self._key(case, labels)
        hit = self.cases.get(found[0]) if found else None
        return dict(hit["row"]) if hit else None

    def put(self, case: Case, labels: Iterable[int], row: dict) -> None:
        found = self._key(case, labels)
        if found:
            self.cases[found[0]] = {"files": found[1], "row": row}
            self._changed = True

    def save(self) -> None:
        """Write the record (atomically) if it changed, without cases whose files changed or went."""
        if not self._changed:
            return
        from segan.io_utils import atomic_write_text

        def current(files: list) -> bool:
            try:
                return all(file_key(f[0]) == f for f in files)
            except UserError:
                return False

        self.cases = {k: v for k, v in self.cases.items() if current(v.get("files") or [])}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"version": CHECKS_VERSION, "cases": self.cases}))
        self._changed = False
