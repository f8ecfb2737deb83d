"""The files a run writes: whole files replaced atomically, append-only JSON lines, a lock.

Every file a run writes is either complete or recognisably incomplete:

- whole files (configs, summaries, ``results.jsonl``, reports, reference outputs) are
  written to a temporary file in the same folder, flushed to disk and renamed over the
  target (``write_atomic``, ``replace_with``), so a reader sees the old file or the new
  one, never half of one;
- append-only JSONL gets one ``write`` per record, ending in a newline, flushed and synced
  (``append_jsonl``). A last line without its newline, or padded with NUL bytes, is a torn
  write (a kill, a power loss, a full disk): ``read_jsonl`` drops it, says so once, and
  cuts it off before the file is appended to again. A malformed line anywhere else is a
  ``RunFileError`` naming the file and the line;
- ``RunLock`` refuses a second process writing the same run folder (an ``flock`` on a file
  in it, released by the kernel when the process dies, so a killed run never leaves a
  stale lock behind).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import OutputPathError, ResPruneError

__all__ = ["RunFileError", "RunLockedError", "RunLock", "write_atomic", "replace_with", "append_jsonl", "warn_once",
           "slug", "unique_slug", "inside", "check_inside", "files_inside", "writable_folder", "writable_file",
           "writable_image", "read_jsonl", "read_json"]


class RunFileError(ResPruneError):
    """A file in a run folder is damaged in a way resprune cannot repair (names file and line)."""


class RunLockedError(ResPruneError):
    """Another process is writing the same run folder."""


_warned: set[str] = set()


def warn_once(path: Path, message: str) -> None:
    """Warn about ``path`` once per process (the same damage is not reported at every read)."""
    key = f"{path.resolve()}|{message}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{path}: {message}", RuntimeWarning, stacklevel=3)


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def slug(name: str) -> str:
    """``name`` as a file or folder name: letters, digits, ``-``, ``_`` and ``.``; ``_`` elsewhere."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def unique_slug(name: str) -> str:
    """``slug(name)``, plus a short hash of ``name`` when the slug changed it: names that differ
    only in characters a file name cannot hold (``org/m``, ``org:m``) get different, stable slugs."""
    import hashlib

    plain = slug(name)
    return plain if plain == name else f"{plain}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def inside(root: str | Path, path: str | Path) -> bool:
    """Whether ``path``, symlinks followed, lies inside ``root`` (symlinks of ``root`` followed too)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def check_inside(root: str | Path, path: str | Path, what: str = "run folder") -> None:
    """``RunFileError`` if ``path`` is a symlink (or under one) whose target lies outside ``root``:
    resprune neither reads nor writes through a link that leaves the folder it was given."""
    if os.path.lexists(path) and not inside(root, path):
        raise RunFileError(f"{path}: a symlink leading outside the {what} '{root}' (to {Path(path).resolve()}); "
                           f"resprune reads and writes only inside the folder it is given. Replace the link with "
                           f"a copy of what it points to, or remove it.")


def files_inside(root: str | Path, pattern: str) -> list[Path]:
    """The files under ``root`` (any depth) whose names match ``pattern``, sorted. Symlinks to files
    and folders are followed when their target lies inside ``root``; one leading outside is
    skipped with a warning (each folder is visited once, so a link loop ends)."""
    import fnmatch

    root = Path(root)
    out: list[Path] = []
    seen: set[Path] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = Path(folder).resolve()
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for name in list(dirs):
            if not inside(root, Path(folder) / name):
                warn_once(Path(folder) / name, f"skipped: a symlink leading outside '{root}' (see docs/footguns.md)")
                dirs.remove(name)
        for name in files:
            path = Path(folder) / name
            if not fnmatch.fnmatchcase(name, pattern) or not path.is_file():
                continue
            if inside(root, path):
                out.append(path)
            else:
                warn_once(path, f"skipped: a symlink leading outside '{root}' (see docs/footguns.md)")
    return sorted(out)


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def writable_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and check that a file can be written in it; ``OutputPathError``
    naming the path and why otherwise (a file in its place, a read-only folder or disk...)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} '{path}' is a file, not a folder: name a folder (it is created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create {what} '{path}': {_why(exc)} ({exc.filename or path}). Name a folder "
                              f"you can write.") from None
    probe = path / f".resprune-write-check.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputPathError(f"cannot write in {what} '{path}': {_why(exc)}. Make it writable or name another "
                              f"folder.") from None
    return path


def writable_file(path: str | Path, what: str = "output file") -> Path:
    """Check that ``path`` can be written (replaced) as a file, creating its folder if needed;
    ``OutputPathError`` naming the path and why otherwise."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} '{path}' is a folder: name a file (e.g. {path / 'out'}).")
    writable_folder(path.parent, f"{what}'s folder")
    return path


