"""Where a dataset's parquet files are: a path named in a config expanded into sorted files.

A dataset is a file, a directory (every `*.parquet` below it), a glob, or a URI that
`pyarrow.fs.FileSystem.from_uri` understands. Local folders and globs are walked with links
followed, each folder and file once (loops and second ways to a file refused), and nothing
that is not a regular file opened; a remote glob is matched against a listing below its
literal prefix. raymb.data.checks then reads what the files hold.
"""

from __future__ import annotations

import fnmatch
import os
import stat

import pyarrow as pa
import pyarrow.fs as pafs

from raymb import storage
from raymb.errors import DataError, StorageError, one_line
from raymb.files import InputError, check_input

PARQUET_SUFFIX = ".parquet"
_GLOB_CHARS = frozenset("*?[")


def resolve_files(path: str, *, what: str = "data.train") -> tuple[list[str], pafs.FileSystem]:
    """Expand a file, directory, glob or URI into sorted parquet file paths and their filesystem."""
    # Local paths are made absolute: Ray workers run in another directory.
    try:
        location = storage.resolve(path, what=what)
        fs, root = location.fs, location.path
        info = fs.get_file_info(root)
    except StorageError as e:
        raise DataError(f"{what}: cannot open {path}: {e.reason}") from None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what}: cannot open {path}: {one_line(e)}") from None

    if info.type == pafs.FileType.NotFound and _GLOB_CHARS & set(root):
        if location.local:
            candidates = _glob_local(root, what, path)
        else:
            candidates = _glob_remote(fs, root, what, path)
        if not candidates:
            raise DataError(f"{what}: no files match {path}")
    elif info.type == pafs.FileType.NotFound:
        if location.local and os.path.lexists(root):  # a link to nothing, or a loop: say so
            _check_regular(root, what)
        raise DataError(f"{what}: no such file or directory: {path}")
    elif info.type == pafs.FileType.Directory:
        if location.local and os.path.dirname(root) == root:
            raise DataError(f"{what}: {path} is the root of the filesystem; name the data's folder")
        candidates = _files_below(fs, root, location.local, what, path)
        if not candidates:
            raise DataError(f"{what}: no parquet files under {path}")
    else:
        candidates = [root]
        if location.local:  # a FIFO would hang the parquet reader's open, a device feed it
            _check_regular(root, what)

    for f in candidates:
        if not f.endswith(PARQUET_SUFFIX):
            raise DataError(f"{what}: not a parquet file: {f} (expected a *.parquet name)")
    return sorted(candidates), fs


def _files_below(fs: pafs.FileSystem, root: str, local: bool, what: str, path: str) -> list[str]:
    """The data files below a directory (hidden and `_` names skipped). Locally the walk stops
    at the first file that is not parquet, refused then, so a folder that is no dataset (a
    home directory, say) fails at once instead of after listing all of it."""
    if not local:
        selector = pafs.FileSelector(root, recursive=True)
        try:
            found = fs.get_file_info(selector)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{what}: cannot list {path}: {one_line(e)}") from None
        return [
            f.path
            for f in found
            if f.type == pafs.FileType.File and not _is_metadata(f.path[len(root) :])
        ]

    return _walk_local(root, what)


