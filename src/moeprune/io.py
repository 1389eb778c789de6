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
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any

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
_TEMP_OWNER = re.compile(r"\.(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})\.[a-z0-9_]{8}\.tmp$")

_HELD_LOCKS: dict[Path, list[int]] = {}  # lock path -> [fd, depth]: re-entrant within this process


def environment_error(err: OSError) -> MoePruneError | None:
    """The one-line error for an OSError caused by the environment (full disk, read-only, ...), else None."""
    fix = ENVIRONMENT_ERRNOS.get(err.errno)
    if fix is None:
        return None
    where = f" ({err.filename})" if err.filename else ""
    return MoePruneError(
        f"Cannot write{where}: {err.strerror or err}; {fix}. The unfinished file was removed; what was finished "
        "before is kept (rerun to resume)."
    )


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


@contextmanager
def atomic_file(path: str | Path, text: bool = False) -> Iterator[IO[Any]]:
    """The one way moeprune writes a file: into a new pid-tagged temporary sibling, created without
    following symlinks (``O_CREAT | O_EXCL | O_NOFOLLOW``), renamed over ``path`` only if the block succeeds.

    ``path`` itself must be absent or a regular file (a symlink, folder or FIFO there is refused, so a
    planted link never redirects an output); the temporary file is removed on any failure or signal."""
    path = Path(path)
    with environment_errors():
        make_dirs(path.parent)  # below an output root: no folder is a link (see output_root)
        check_regular_destination(path)
        tmp, fd = _create_temp(path)
        try:
            with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as handle:
                yield handle
            make_dirs(path.parent)  # again: a link planted while we wrote is refused too
            check_regular_destination(path)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (see :func:`atomic_file`)."""
    with atomic_file(path, text=True) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path, text=True) as handle:
        handle.write(text)


def save_safetensors_atomic(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None,
                            before_rename: Any = None) -> None:
    """A safetensors file written atomically (its bytes go through our own no-follow descriptor);
    ``before_rename()`` runs once the bytes are written, before the file appears (profiles write their .json there)."""
    from safetensors.torch import save

    with atomic_file(path) as handle:
        handle.write(save(tensors, metadata=metadata))
        handle.flush()
        if before_rename is not None:
            before_rename()


def check_regular_destination(path: Path, flag: str | None = None) -> None:
    """An output file's path must be absent or a regular file: never a symlink (even a dangling one), a
    folder, a FIFO or a device, which a rename or a write would replace or write through."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # absent (a parent that is a file is reported by its check)
        return
    if stat.S_ISREG(st.st_mode):
        return
    kind = _file_kind(st.st_mode)
    where = f"{flag} {path}" if flag else str(path)
    raise MoePruneError(
        f"{where} is {kind}, not a regular file; moeprune never writes through or over one. Remove it or "
        "choose another path."
    )


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


# ------------------------------------------------------------------------- folders below an output root
# The output roots of the running verb (an experiment's --out, a profile folder, a capture's work folder): every
# folder below one is created and entered without following links, so `ln -s ~/elsewhere OUT/cells` is refused
# instead of written through. The root itself is the user's choice (it may be reached through a link).
_OUTPUT_ROOTS: ContextVar[tuple[Path, ...]] = ContextVar("moeprune_output_roots", default=())
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@contextmanager
def output_root(root: str | Path) -> Iterator[Path]:
    """Declare ``root`` an output root for the block: :func:`make_dirs` (and so :func:`atomic_file`) then
    refuses any link among the folders between it and what is written below it. Roots nest; the outermost
    one that holds a path is the one checked from."""
    root = Path(os.path.abspath(root))
    token = _OUTPUT_ROOTS.set((*_OUTPUT_ROOTS.get(), root))
    try:
        yield root
    finally:
        _OUTPUT_ROOTS.reset(token)


def _root_of(path: Path) -> Path | None:
    for root in _OUTPUT_ROOTS.get():
        if path == root or root in path.parents:
            return root
    return None