def writable_image(path: str | Path, what: str = "--out") -> Path:
    """``writable_file`` for an image: its suffix must be a format PIL writes (``.png``, ``.jpg``...)."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        return writable_file(path, what)  # names the folder
    if path.suffix.lower() not in Image.registered_extensions():
        why = "has no file suffix" if not path.suffix else f"ends in {path.suffix!r}, which is not an image format"
        raise OutputPathError(f"{what} '{path}' {why}: name a .png (or .jpg, .webp) file.")
    return writable_file(path, what)


def replace_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, sync it, rename it to ``path``."""
    path = Path(path)
    tmp = _temp_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` (text is UTF-8) so that readers never see a partial file."""
    raw = data.encode() if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(raw)

    return replace_with(path, write)


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append one JSON line in a single write, then flush and sync it to disk."""
    line = (json.dumps(record, allow_nan=True) + "\n").encode()
    with open(path, "ab") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path, *, repair: bool = False) -> list[tuple[int, Any]]:
    """``(line number, value)`` of every complete line of ``path`` (``[]`` if it is missing).

    A torn tail (text after the last newline, or a last line holding NUL bytes) is dropped
    with one warning; with ``repair=True`` it is also cut off the file, so the next append
    starts on a fresh line. Any other line that is not valid JSON raises ``RunFileError``.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything before `end` ended with its newline
    lines = data[:end].split(b"\n")[:-1]
    if lines and b"\0" in lines[-1]:  # a NUL-padded last line: the write did not complete
        end -= len(lines.pop()) + 1
    while lines and not lines[-1].strip(b" \t\r\0"):
        lines.pop()  # blank lines at the end carry nothing
    torn = data[end:]
    if torn.strip(b"\0 \t\r\n"):
        warn_once(path, f"dropped a torn last line ({len(torn)} bytes, an interrupted write); "
                         f"what it held is recomputed")
    if repair and end < len(data):
        with open(path, "rb+") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            out.append((n, json.loads(raw.decode())))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise RunFileError(f"{path}:{n}: damaged line ({why}); only a torn last line is repaired "
                               f"automatically. Delete the line (its example is recomputed) or the file.") from None
    return out


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` (with one warning) if it is missing, empty or damaged."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_bytes().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warn_once(path, f"ignored a damaged file ({type(exc).__name__}); it is recomputed")
        return None
    if not isinstance(value, dict):
        warn_once(path, f"ignored: expected a JSON object, found {type(value).__name__}; it is recomputed")
        return None
    return value


class RunLock:
    """An exclusive lock on a run folder, held while a process writes it.

    ``with RunLock(folder):`` raises ``RunLockedError`` at once if another process holds it.
    The kernel drops the lock when its process exits, however it exits.
    """

    FILENAME = ".resprune.lock"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.FILENAME
        self._fh: Any = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking (documented)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunLockedError(
                f"run folder '{self.folder}' is being written by {holder}; two runs into one folder would "
                f"interleave their results. Wait for it, or use another --out / out_dir.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
