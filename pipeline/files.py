"""Writing files safely, for every layer: atomic replacement, staging that a killed process cannot leave behind for
long, and the mode a new file would get.

Everything is written into a staging folder named ``.carve-<pid>-*`` next to its target and renamed into place after an
``fsync``, so a reader never sees half a file and a failure leaves the old file (or none) in place. Each staging folder
holds a marker file (:data:`MARKER`) that names it; a staging folder whose process no longer runs (a SIGKILL during a
write) is removed by the next write into that folder, and only when it carries carve's marker (or is empty): a user's
file or folder that merely has a ``.carve-<pid>-`` name is never touched (issue 21). Every file written gets the mode
``open()`` gives a new file: ``0o666 & ~umask`` (staging files are created ``0o600``).

What makes an output *unsafe* for a model (overwriting an input or its external data) is a fact about ONNX files and
lives in :func:`carve.pipeline.graph.io.check_output_path`; this module knows only paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from carve.pipeline.errors import CarveError

STAGING = ".carve-"
_STAGING_RE = re.compile(r"^\.carve-(\d+)-")
MARKER = ".carve-staging"  # inside each staging folder: what makes it carve's own to remove


def _marker_text(folder: Path) -> str:
    return f"carve staging folder {folder.name}\n"


def _is_ours(folder: Path) -> bool:
    """A staging folder carve made: a real folder (not a symlink) holding the marker that names it, or holding only
    a marker cut short (a kill while the marker itself was written: nothing else can be in it yet)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        text = (folder / MARKER).read_text()
        if text == _marker_text(folder):
            return True
        return [p.name for p in folder.iterdir()] == [MARKER] and _marker_text(folder).startswith(text)
    except (OSError, UnicodeDecodeError):
        return False


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (or exists and is not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_staging(directory: str | os.PathLike) -> list[Path]:
    """Remove the ``.carve-<pid>-*`` staging folders of processes that no longer run (a write killed with SIGKILL
    cannot clean up after itself), when they carry carve's marker, or are empty (a kill between creating the folder
    and marking it). Files, symlinks and unmarked folders of that name are the user's and stay. Returns what was
    removed."""
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STAGING_RE.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if _is_ours(p):
                shutil.rmtree(p)
                removed.append(p)
            elif p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
                removed.append(p)
    return removed


def umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the only other way there is
    os.umask(mask)
    return mask


def new_file_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode ``open()`` gives a new file: 0o666 minus the umask."""
    os.chmod(path, 0o666 & ~umask())


def fsync(path: str | os.PathLike) -> None:
    """Flush a written file to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def check_writable(out: str | os.PathLike) -> Path:
    """Refuse, before any work, an output path that cannot be written: a directory, a missing or read-only folder,
    a read-only file."""
    out = Path(out)
    try:
        parent = out.resolve().parent
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise CarveError(f"{out}: not a usable output path ({exc})") from None
    if out.exists() and out.is_dir():
        raise CarveError(f"{out}: is a directory; give a file name for the output")
    if not parent.is_dir():
        raise CarveError(f"{out}: the output directory {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK):
        raise CarveError(f"{out}: the output directory {parent} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise CarveError(f"{out}: the output file exists and is not writable")
    return out


def same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file: the same path after resolving ``..`` and symlinks, or hard links."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike) -> Iterator[Path]:
    """A private staging folder in ``parent`` (stale ones of dead processes removed first), removed on exit: write
    into it, then :func:`publish` what was written."""
    clean_stale_staging(parent)
    tmpdir = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=parent))
    try:
        (tmpdir / MARKER).write_text(_marker_text(tmpdir))
        yield tmpdir
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def publish(staged: Path, target: Path) -> None:
    """Move a fully written staged file into place: new-file mode, fsync, atomic rename."""
    new_file_mode(staged)
    fsync(staged)
    os.replace(staged, target)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Write a file atomically: a staging file next to it, renamed into place on success, with the mode the umask
    gives a new file. Nothing is left behind on failure."""
    path = check_writable(path)
    with staging_dir(path.resolve().parent) as tmpdir:
        tmp = tmpdir / path.name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        new_file_mode(tmp)
        os.replace(tmp, path)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a folder's entries (the renames into it) to disk, where the platform allows."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_HASHES: dict[tuple[str, int, int], str] = {}


def content_hash(path: str | os.PathLike) -> str:
    """sha256 (hex, 16 digits) of a file's bytes, cached by (resolved path, mtime, size) for this process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()[:16]
    return _HASHES[key]
