"""Where runs and data live: a local directory or an object store, behind one small interface.

`resolve("runs")` and `resolve("s3://bucket/runs")` both give a `Location`: a pyarrow
filesystem and a path on it, with the text the user wrote for messages. Ray Train takes the
same pair (RunConfig's storage_path and storage_filesystem), so checkpoints go from each
worker straight to storage; everything else raymb keeps in a run (run.json, metrics.csv,
summary.json, loss.png) goes through `Location`.

S3 URIs are reached with the endpoint and region of the `[storage]` config section (see
`configure`), else of the environment (AWS_ENDPOINT_URL, AWS_REGION); credentials always come
from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or the machine's role), never
from a config, which is saved with every run. Other schemes (gs://, hdfs://, ...) are
whatever `pyarrow.fs.FileSystem.from_uri` makes of them.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raymb.errors import StorageError

_options: dict[str, str | None] = {"endpoint_url": None, "region": None}


def configure(endpoint_url: str | None, region: str | None) -> None:
    """Use this endpoint and region (a config's [storage]) for the S3 URIs this process
    resolves. Each command calls it once, at its start (raymb.driver.preflight.check_run_dir,
    raymb tune's checks, the tools)."""
    _options.update(endpoint_url=endpoint_url, region=region)


def is_uri(text: str | os.PathLike) -> bool:
    return "://" in str(text)


@dataclass(frozen=True)
class Location:
    """A file or directory on a filesystem: `path` on `fs`, shown as `uri`."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if self.local:  # the parent of "/name" is "/"
            return Location(self.fs, os.path.dirname(self.path), os.path.dirname(self.uri))
        return Location(self.fs, self.path.rsplit("/", 1)[0], self.uri.rsplit("/", 1)[0])

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path}/{name}", f"{self.uri}/{name}")

    def child(self, name: str) -> Location:
        """The entry `name` directly inside this directory, never this directory itself nor one
        above it: ValueError for "", ".", "..", a separator or a control character."""
        if name in ("", ".", "..") or "/" in name or "\\" in name or not name.isprintable():
            raise ValueError(f"{name!r} is not a plain name of one entry in {self.uri}")
        if not self.local:
            return self / name
        path = os.path.join(self.path, name)  # "/" and "r" make "/r", not "//r"
        # The test of the text above already rules this out; the path is what gets deleted.
        if os.path.dirname(os.path.normpath(path)) != os.path.normpath(self.path):
            raise ValueError(f"{name!r} does not name an entry directly in {self.uri}")
        return Location(self.fs, path, path)

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """A local location is a path like any other (open(), Path())."""
        if not self.local:
            raise TypeError(f"{self.uri} is not on the local filesystem")
        return self.path

    def on_same(self, fs_path: str) -> str:
        """The text (local path or URI) of another path on this location's filesystem."""
        if self.local:
            return fs_path
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{fs_path}"

    def info(self) -> pafs.FileInfo:
        return self._call(self.fs.get_file_info, self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def listing(self) -> dict[str, pafs.FileInfo]:
        """What a directory holds, by name, each with its type and mtime (one request); {}
        when it does not exist."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return {i.base_name: i for i in self._call(self.fs.get_file_info, selector)}

    def children(self) -> list[Location]:
        """What a directory holds, by name; [] when it does not exist."""
        return [self / name for name in sorted(self.listing())]

    def read_bytes(self) -> bytes:
        """The file's contents; FileNotFoundError when it does not exist."""
        if not self.is_file():
            raise FileNotFoundError(self.uri)
        with self._call(self.fs.open_input_stream, self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file so that a reader sees the old contents or the new, never a part:
        locally through a temporary name and a rename; an object store's PUT (or multipart
        upload) makes the object visible only once it is complete."""
        if self.local:
            write_local(Path(self.path), data)
            return
        with self._call(self.fs.open_output_stream, self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        self._call(self.fs.create_dir, self.path, recursive=True)

    def remove(self) -> None:
        """Delete a file or a whole directory; nothing when it does not exist."""
        for _ in range(2):  # a file that vanishes meanwhile (Ray's own clean-up) stops a pass
            kind = self.info().type
            try:
                if kind == pafs.FileType.Directory:
                    self._call(self.fs.delete_dir, self.path)
                elif kind == pafs.FileType.File:
                    self._call(self.fs.delete_file, self.path)
                return
            except FileNotFoundError:
                continue

    def check_can_hold(self, what: str) -> None:
        """A one-line StorageError naming `what` when this is a file, or (locally) lies under
        one, so that no directory can be made here; nothing is written."""
        if not self.local:
            if self.is_file():
                raise StorageError(f"{what} {self.uri}", "is a file, not a directory")
            return
        path = Path(self.path)
        while not os.path.lexists(path) and path.parent != path:
            path = path.parent
        if not path.is_dir():
            shown = "is a file" if str(path) == self.path else f"is under {path}, a file"
            raise StorageError(f"{what} {self.uri}", f"{shown}, not a directory")

    def fetch(self, into: Path) -> Path:
        """A local copy of this file or directory under `into` (itself, when it is local)."""
        if self.local:
            return Path(self.path)
        target = Path(into) / self.name
        if self.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            self._call(
                pafs.copy_files,
                self.path,
                str(target),
                source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        else:
            target.write_bytes(self.read_bytes())
        return target

    def _call(self, fn, *args, **kwargs):
        """A filesystem call whose failure (no bucket, no access, no endpoint) is one line
        naming this location."""
        try:
            return fn(*args, **kwargs)
        except (OSError, pa.ArrowException) as e:
            if isinstance(e, FileNotFoundError | NotADirectoryError):
                raise
            raise StorageError(self.uri, _reason(e)) from None


def resolve(text: str | os.PathLike, *, what: str = "path") -> Location:
    """A local path (made absolute: Ray workers run elsewhere) or a URI, as a Location."""
    text = str(text)
    if not is_uri(text):
        path = os.path.abspath(os.path.expanduser(text))
        return Location(pafs.LocalFileSystem(), path, path)
    scheme, rest = text.split("://", 1)
    uri = text.rstrip("/")
    try:
        if scheme in ("s3", "s3a") and "?" not in rest:
            return Location(pafs.S3FileSystem(**s3_options()), rest.rstrip("/"), uri)
        fs, path = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise StorageError(f"{what} {text}", _reason(e)) from None
    return Location(fs, path.rstrip("/"), uri)


def s3_options() -> dict:
    """S3FileSystem's endpoint and region: [storage], else the environment. Credentials are
    left to the AWS chain (environment variables, config files, the machine's role)."""
    endpoint = (
        _options["endpoint_url"]
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = (
        _options["region"] or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    )
    options: dict = {}
    if endpoint:
        options["endpoint_override"] = endpoint
        region = region or "us-east-1"  # S3-compatible servers rarely care; the SDK needs one
    if region:
        options["region"] = region
    return options


def write_local(path: Path, data: bytes) -> None:
    """Write a local file through a hidden temporary sibling and a rename (a reader never sees
    a part of it, nor mistakes the temporary file for a shard), synced before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_sibling(path: Path, *, folder: bool = False) -> Path:
    """A new empty file (or folder) beside `path`, named `.NAME.<random>.tmp`, to write and then
    rename onto `path`. The name is unique, so two writers of one path never share it; the
    mode is what open() or mkdir() gives (0666 or 0777 less the umask), not mkstemp's private
    0600, so what is renamed into place is as readable as any other file the user writes."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _reason(e: BaseException) -> str:
    """The useful part of an Arrow/AWS error, on one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    if "To create buckets, enable the allow_bucket_creation option" in text:
        # pyarrow's own hint names its option, not raymb's: say what the store said.
        bucket = text.split("Bucket '", 1)[-1].split("'", 1)[0]
        return f"AWS Error NO_SUCH_BUCKET: the bucket {bucket!r} does not exist (create it first)"
    for marker in ("AWS Error ", "curlCode"):
        if marker in text:
            text = text[text.index(marker) :]
            break
    return text.split(" (Request ID")[0]
