"""Writing files so that no reader ever sees a half-written one and a crash loses nothing;
reading them so that every failure is one line naming the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

__all__ = [
    "atomic_files",
    "atomic_open",
    "atomic_write_bytes",
    "check_whole",
    "read_json",
    "read_text",
    "read_yaml",
    "reading",
]


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Opens a temporary file beside ``path`` for writing; when the block ends without an error
    the file is flushed to disk and moved onto ``path`` (``os.replace``), otherwise it is removed
    and any old ``path`` stays as it was. Creates missing parent folders. The file gets the usual
    permissions (0o666 minus the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


@contextmanager
def atomic_files(folder: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder inside ``folder`` for a writer that fills a folder (``save_pretrained``);
    when the block ends without an error each file written there is flushed to disk and moved
    into ``folder`` (``os.replace``), so that every file there is whole: its old version or its
    new one. The temporary folder is removed either way."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        yield staging
        for written in sorted(staging.iterdir()):
            with written.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(written, folder / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextmanager
def reading(source: str | os.PathLike) -> Iterator[None]:
    """Turns whatever reading ``source`` (a file, a folder, a line of a file) raises, each parser
    having exceptions of its own, into a one-line ``ValueError`` that names it."""
    try:
        yield
    except Exception as error:
        raise ValueError(f"{source}: {_one_line(error)}") from error


def _require_regular_file(path: Path) -> None:
    """A folder, FIFO or device is refused before it is opened: reading a FIFO waits forever."""
    if not path.is_file():
        raise OSError("no such file" if not path.exists() else "not a regular file")


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a regular file; every failure is a one-line ``ValueError`` naming it."""
    path = Path(path)
    with reading(path):
        _require_regular_file(path)
        return path.read_text(encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's value; every failure is a one-line ``ValueError`` naming the file (deep
    nesting included, which the parser meets as a RecursionError)."""
    text = read_text(path)
    with reading(path):
        return json.loads(text)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data: a ``!!python/...`` tag is an error, never code), reading
    ``3e-4`` as a float as YAML 1.2 does; YAML 1.1 wants ``3.0e-4`` and makes ``3e-4`` a string."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's plain data (see :class:`_Yaml12Loader`); a syntax error, a ``!!python/...``
    tag or any other failure is a one-line ``ValueError`` naming the file and, where the parser
    says, the line."""
    text = read_text(path)
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a safe loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}{where}: {error.problem or error.context}") from None
    except Exception as error:  # deep nesting: RecursionError; other parser failures
        raise ValueError(f"{path}: {_one_line(error)}") from error


def check_whole(path: str | os.PathLike) -> None:
    """Raises a one-line ``ValueError`` naming ``path`` unless it is a whole file of its kind, as
    its suffix says: ``.json`` that parses, ``.safetensors`` whose header covers the file,
    ``.pt`` / ``.pth`` / ``.bin`` (``torch.save``'s zip archives) with their closing central
    directory. A file cut short by a kill fails; the check reads headers, never the tensors."""
    path = Path(path)
    if path.suffix == ".json":
        read_json(path)
        return
    with reading(path):
        _require_regular_file(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path):
                pass
        else:
            raise ValueError(f"no check for {path.suffix or 'suffix-less'} files")
