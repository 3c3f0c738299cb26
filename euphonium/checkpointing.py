"""Files that survive a kill or a full disk: atomic checkpoint directories, their validation and
rotation, orphan cleanup, atomic file rewrites and appends that leave no torn line.

Used by the GRPO trainer (:mod:`euphonium.train.checkpoint`) and the PRM trainer alike.

- :func:`atomic_directory` builds ``ROOT/step-N`` under a temporary name (``ROOT/.tmp-step-N-<pid>``)
  and renames it into place only when every file is written and synced; it writes
  ``manifest.json`` (each file's size and SHA-256) last. A failure removes the temporary folder and
  raises :class:`WriteError` (one line: the path and the cause, e.g. disk full).
- :func:`verify_manifest` checks a directory against its manifest (a truncated, emptied or
  bit-flipped file is named); :func:`newest_valid` picks the newest checkpoint whose reader accepts
  it, warning about each one it skips.
- :func:`remove_orphans` deletes the temporary leftovers of a killed writer; :func:`rotate` keeps
  the newest ``keep`` checkpoints.
- :func:`atomic_write` rewrites a file through a temporary file and a rename; :func:`append_line`
  appends one line and, when the write fails, cuts the file back to where it was.

Every write goes through :func:`_open` (the fault-injection tests replace it with a disk that fills
up). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar, Union

MANIFEST = "manifest.json"
STEP_NAME = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
# Temporary names of earlier versions (the PRM trainer's ``.step-N.tmp``), removed as orphans too.
_LEGACY_TMP = re.compile(r"^\.step-\d+\.tmp$")

T = TypeVar("T")


class CheckpointError(Exception):
    """A checkpoint (or every checkpoint of a run) that cannot be loaded; the message is one line."""


class WriteError(OSError):
    """A file that could not be written (one line: the path and the cause); nothing partial is left.

    ``errno`` is the underlying error's (``errno.ENOSPC`` for a full disk)."""

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        self.errno = code


def _open(path: Union[str, Path], mode: str):
    """Every file this module writes is opened here (tests swap in a disk that fills up)."""
    return open(path, mode)


def describe_os_error(err: BaseException) -> str:
    """A short cause for an ``OSError``: ``disk full (no space left on device)`` for ENOSPC."""
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC:
        return "disk full (no space left on device)"
    if code == errno.EDQUOT:
        return "disk quota exceeded"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.EROFS:
        return "read-only file system"
    return getattr(err, "strerror", None) or " ".join(str(err).split()) or type(err).__name__


def _write_error(path: Path, err: BaseException) -> WriteError:
    return WriteError(f"could not write {path}: {describe_os_error(err)}", getattr(err, "errno", None))


def one_line(err: BaseException, limit: int = 200) -> str:
    """``err``'s message on one line, cut to ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_load_error(err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words: a pickle that would
    build other objects than tensors and plain containers (what could run code) is named as such."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        found = re.search(
            r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand \d+|[Uu]nsupported class [\w.]+", str(err)
        )
        what = f": {found.group(1) or found.group(0)}" if found else ""
        return f"refused: it would build objects other than tensors{what}"
    return one_line(err)


class _Sink:
    """A write-only file object that hashes and counts what passes through and keeps the first
    ``OSError`` (writers such as ``torch.save`` report it as their own ``RuntimeError``)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.bytes += view.nbytes
        return view.nbytes if n is None else n

    def flush(self) -> None:
        self.f.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.bytes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: Union[str, Path], data: Union[bytes, Callable[[Any], None]]) -> Dict[str, Any]:
    """Write ``data`` (bytes, or a function that writes to the file object it is given) to ``path``
    and sync it; returns ``{"bytes": n, "sha256": hex}``. On failure the file is removed and
    :class:`WriteError` is raised."""
    path = Path(path)
    sink = None
    try:
        with _open(path, "wb") as f:
            sink = _Sink(f)
            if callable(data):
                data(sink)
            else:
                sink.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        with contextlib.suppress(OSError):
            path.unlink()
        cause = sink.error if sink is not None and sink.error is not None else err
        if isinstance(cause, OSError):
            raise _write_error(path, cause) from err
        raise
    return {"bytes": sink.bytes, "sha256": sink.sha.hexdigest()}