def make_dirs(path: str | Path) -> Path:
    """Create ``path`` and its missing parents; below a declared :func:`output_root`, each folder is created
    and opened relative to its parent's descriptor with ``O_NOFOLLOW``: a symbolic link (or a file) in its
    place is refused in one line, never followed. Returns ``path``."""
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    root = _root_of(absolute)
    if root is None:
        path.mkdir(parents=True, exist_ok=True)
        return path
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, _DIR_FLAGS)
    where = root
    try:
        for part in absolute.relative_to(root).parts:
            where = where / part
            try:
                os.mkdir(part, 0o777, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                inner = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                kind = _file_kind(os.lstat(part, dir_fd=fd).st_mode)
                raise MoePruneError(
                    f"{where} is {kind}, not a folder moeprune made; moeprune never writes through a link (or "
                    f"over a file) below its output {root}. Remove it and run again."
                ) from None
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    return path


# ------------------------------------------------------------------------------------- names from records
# One rule for every name that becomes a file or folder name (corpus names, mask variants and methods, cell
# ids, capture keys): ASCII letters and digits, then also _ . - @ + =, at most 120 bytes, no "..". It is applied
# when a record is read and again when a path is built (path_inside).
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+=-]{0,119}")


def is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None and ".." not in name


def check_plain_name(name: Any, what: str, fix: str) -> str:
    """``name`` if it is a plain name (see PLAIN_NAME), else one line naming ``what`` and the ``fix``."""
    if not is_plain_name(name):
        raise MoePruneError(
            f"{what} {terminal_safe(repr(name))[:80]} is not a plain name (ASCII letters, digits and _ . - @ + =, "
            f"not starting with a dot, no '..', at most 120 characters); {fix}."
        )
    return name


def path_inside(root: str | Path, *names: str, what: str = "A name", fix: str = "rename it") -> Path:
    """``root/names...`` for names that come from a record: each a plain name, and the resolved result
    checked to stay inside the resolved ``root`` (one line otherwise, nothing written)."""
    root = Path(root)
    for name in names:
        check_plain_name(name, what, fix)
    path = root.joinpath(*names)
    if path.is_symlink():
        raise MoePruneError(f"{path} is a symbolic link; moeprune never reads or writes through a link below its "
                            "output. Remove it and run again.")
    base = root.resolve()
    if base not in path.resolve().parents:
        raise MoePruneError(f"{what} {terminal_safe('/'.join(names))!r} leads outside {root}; {fix}.")
    return path


# ------------------------------------------------------------------------------- whose folder, whose file
def check_own_folder(out: str | Path, foreign: Callable[[Path], Path | None], verb: str, flag: str = "--out") -> None:
    """A non-empty existing ``out`` must be ``verb``'s own folder: ``foreign(out)`` names the first entry that is not
    (None when all are). moeprune never writes its files among someone else's (experiment --out ~/project would
    replace report.md there; profile --out data, data/wiki.json)."""
    out = Path(out)
    if not out.is_dir():
        return
    entry = foreign(out)
    if entry is not None:
        kind = "" if stat.S_ISREG(os.lstat(entry).st_mode) else f", {_file_kind(os.lstat(entry).st_mode)}"
        raise MoePruneError(
            f"{flag} {out} is a folder that `moeprune {verb}` did not make (it holds {terminal_safe(entry.name)!r}"
            f"{kind}); moeprune writes its files only into a new, an empty or its own folder. Choose another {flag}."
        )


def foreign_entry(out: Path, folders: Iterable[str] = ("reconstruction",),
                  names: Iterable[str] = ("perplexity.json",)) -> Path | None:
    """The first visible entry of ``out`` that is not moeprune's, or None: moeprune's are JSON files with a
    ``moeprune.*`` format (profile metadata, masks, capture records), a ``.safetensors`` beside such a JSON (a
    corpus profile) or a partial one, ``names``, and moeprune's ``folders`` (real folders, not links). For a
    profile or plan --out."""
    folders, names = set(folders), set(names)
    for path in sorted(out.iterdir()):
        if path.name.startswith("."):
            continue
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            ok = path.name in folders
        elif not stat.S_ISREG(st.st_mode):
            ok = False
        elif path.suffix == ".safetensors":
            ok = path.stem.endswith(".partial") or _is_moeprune_json(path.with_suffix(".json"))
        else:
            ok = path.name in names or (path.suffix == ".json" and _is_moeprune_json(path))
        if not ok:
            return path
    return None


