"""What a command may read and write on the local filesystem: the ground floor every command's
inputs and outputs pass through, so that the rules hold everywhere at once.

- An input is a regular file (or, where a folder is expected, a folder), checked with stat
  before anything opens it: a FIFO would block the open, a device such as /dev/zero would be
  read until memory runs out. Reads are bounded.
- An output is a regular file or a new path. It never replaces a device, a FIFO, a socket or a
  folder; it replaces an existing file only when the user asked (`--force`); and it is not,
  does not contain, and does not lie inside any of the command's inputs, however either path
  is spelled (links, `..`, hard links).

Each refusal is an `InputError` or an `OutputError`: one line naming the path and what to do.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from raymb.errors import RaymbError

MiB = 1 << 20
# A config is a few kB; a checkpoint of a model this trainer builds on one machine is far
# below this; a tokenizer or manifest is small. Each caller passes its own bound.
CONFIG_LIMIT = 16 * MiB
JSON_LIMIT = 64 * MiB


class InputError(RaymbError):
    """A path given as an input is not something the command can read."""


class OutputError(RaymbError):
    """A path given as an output would replace something the user did not ask to replace."""


def kind_of(mode: int) -> str:
    """What a stat mode is, in words: 'a FIFO', 'a character device', ..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_input(path: str | os.PathLike, what: str, *, folder_ok: bool = False) -> os.stat_result:
    """The stat of an input that exists and is a regular file (or a folder, with `folder_ok`);
    an InputError naming `what` otherwise. Nothing is opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{what} {path}: does not exist") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return st
    wanted = "a regular file or a folder" if folder_ok else "a regular file"
    raise InputError(f"{what} {path}: is {kind_of(st.st_mode)}, not {wanted}")


def read_bounded(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; an InputError otherwise. The file is
    opened without blocking and read to at most limit + 1 bytes, so a file that grows, or is
    swapped for a FIFO after the check, cannot hold the command."""
    check_input(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InputError(f"{what} {path}: is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{what} {path}: is larger than {_size(limit)}; is it the right file?")
    return data


def real(path: str | os.PathLike) -> Path:
    """The path with every link and `..` resolved, whether or not its last part exists."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(path))))


def _same_or_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (links, hard links); False if either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


Input = str | os.PathLike | tuple[str | os.PathLike, str]
"""An input path, or (path, the flag that gave it) to name the flag in a refusal."""


def check_apart(out: str | os.PathLike, what: str, inputs: Iterable[Input]) -> Path:
    """The real path of `out`; an OutputError naming `what` when it is, lies inside or holds
    one of `inputs` (files or folders), however either is spelled: links, `..`, a hard link
    to an input file (or, where `out` exists with more than one link, to a file below an
    input folder). Both places an `out` that is a link names are checked: where it points,
    and the link itself, which a rename onto `out` replaces. Nothing is written."""
    target = real(out)
    given_out = os.path.abspath(os.path.expanduser(out))
    entry = real(os.path.dirname(given_out)) / os.path.basename(given_out)
    places = {target, entry}
    try:
        out_st = os.stat(out)
    except OSError:
        out_st = None
    for given in inputs:
        given, flag = given if isinstance(given, tuple) else (given, None)
        source = real(given)
        if source in places or same_file(target, source):
            relation = "is"
        elif any(source in place.parents for place in places):
            relation = "is inside"
        elif any(place in source.parents for place in places):
            relation = "holds"
        elif (
            out_st is not None
            and stat.S_ISREG(out_st.st_mode)
            and out_st.st_nlink > 1
            and source.is_dir()
            and _links_below(source, out_st)
        ):
            relation = "is"
        else:
            continue
        named = f" ({flag})" if flag else ""
        raise OutputError(f"{what}: {out} {relation} the input {given}{named}; write it elsewhere")
    return target


def _links_below(folder: Path, st: os.stat_result) -> bool:
    """Whether a file below `folder` is the file `st` describes (a hard link to it)."""
    for root, _, names in os.walk(folder, followlinks=False):
        for name in names:
            try:
                other = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


def check_output(
    out: str | os.PathLike,
    what: str,
    *,
    inputs: Iterable[Input] = (),
    force: bool = False,
    folder: bool = False,
) -> Path:
    """The real path of an output the command may write (a file, or with `folder` a new
    folder); an OutputError naming `what` when it:
    - is, contains or lies inside one of `inputs` (files or folders, each a path or
      (path, flag)), however spelled (check_apart; --force does not change this);
    - exists and is not a regular file (a device, FIFO, socket or folder), or, for a folder
      output, exists at all;
    - exists and `force` is not set;
    - lies under a file, or anything else that is not a folder.
    Nothing is written."""
    target = check_apart(out, what, inputs)
    try:
        st = os.lstat(out)
    except (FileNotFoundError, NotADirectoryError):  # new, or under a file: see below
        st = None
    except OSError as e:
        raise OutputError(f"{what}: {out} cannot be checked ({e.strerror or e})") from None
    if st is None:
        above = target.parent
        while not os.path.lexists(above) and above.parent != above:
            above = above.parent
        if not above.is_dir():
            try:
                kind = kind_of(os.stat(above).st_mode)
            except OSError:
                kind = "not a folder"
            raise OutputError(f"{what}: {out} lies under {above}, {kind}, not a folder")
        return target
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(out)
        except OSError:  # a dangling link: writing would create its target elsewhere
            raise OutputError(f"{what}: {out} is a link to nothing; give a plain path") from None
    if folder:
        raise OutputError(f"{what}: {out} exists; choose a new folder")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(
            f"{what}: {out} is {kind_of(st.st_mode)}; give the path of a regular file"
        )
    if not force:
        raise OutputError(f"{what}: {out} exists; pass --force to replace it")
    return target


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n} bytes"