def atomic_write(path: Union[str, Path], data: Union[bytes, str, Callable[[Any], None]]) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file next to it, synced, then renamed.

    A kill at any point leaves the old file or the new one, never a mix or an empty file.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        write_file(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise _write_error(path, err) from err  # the file meant, not its temporary name
        raise
    _fsync_dir(path.parent)


def append_line(path: Union[str, Path], line: str) -> None:
    """Append ``line`` (a newline is added) to ``path``; a failed write cuts the file back to its
    previous length, so no torn line is left behind, and raises :class:`WriteError`."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    start = path.stat().st_size if path.exists() else 0
    try:
        with _open(path, "ab") as f:
            f.write(data)
            f.flush()
    except OSError as err:
        with contextlib.suppress(OSError):
            os.truncate(path, start)
        raise _write_error(path, err) from err


# --------------------------------------------------------------------------------------------------
# Checkpoint directories


def step_dirs(root: Union[str, Path]) -> List[Tuple[int, Path]]:
    """``(N, ROOT/step-N)`` for every ``step-N`` folder under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = STEP_NAME.match(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    return sorted(found)


def remove_orphans(root: Union[str, Path], names: Optional[List[str]] = None) -> List[Path]:
    """Delete what killed writers left under ``root``: ``.tmp-*`` entries (only ``.tmp-<name>-*`` for
    the given ``names``, when given). Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        if names is not None:
            orphan = any(path.name.startswith(f"{TMP_PREFIX}{n}-") for n in names)
        else:
            orphan = path.name.startswith(TMP_PREFIX) or bool(_LEGACY_TMP.match(path.name))
        if orphan:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    return removed


def _manifest(folder: Path, known: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        if rel in known and known[rel]["bytes"] == path.stat().st_size:
            files[rel] = known[rel]
        else:
            files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return files


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


class CheckpointWriter:
    """The temporary folder :func:`atomic_directory` yields: ``path`` and :meth:`write` (a file
    written through it is hashed as it is written, so the manifest need not read it back)."""

    def __init__(self, path: Path):
        self.path = path
        self._written: Dict[str, Dict[str, Any]] = {}
        self.current: Optional[str] = None

    def write(self, name: str, data: Union[bytes, str, Callable[[Any], None]]) -> Path:
        self.current = name
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        self._written[name] = write_file(target, data.encode() if isinstance(data, str) else data)
        return target


@contextlib.contextmanager
def atomic_directory(final: Union[str, Path]) -> Iterator[CheckpointWriter]:
    """Build the folder ``final`` atomically: write into the yielded :class:`CheckpointWriter`; on a
    clean exit ``manifest.json`` is written, everything synced and the folder renamed to ``final``
    (replacing an older one of that name). On an exception the temporary folder is removed; an
    ``OSError`` becomes a one-line :class:`WriteError` naming ``final`` and the cause."""
    final = Path(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    old = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
    writer: Optional[CheckpointWriter] = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        writer = CheckpointWriter(tmp)
        yield writer
        writer.write(MANIFEST, json.dumps({"files": _manifest(tmp, writer._written)}, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)  # a kill from here to the rename leaves an orphan, not a torn folder
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            where = f" ({writer.current})" if writer is not None and writer.current else ""
            raise WriteError(
                f"could not write checkpoint {final}{where}: {describe_os_error(err)}; nothing of it was kept",
                err.errno,
            ) from err
        raise


def verify_manifest(folder: Union[str, Path]) -> bool:
    """Check every file ``folder/manifest.json`` lists: present, of the recorded size and SHA-256.

    Returns False when there is no manifest (a checkpoint of an earlier version: only its readers can
    check it); raises :class:`CheckpointError` naming the first file that does not match."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return False
    try:
        files = json.loads(path.read_text())["files"]
        assert isinstance(files, dict)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable manifest ({one_line(err)})") from None
    for name, entry in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        size = p.stat().st_size
        if size != entry["bytes"]:
            what = "empty" if size == 0 else "truncated" if size < entry["bytes"] else "longer than written"
            raise CheckpointError(f"{p}: {what} ({size} bytes, {entry['bytes']} written)")
        if _sha256(p) != entry["sha256"]:
            raise CheckpointError(f"{p}: contents differ from what was written (SHA-256 mismatch: corrupted)")
    return True


def newest_valid(root: Union[str, Path], read: Callable[[Path], T], *, warn: bool = True) -> Optional[Tuple[Path, T]]:
    """The newest ``step-N`` under ``root`` that ``read`` accepts, and what it returned.

    ``read(path)`` raises :class:`CheckpointError` for a checkpoint it cannot load; each skipped one is
    a warning naming the file and the reason. None when there is no checkpoint at all; a
    :class:`CheckpointError` (one line, every reason) when there are some and none is usable.
    """
    reasons = []
    for _, path in reversed(step_dirs(root)):
        try:
            return path, read(path)
        except CheckpointError as err:
            reasons.append(str(err))
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {err}; trying an older one", stacklevel=2)
    if reasons:
        raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(reasons))
    return None


def rotate(root: Union[str, Path], keep: int, newest: int) -> List[Path]:
    """Keep the ``keep`` newest checkpoints up to step ``newest``; delete the older ones and any
    after ``newest`` (left by a run that resumed before them, so never to be continued)."""
    dirs = step_dirs(root)
    upto = [p for n, p in dirs if n <= newest]
    doomed = [p for n, p in dirs if n > newest] + upto[: max(0, len(upto) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