def without_file(name: str) -> Callable[[Path], Path | None]:
    """For :func:`check_own_folder`: a folder is its verb's own when it holds ``name`` as a regular file (an
    experiment's experiment.json); else its first visible entry is named."""
    def foreign(out: Path) -> Path | None:
        if holds_regular_file(out, name):
            return None
        return next((p for p in sorted(out.iterdir()) if not p.name.startswith(".")), None)

    return foreign


def holds_regular_file(out: Path, name: str) -> bool:
    """Whether ``out/name`` is a regular file (not a link)."""
    try:
        return stat.S_ISREG(os.lstat(out / name).st_mode)
    except OSError:
        return False


def _is_moeprune_json(path: Path) -> bool:
    try:
        obj = read_json(path, "File", "-", limit=MAX_JSON_BYTES)
    except MoePruneError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"].startswith("moeprune.")


SEAL_KEY = "sha256"


def sealed(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with ``sha256``: the SHA-256 of its canonical JSON without that key. moeprune seals what it caches
    and writes for others to reuse (masks, cells, recovery records), so a hand edit is told apart."""
    body = {k: v for k, v in obj.items() if k != SEAL_KEY}
    return {**body, SEAL_KEY: _canonical_sha256(body)}


def seal_intact(obj: Any) -> bool:
    """True when ``obj`` carries a seal that matches its content (written by moeprune and not edited since)."""
    if not isinstance(obj, dict) or not isinstance(obj.get(SEAL_KEY), str):
        return False
    return obj[SEAL_KEY] == _canonical_sha256({k: v for k, v in obj.items() if k != SEAL_KEY})


def _canonical_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False,
                                     default=str).encode()).hexdigest()


def check_replaceable_file(path: str | Path, ours: bool, overwrite: bool, flag: str = "--out") -> None:
    """An existing output file is replaced only when moeprune wrote it (``ours``, e.g. an intact seal) or with
    ``--overwrite``: a hand-edited or foreign file is never silently replaced."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not ours and not overwrite:
        raise MoePruneError(
            f"{path} exists and was not written by moeprune (or was edited since); it is not replaced. Pass "
            f"--overwrite to replace it, or choose another {flag}."
        )


# ------------------------------------------------------------------------------- temporary files
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new hidden file beside ``path``, ``.NAME.<pid>-<host>.XXXXXXXX.tmp`` (30 bytes past the prefix,
    within :func:`sibling_prefix`'s margin), and its open descriptor. O_EXCL never opens an existing file
    or link; the mode is what any new file gets (0666 less the umask), so a renamed output is readable."""
    prefix = f"{sibling_prefix(path)}.{os.getpid()}-{_host_tag()}."
    names = tempfile._get_candidate_names()
    for _ in range(100):
        tmp = path.parent / f"{prefix}{next(names)}.tmp"
        try:
            return tmp, os.open(tmp, _CREATE_NEW, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def temp_file_beside(path: Path) -> Path:
    """A new, empty temporary sibling of ``path`` (see :func:`_create_temp`), closed, for writers that need
    a path; prefer :func:`atomic_file`."""
    tmp, fd = _create_temp(path)
    os.close(fd)
    return tmp


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
            st = os.lstat(path)  # a link is judged (and removed) as itself, never followed
            if stat.S_ISDIR(st.st_mode):
                continue
            age = time.time() - st.st_mtime
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


# -------------------------------------------------------------------------------------------- inputs
MAX_JSON_BYTES = 256 << 20  # masks, profile metadata, cells, configs: far smaller; a larger file is not ours
MAX_JSON_DEPTH = 64  # moeprune's own JSON nests 5 deep; configs about 4
MAX_TEXT_BYTES = 16 << 30  # a text corpus or perplexity file read whole into memory


def open_regular_file(path: str | Path, what: str) -> int:
    """A read-only descriptor of ``path``, refused (one line) unless it is a regular file: a folder, a FIFO
    (opened non-blocking, so it never hangs), a device or a socket is named as such."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MoePruneError(f"{what} {path} not found; check the path.") from None
    except IsADirectoryError:
        raise MoePruneError(f"{what} {path} is a directory, not a file; give a file.") from None
    except OSError as err:
        if err.errno == errno.ENXIO:  # a socket, or a FIFO without a writer on some systems
            raise MoePruneError(f"{what} {path} is not a regular file; give a file.") from None
        raise MoePruneError(f"Cannot read {what.lower()} {path}: {err.strerror or err}.") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise MoePruneError(f"{what} {path} is {_file_kind(mode)}, not a regular file; give a file.")
    os.set_blocking(fd, True)
    return fd


def file_sha256(path: str | Path, what: str = "Input file") -> str:
    """SHA-256 of a regular file's bytes, read in blocks (a cache key's record of an input's content)."""
    digest = hashlib.sha256()
    with os.fdopen(open_regular_file(path, what), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_regular_file(path: str | Path, what: str) -> None:
    """Fail now unless ``path`` is a readable regular file (for inputs another library reads itself)."""
    os.close(open_regular_file(path, what))


def read_bytes(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    fd = open_regular_file(path, what)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise MoePruneError(f"{what} {path} is {size:,} bytes, over the {limit:,}-byte limit for it.")
        return handle.read(limit + 1)


def read_text(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES, fix: str | None = None) -> str:
    """The one reader of text inputs: a regular file, at most ``limit`` bytes, UTF-8 without NUL bytes."""
    path = Path(path)
    data = read_bytes(path, what, limit)
    if b"\x00" in data[:65536]:
        raise MoePruneError(f"{what} {path} looks binary (it holds NUL bytes), not text; {fix or 'give a UTF-8 file'}.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MoePruneError(
            f"{what} {path} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
            + (fix or f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}.")
        ) from err


def parse_json(text: str | bytes, where: str, fix: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys (``{"0": .., "0": ..}``), nesting at most ``max_depth``;
    anything else is one line ``where is not valid JSON (...); fix``."""
    try:
        obj = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise MoePruneError(f"{where} is nested too deeply to be moeprune's JSON; {fix}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise MoePruneError(f"{where} is not valid JSON ({terminal_safe(str(err))}); {fix}.") from err
    if _depth(obj) > max_depth:
        raise MoePruneError(f"{where} nests deeper than {max_depth} levels, which no moeprune file does; {fix}.")
    return obj


def read_json(path: str | Path, what: str, fix: str, limit: int = MAX_JSON_BYTES) -> Any:
    """The one loader of JSON files: :func:`read_text` (a bounded regular UTF-8 file) then :func:`parse_json`;
    an empty file is named as empty. Callers check the schema of what they get."""
    path = Path(path)
    text = read_text(path, what, limit, fix=fix)
    if not text.strip():
        raise MoePruneError(f"{what} {path} is empty; {fix}.")
    return parse_json(text, f"{what} {path}", fix)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {twice!r} appears twice")
    return obj


def _depth(obj: Any) -> int:
    """Nesting depth, iteratively (a deep object must not overflow the stack here either)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors")


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json: a JSON object (read by :func:`read_json`)."""
    path = Path(folder) / "config.json"
    config = read_json(path, "Config file", "re-download or repair the checkpoint's config.json")
    if not isinstance(config, dict):
        raise MoePruneError(f"Config file {path} is not a JSON object; re-download or repair the checkpoint.")
    return config


def read_weight_map(folder: str | Path) -> dict[str, str]:
    """The ``weight_map`` of a checkpoint's safetensors index: tensor name -> shard file name, each shard a plain
    ``*.safetensors`` name in the folder (a ``../x`` would read, and model-free apply write, outside it)."""
    path = Path(folder) / INDEX_FILE
    fix = "re-download the checkpoint"
    index = read_json(path, "Checkpoint index", fix)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise MoePruneError(f"Checkpoint index {path} has no weight_map of tensor -> shard names; {fix}.")
    bad = sorted(v for v in set(weight_map.values()) if not _SHARD_NAME.fullmatch(v))
    if bad:
        raise MoePruneError(f"Checkpoint index {path} names the shard {terminal_safe(bad[0])!r}, not a "
                            f"*.safetensors file in the checkpoint folder; {fix}.")
    return weight_map


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


TENSOR_SAMPLE = 4096  # bytes of each tensor's data a checkpoint fingerprint reads (its first ones)


def checkpoint_fingerprint(folder: str | Path) -> str | None:
    """A cheap fingerprint of a local checkpoint's weights (None when ``folder`` is not a local folder): for
    every weight file, its name, size and modification time, and for safetensors files their whole header
    (tensor names, dtypes, shapes and offsets) and the first ``TENSOR_SAMPLE`` bytes of every tensor's data;
    the index file's content too. Weights rewritten in place change the times, and any tensor rewritten (a
    fine-tune, a conversion, one expert scaled) changes its first bytes even when the times are put back
    (``touch -r``) and the size is the same. Not a full hash: that would read every weight once more before each
    run (a second pass over the disk for a model that streams); an edit confined to a tensor's later bytes with
    the times restored goes unseen. A copy keeps the times (cp -p, copytree) or is profiled again, never reused
    wrongly."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(WEIGHT_SUFFIXES + (".index.json",)) or not path.is_file():
            continue
        st = path.stat()
        digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if path.suffix == ".safetensors" and st.st_size >= 8:
            _safetensors_sample(path, st.st_size, digest)
        elif path.name.endswith(".index.json"):
            digest.update(path.read_bytes()[:MAX_JSON_BYTES])
    return digest.hexdigest()


def _safetensors_sample(path: Path, size: int, digest: Any) -> None:
    """The header and the first bytes of each tensor's data (one small positioned read per tensor, without
    read-ahead: a fingerprint of a 60 GB checkpoint reads a few MB)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        length = int.from_bytes(os.pread(fd, 8, 0), "little")
        header = os.pread(fd, min(length, MAX_JSON_BYTES), 8)
        digest.update(header)
        try:
            entries = json.loads(header)
        except ValueError:
            return  # not a safetensors header: its bytes (and the file's size and time) are the fingerprint
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        starts = sorted(
            entry["data_offsets"][0] for name, entry in entries.items()
            if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and entry["data_offsets"] and isinstance(entry["data_offsets"][0], int)
        ) if isinstance(entries, dict) else []
        for start in starts:
            offset = 8 + length + start
            if 0 <= offset < size:
                digest.update(os.pread(fd, TENSOR_SAMPLE, offset))
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ untrusted text
# CSI/OSC/other escape sequences, then the C0/C1 controls and the bidi/zero-width marks that can fake output.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[PX^_][^\x1b]*(?:\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def terminal_safe(text: Any, keep_newlines: bool = True) -> str:
    """``text`` with escape sequences and control characters removed (newlines and tabs kept when asked):
    what a mask, profile or config says cannot clear the screen or fake a line of output."""
    text = _CONTROLS.sub("", _ANSI.sub("", str(text)).replace("\r", ""))
    return text if keep_newlines else text.replace("\n", " ").replace("\t", " ")


def markdown_safe(text: Any) -> str:
    """Untrusted text inside a markdown table cell or line: one line, HTML escaped, markdown punctuation
    backslash-escaped (no heading, link, image, table break or raw HTML can come out of it)."""
    import html

    return html.escape(_MARKDOWN.sub(r"\\\1", terminal_safe(text, keep_newlines=False)), quote=True)


# ------------------------------------------------------------------------------------- output checks
def check_output_dir(
    out: str | Path, *, sources: Iterable[str | Path | None] = (), overwrite: bool = False, flag: str = "--out"
) -> Path:
    """Refuse, before any expensive work, an output directory that would go wrong later: one that is a
    file, exists without ``overwrite``, overlaps a source (equal, inside or containing it), cannot be
    written, has a name too long for the filesystem, or is being written by another process."""
    out = Path(out)
    check_name_length(out, flag)  # first: a name over the limit makes even exists() fail
    check_not_symlink(out, flag)
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


def check_output_file(out: str | Path, flag: str = "--out", sources: Iterable[str | Path | None] = (),
                      overwrite: bool = True) -> Path:
    """A results file must not be a directory, a symlink or another non-regular file, nor an input of the
    verb (a source file, or a file inside a source folder), and its folder must be writable (checked before
    the work). An existing one is replaced only with ``overwrite``."""
    out = Path(out)
    check_name_length(out, flag)
    check_not_symlink(out, flag)
    if out.is_dir():
        raise MoePruneError(f"{flag} {out} is a directory; give a file name such as {out / 'results.json'}.")
    check_regular_destination(out, flag)
    target = out.resolve()
    for source in sources:
        if source is None or not Path(source).exists():
            continue
        src = Path(source).resolve()
        if target == src or src in target.parents:  # a new file inside the model folder changes the model too
            raise MoePruneError(
                f"{flag} {out} is {'the input' if target == src else 'a file of the input'} {source}; writing it "
                f"would {'replace it' if target == src or out.exists() else 'add a file to it'}. Choose another {flag}."
            )
    if out.exists() and not overwrite:
        raise MoePruneError(f"{out} already exists; choose another {flag} or pass --overwrite to replace it.")
    check_writable_parent(out.parent, flag)
    return out


def check_not_symlink(path: Path, flag: str = "--out") -> None:
    """An output path that is a symlink (dangling or not) is refused up front, named as the user gave it:
    the rename that puts an output in place would replace the link, not write where it points."""
    if path.is_symlink():
        raise MoePruneError(
            f"{flag} {path} is a symbolic link (to {os.readlink(path)}); moeprune writes outputs only to real "
            f"paths. Give the target itself, or remove the link."
        )


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
        fd = _open_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            holder = holder if holder.isdigit() else ""
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


def _open_lock(lock: Path) -> int:
    """The lock file, opened without following a symlink and refused unless it is our kind of file: a regular
    file with one link (a planted symlink or hard link to ~/.bashrc would otherwise be truncated)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        fd = None
    st = os.fstat(fd) if fd is not None else os.lstat(lock)
    if fd is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        if fd is not None:
            os.close(fd)
        kind = _file_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
        raise MoePruneError(
            f"The lock file {lock} is {kind}, not moeprune's own; it was not written through. Remove it and "
            "run again."
        )
    return fd


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
        check_not_symlink(final)
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
            _default_modes(tmp)
            swap_in(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _default_modes(folder: Path) -> None:
    """Every file and folder written into ``folder`` gets the mode a new one gets under the umask (0644 / 0755
    under umask 022), whoever wrote it: safetensors' writer (and so transformers' save_pretrained) creates its
    files 0600, which other users could not read."""
    for path in folder.rglob("*"):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            _with_default_mode(path, 0o777)
        elif stat.S_ISREG(st.st_mode):
            _with_default_mode(path, 0o777 if st.st_mode & 0o111 else 0o666)


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
    # A set-aside output is a real folder; a link of that name is planted, never renamed into place.
    olds = sorted((p for p in siblings if p.suffix == ".old" and not p.is_symlink() and p.is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if olds and not final.exists() and not final.is_symlink():
        os.rename(olds.pop(), final)
    for path in siblings:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
