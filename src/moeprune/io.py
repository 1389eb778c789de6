"""Safe outputs: atomic writes, atomic directory swaps, one writer per output, and no output over a source.

A crash never leaves a half-written output behind: files and directories are written under a hidden
temporary sibling and renamed into place. ``--overwrite`` swaps directories (old one renamed aside, new
one renamed in, then the old one deleted), so a kill at any moment leaves either the old or the new output
complete. A lock file beside the output refuses a second concurrent writer, and leftovers of killed runs
(temporary and set-aside siblings) are cleaned by the next writer, which holds the lock. Folders without a
lock (a profile folder) are cleaned by owner instead: temporary files carry their writer's pid and host, so
only files of writers that are gone are deleted (:func:`remove_orphan_temp_files`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moeprune.errors import MoePruneError

NAME_MAX = 255  # bytes in one path component on every common filesystem
# A directory --overwrite may replace: one written by moeprune (it always writes mask.json) or an empty one.
OUTPUT_MARKER = "mask.json"
# OS errors that are the user's environment, not a bug: reported as one line with the fix.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "the disk is full; free some space or choose another location",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another location",
    errno.EROFS: "the filesystem is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write to",
    errno.EPERM: "permission denied; choose a location you can write to",
    errno.ENAMETOOLONG: "the file name is too long; choose a shorter name",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "the path is a directory, not a file; choose a file name",
}

# A temporary file untouched this long belongs to no live writer, whoever wrote it (writers rewrite theirs
# within seconds; this covers other hosts sharing the folder, and files named before writers were recorded).
TEMP_FILE_MAX_AGE_S = 24 * 3600
# ``.NAME.<pid>-<host>.XXXXXXXX.tmp``: the writer's pid, a hash of its host name, mkstemp's random part.
_TEMP_OWNER = re.compile(r"\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.[a-z0-9_]{8}\.tmp$")

_HELD_LOCKS: dict[Path, list[int]] = {}  # lock path -> [fd, depth]: re-entrant within this process


def environment_error(err: OSError) -> MoePruneError | None:
    """The one-line error for an OSError caused by the environment (full disk, read-only, ...), else None."""
    fix = ENVIRONMENT_ERRNOS.get(err.errno)
    if fix is None:
        return None
    where = f" ({err.filename})" if err.filename else ""
    return MoePruneError(f"Cannot write{where}: {err.strerror or err}; {fix}. Nothing was changed.")


@contextmanager
def environment_errors() -> Iterator[None]:
    """Turn a full disk, a read-only filesystem, a denied permission ... into a MoePruneError."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as err:
        converted = environment_error(err)
        if converted is None:
            raise
        raise converted from err
    except SafetensorError as err:  # its Rust writer reports OS errors as "... (os error 28)"
        code = re.search(r"os error (\d+)", str(err))
        converted = environment_error(OSError(int(code[1]), os.strerror(int(code[1])))) if code else None
        if converted is None:
            raise
        raise converted from err


def sibling_prefix(final: Path) -> str:
    """``.NAME`` for hidden siblings of ``final``; long names are shortened with a hash so that the
    sibling (prefix + a random part + a suffix) still fits the filesystem's 255-byte name limit."""
    name = final.name
    if len(os.fsencode(name)) <= NAME_MAX - 40:
        return f".{name}"
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return f".{os.fsdecode(os.fsencode(name)[:100]).rstrip()}-{digest}"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    with environment_errors():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file_beside(path)
        try:
            with open(tmp, "w") as handle:
                json.dump(obj, handle, indent=2, sort_keys=False)
                handle.write("\n")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# ------------------------------------------------------------------------------- temporary files
def temp_file_beside(path: Path) -> Path:
    """A new, empty hidden file beside ``path`` for an atomic write, named after its writer:
    ``.NAME.<pid>-<host>.XXXXXXXX.tmp`` (30 bytes past the prefix, within :func:`sibling_prefix`'s margin)."""
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f"{sibling_prefix(path)}.{os.getpid()}-{_host_tag()}.", suffix=".tmp"
    )
    os.close(fd)
    return _with_default_mode(Path(tmp), 0o666)


