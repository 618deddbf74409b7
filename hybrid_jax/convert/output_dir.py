"""Writing a converter's output directory all at once: build it in a temporary directory beside
the target, then rename it into place, so a failure never leaves a half-written output and an
existing output is replaced only when asked and only once the new one is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def occupied(out: Path) -> bool:
    """Whether ``out`` holds something we would replace (a non-empty directory, or a file)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        return True
    return out.is_dir() and any(out.iterdir())


def remove(path: Path) -> None:
    """Delete a file, link or directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def refuse_existing(out: Path, overwrite: bool) -> None:
    """FileExistsError naming ``out`` when it holds something and ``overwrite`` is not set."""
    if occupied(out) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True to "
                              f"replace it")


def install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is removed only afterwards."""
    refuse_existing(out, overwrite)
    if occupied(out):
        backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, backup)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(backup, out)
            raise
        remove(backup)
    else:
        if out.is_dir():
            out.rmdir()  # empty
        os.rename(tmp, out)


@contextlib.contextmanager
def writing(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a new temporary directory beside ``out`` to fill; when the block finishes, rename it
    into place with ``install``; on any error delete it, leaving ``out`` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # (not mkdtemp: its 0700 mode would stay on the renamed output)
    try:
        yield tmp
        install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_extra_files(files, reserved) -> None:
    """Raise ValueError naming the first of ``files`` that is missing, or whose name is one the
    writer produces itself (``reserved``: names, or suffixes starting with '.')."""
    for f in files:
        name = Path(f).name
        if name in reserved or any(r.startswith(".") and name.endswith(r) for r in reserved):
            raise ValueError(f"{f}: an extra file may not be named {name!r}, which the "
                             f"checkpoint writes itself")
        if not Path(f).is_file():
            raise ValueError(f"{f}: extra file not found")