def _walk_local(root: str, what: str, patterns: list[str] | None = None) -> list[str]:
    """The files below a local folder, in os.walk's order (a folder's files sorted, then its
    folders, depth first); hidden and `_` names skipped. With `patterns` (a glob's segments
    below `root`), only the files they match, and only the folders they can reach are walked.
    Links are followed, each folder and each file once:
    - a link back to a folder above it (a loop) is refused, naming the link;
    - a second way to a folder or file already listed (a link, or a hard link, to it) is
      refused naming both paths: counted twice its rows would weigh double;
    - an entry that is not a regular file (a FIFO, a device, a socket, a link to nothing) is
      refused naming it, never opened;
    - in a data folder (no `patterns`), the first file that is not *.parquet is refused, so a
      folder that is no dataset fails at once."""
    files: list[str] = []
    seen_dirs: dict[tuple[int, int], str] = {}
    seen_files: dict[tuple[int, int], str] = {}
    try:
        top = os.stat(root)
    except OSError as e:
        raise DataError(f"{what}: cannot list {root}: {e.strerror or e}") from None
    seen_dirs[_key(top)] = root
    # (folder, its parts below root, the keys of it and the folders above it)
    stack: list[tuple[str, list[str], tuple[tuple[int, int], ...]]] = [(root, [], (_key(top),))]
    while stack:
        folder, parts, above = stack.pop()
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            where = e.filename or folder
            raise DataError(f"{what}: cannot list {where}: {e.strerror or e}") from None
        below = []
        for name in names:
            if _is_metadata(name):
                continue
            f = os.path.join(folder, name)
            rel = [*parts, name]
            wanted = patterns is None or _match(rel, patterns)
            try:
                st = os.stat(f)  # through links
            except OSError as e:
                if not wanted:
                    continue  # a glob's non-match: neither listed nor refused
                if os.path.islink(f) and isinstance(e, FileNotFoundError):
                    to = os.readlink(f)
                    raise DataError(f"{what}: {f} is a link to nothing ({to})") from None
                raise DataError(f"{what}: {f} cannot be read ({e.strerror or e})") from None
            key = _key(st)
            if stat.S_ISDIR(st.st_mode):
                if patterns is not None and not _may_match(rel, patterns):
                    continue  # no match can lie below it
                if key in above:
                    raise DataError(
                        f"{what}: {f} is a symbolic-link loop (it leads back to "
                        f"{seen_dirs[key]}); remove the link"
                    )
                if key in seen_dirs:
                    raise DataError(
                        f"{what}: {f} is the folder {seen_dirs[key]} again (through a link); "
                        "each file counts once: remove the link"
                    )
                seen_dirs[key] = f
                below.append((f, rel, (*above, key)))
                continue
            if not wanted:
                continue
            if not stat.S_ISREG(st.st_mode):
                _check_regular(f, what)  # refuses it, naming what it is
            if patterns is None and not name.endswith(PARQUET_SUFFIX):
                raise DataError(f"{what}: not a parquet file: {f} (expected a *.parquet name)")
            if key in seen_files:
                raise DataError(
                    f"{what}: {f} is the file {seen_files[key]} again (a link or a hard link); "
                    "each file counts once: remove one"
                )
            seen_files[key] = f
            files.append(f)
        stack.extend(reversed(below))
    return files


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _check_regular(path: str, what: str) -> None:
    """A DataError naming a local data path that is not a regular file; nothing is opened."""
    try:
        check_input(path, what)
    except InputError as e:
        raise DataError(str(e)) from None


def _glob_local(pattern: str, what: str, path: str) -> list[str]:
    """A glob on the local filesystem: the walk of _walk_local below the pattern's literal
    prefix (links followed once, loops refused), into the folders the pattern can reach; what
    it matches must be regular files."""
    parts = pattern.split("/")
    n = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    base = "/".join(parts[:n]) or "/"
    if os.path.dirname(base) == base:
        raise DataError(
            f"{what}: {path} would list the whole filesystem; start the pattern with the "
            "data's folder"
        )
    if not os.path.isdir(base):
        return []
    return sorted(_walk_local(base, what, parts[n:]))


def _glob_remote(fs: pafs.FileSystem, pattern: str, what: str, path: str) -> list[str]:
    # pyarrow filesystems have no glob: list below the longest literal prefix, then match
    # segment by segment ('*' stays inside one segment).
    parts = pattern.split("/")
    n = next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))
    base = "/".join(parts[:n]) or "/"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    try:
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{what}: cannot list {path}: {one_line(e)}") from None
    return [
        f.path
        for f in found
        if f.type == pafs.FileType.File
        and not _is_metadata(rel := f.path[len(base) :].strip("/"))
        and _match(rel.split("/"), parts[n:])
    ]


def _match(segments: list[str], patterns: list[str]) -> bool:
    if not patterns:
        return not segments
    if patterns[0] == "**":
        return any(_match(segments[i:], patterns[1:]) for i in range(len(segments) + 1))
    return (
        bool(segments)
        and fnmatch.fnmatchcase(segments[0], patterns[0])
        and _match(segments[1:], patterns[1:])
    )


def _may_match(segments: list[str], patterns: list[str]) -> bool:
    """Whether a path below these segments (a folder's) can match the patterns."""
    if not segments:
        return True
    if not patterns:
        return False
    if patterns[0] == "**":
        return True
    return fnmatch.fnmatchcase(segments[0], patterns[0]) and _may_match(segments[1:], patterns[1:])


def _is_metadata(relative: str) -> bool:
    # Hidden files and Spark/Hadoop markers (_SUCCESS, _metadata, .crc) are not data; as in
    # a shell glob, '*' does not pick them up either.
    return any(p.startswith((".", "_")) for p in relative.split("/") if p)