def _with_default_mode(path: Path, mode: int) -> Path:
    """mkstemp/mkdtemp create 0600/0700 (private while written); once renamed into place, an output should
    have the mode any new file gets (``mode`` less the umask), or other users could not read a checkpoint."""
    os.chmod(path, mode & ~_umask())
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def remove_orphan_temp_files(folder: str | Path, max_age_s: float = TEMP_FILE_MAX_AGE_S) -> list[Path]:
    """Delete the hidden ``.tmp`` files in ``folder`` that no live writer owns: written on this host by a
    process that no longer runs, or (other hosts, unnamed writers) untouched for ``max_age_s``. Safe without
    a lock: a live writer's file is never deleted. Folders (atomic directories) are left to their lock's holder.
    Assumes the host name identifies the pid namespace (containers sharing a folder have their own names)."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        owner = _TEMP_OWNER.search(path.name)
        try:
            if not path.is_file():
                continue
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # its writer renamed it into place meanwhile
            continue
        dead = owner is not None and owner["host"] == _host_tag() and not _pid_alive(int(owner["pid"]))
        if dead or age > max_age_s:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a writer's pid: keep the file (the age rule still applies)
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# ------------------------------------------------------------------------------------- output checks
def check_output_dir(
    out: str | Path, *, sources: Iterable[str | Path | None] = (), overwrite: bool = False, flag: str = "--out"
) -> Path:
    """Refuse, before any expensive work, an output directory that would go wrong later: one that is a
    file, exists without ``overwrite``, overlaps a source (equal, inside or containing it), cannot be
    written, has a name too long for the filesystem, or is being written by another process."""
    out = Path(out)
    check_name_length(out, flag)  # first: a name over the limit makes even exists() fail
    if out.exists() and not out.is_dir():
        raise MoePruneError(f"{flag} {out} is a file, not a directory; choose a directory path.")
    check_not_overlapping(out, sources, flag)
    if out.exists() and not overwrite:
        raise MoePruneError(f"{out} already exists; choose another {flag} or pass --overwrite.")
    if out.exists():
        check_replaceable(out, flag)
    check_writable_parent(out, flag)
    with output_lock(out):  # fails now, not after the work, when another process writes there
        pass
    return out


def check_output_file(out: str | Path, flag: str = "--out") -> Path:
    """A results file must not be a directory and its folder must be writable (checked before the work)."""
    out = Path(out)
    check_name_length(out, flag)
    if out.is_dir():
        raise MoePruneError(f"{flag} {out} is a directory; give a file name such as {out / 'results.json'}.")
    check_writable_parent(out, flag)
    return out


def check_not_overlapping(out: Path, sources: Iterable[str | Path | None], flag: str = "--out") -> None:
    """``out`` must not be, contain or lie inside any source (writing it would replace or delete the source).
    String sources that do not exist (hub ids) are skipped; Path sources are checked even before they exist."""
    target = out.resolve()
    for source in sources:
        if source is None or (not isinstance(source, Path) and not Path(source).exists()):
            continue
        src = Path(source).resolve()
        if target == src or src in target.parents or target in src.parents:
            relation = "is" if target == src else ("lies inside" if src in target.parents else "contains")
            raise MoePruneError(
                f"{flag} {out} {relation} the source {source}; writing it would replace or delete the source. "
                f"Choose an {flag} outside {src}."
            )


def check_replaceable(out: Path, flag: str = "--out") -> None:
    """--overwrite replaces moeprune outputs (they hold mask.json) and empty folders, nothing else."""
    if out.is_dir() and any(out.iterdir()) and not (out / OUTPUT_MARKER).exists():
        raise MoePruneError(
            f"{flag} {out} is a folder moeprune did not write (no {OUTPUT_MARKER}); --overwrite would delete "
            "everything in it. Choose another --out, or empty that folder yourself."
        )


def check_name_length(path: Path, flag: str = "--out") -> None:
    too_long = [part for part in path.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        raise MoePruneError(
            f"{flag} has a name of {len(os.fsencode(too_long[0]))} bytes, over the filesystem's limit of "
            f"{NAME_MAX}; choose a shorter name."
        )


def check_writable_parent(path: Path, flag: str = "--out") -> None:
    """The nearest existing ancestor of ``path`` must be a directory we may write into."""
    for ancestor in [path, *path.parents]:
        if not ancestor.exists():
            continue
        if not ancestor.is_dir():
            raise MoePruneError(f"{flag} {path}: {ancestor} is a file, not a directory; choose another path.")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise MoePruneError(f"{flag} {path}: {ancestor} is not writable; choose a location you can write to.")
        return


# -------------------------------------------------------------------------------------- locking
@contextmanager
def output_lock(final: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``final`` (the file ``.NAME.lock`` beside it) for the block.

    ``flock`` locks die with their process, so a killed run never leaves a stale lock behind.
    Re-entrant within one process (prune holds it while apply takes it again)."""
    final = Path(final)
    lock = final.parent / (sibling_prefix(final) + ".lock")
    key = lock.resolve() if lock.parent.exists() else lock.absolute()
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    if not final.parent.exists():  # nothing can be writing there yet; the lock is taken when it is created
        yield
        return
    with environment_errors():
        fd = _acquire(lock, final)
    _HELD_LOCKS[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        lock.unlink(missing_ok=True)
        os.close(fd)


def _acquire(lock: Path, final: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise MoePruneError(
                f"Another moeprune process{f' (pid {holder})' if holder else ''} is writing {final}; wait for it "
                "to finish or choose another --out."
            ) from None
        # The previous holder may have unlinked the file between our open and our lock: retry on the new one.
        if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


# ------------------------------------------------------------------------------ atomic directories
@contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``final`` only if the block succeeds.

    Holds ``final``'s lock throughout; cleans (or restores) what killed runs left beside it first."""
    final = Path(final)
    with environment_errors():
        final.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(final), environment_errors():
        recover_leftovers(final)
        if final.exists() and not final.is_dir():
            raise MoePruneError(f"--out {final} is a file, not a directory; choose a directory path.")
        if final.exists() and not overwrite:
            raise MoePruneError(f"{final} already exists; choose another --out or pass --overwrite.")
        if final.exists():
            check_replaceable(final)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=sibling_prefix(final) + ".", suffix=".tmp"))
        _with_default_mode(tmp, 0o777)
        try:
            yield tmp
            swap_in(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is renamed aside first and deleted only after."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=sibling_prefix(final) + ".", suffix=".old"))
    os.rmdir(aside)  # a unique free name; rename needs it absent
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def recover_leftovers(final: Path) -> None:
    """Clean what killed writers of ``final`` left: their temporary folders, and set-aside old outputs (one is
    renamed back when the kill came between the two renames of a swap and ``final`` is missing).
    Call with ``final``'s lock held: no live writer then owns these siblings."""
    # Exactly the names mkdtemp gives our siblings: prefix, 8 random characters, suffix.
    pattern = re.compile(re.escape(sibling_prefix(final) + ".") + r"[A-Za-z0-9_]{8}\.(tmp|old)")
    siblings = [p for p in final.parent.iterdir() if pattern.fullmatch(p.name)]
    olds = sorted((p for p in siblings if p.suffix == ".old"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.rename(olds.pop(), final)
    for path in siblings:
        if path.exists():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
