"""Atomic outputs: write next to the final path under a hidden temporary name, fsync, rename into place.

A kill at any moment leaves either the old state or the complete new one, plus at most a temporary
`.NAME.tmp-PID[.suffix]` that the next run removes (`remove_stale_temps`, only for processes no longer running).
Used by `generate` (videos and reports: never replaces a path unless asked) and by training (checkpoints, logs).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["temp_path", "fsync_tree", "publish", "staged", "atomic_file", "atomic_dir", "remove_stale_temps"]

# `.STEM.tmp-PID[.suffix]`: a kept suffix stays last because imageio / ffmpeg / PIL pick the format from it
_OLD = ".old"  # a folder being replaced is first renamed to the temporary of NAME.old
_TEMP_NAME = re.compile(r"\.(?P<stem>.+)\.tmp-(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?")


def temp_path(final: Path, pid: int | None = None, *, keep_suffix: bool = True) -> Path:
    """`dir/name.mp4` -> `dir/.name.tmp-PID.mp4` (hidden, same folder so the final rename is atomic)."""
    pid = os.getpid() if pid is None else pid
    suffix = final.suffix if keep_suffix else ""
    stem = final.name[: len(final.name) - len(suffix)]
    return final.with_name(f".{stem}.tmp-{pid}{suffix}")


def _fsync_one(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush `path` to disk: a file, or a folder with everything in it (a rename is durable only once its folder
    is synced, so folders are synced after their files, innermost first)."""
    if not path.is_dir():
        _fsync_one(path)
        return
    for item in path.rglob("*"):
        if item.is_file() and not item.is_symlink():
            _fsync_one(item)
    for folder in sorted({p.parent for p in path.rglob("*")} | {path}, key=lambda p: -len(p.parts)):
        _fsync_one(folder)


def publish(tmp: Path, final: Path, *, replace: bool = False) -> None:
    """Rename `tmp` to `final`. Without `replace`, an existing `final` (also one that appeared meanwhile) is never
    replaced: `FileExistsError`. With `replace`, only a regular file or a folder is replaced, never a link."""
    if replace:
        if final.is_symlink() or (final.exists() and not stat.S_ISREG(os.lstat(final).st_mode)
                                  and not (final.is_dir() and tmp.is_dir())):
            raise FileExistsError(f"{final} is not a regular file (or a folder replaced by a folder); not replaced")
        if final.is_dir():
            old = temp_path(final.with_name(final.name + _OLD), keep_suffix=False)
            os.rename(final, old)  # a kill between the two renames leaves the old folder under a temp name,
            # which remove_stale_temps renames back
            os.rename(tmp, final)
            shutil.rmtree(old)
            return
        os.replace(tmp, final)
        return
    if final.exists() or final.is_symlink():
        raise FileExistsError(f"{final} exists")
    if tmp.is_dir():
        os.rename(tmp, final)  # rename never replaces a non-empty folder, and `final` was absent just now
        return
    try:
        os.link(tmp, final)  # atomic "create if absent"
    except FileExistsError:
        raise FileExistsError(f"{final} appeared meanwhile") from None
    except OSError:  # a file system without hard links: checked just above, then rename
        os.replace(tmp, final)
        return
    tmp.unlink()


def _discard(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()


@contextmanager
def staged(finals: list[Path], *, replace: bool = False, keep_suffix: Callable[[Path], bool] = lambda p: True
           ) -> Iterator[list[Path]]:
    """Yield temporary paths next to `finals`; on success fsync them and publish them in order (put a report last:
    it then always describes complete data); on failure, or after, delete what is left of them."""
    temps = [temp_path(p, keep_suffix=keep_suffix(p)) for p in finals]
    try:
        yield temps
        for tmp in temps:
            fsync_tree(tmp)
        for tmp, final in zip(temps, finals, strict=True):
            publish(tmp, final, replace=replace)
        for folder in {p.parent for p in finals}:
            _fsync_one(folder)  # the renames themselves
    finally:
        for tmp in temps:
            _discard(tmp)


def atomic_file(final: Path, write: Callable[[Path], None], *, replace: bool = True) -> Path:
    """`write(tmp)` writes a temporary file next to `final` (same suffix), then it is fsynced and published."""
    with staged([final], replace=replace) as (tmp,):
        write(tmp)
    return final


def atomic_dir(final: Path, write: Callable[[Path], None], *, replace: bool = False) -> Path:
    """`write(tmp)` fills a temporary folder next to `final`, then it is fsynced and published."""
    with staged([final], replace=replace, keep_suffix=lambda p: False) as (tmp,):
        tmp.mkdir(parents=True)
        write(tmp)
    return final


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists (another user's)
        return True
    return True


def remove_stale_temps(folder: Path, *, suffixes: tuple[str, ...] | None = None,
                       folder_ok: Callable[[Path], bool] = lambda p: True) -> list[Path]:
    """Delete temporaries in `folder` (`.NAME.tmp-PID[.suffix]`) of processes that no longer run: files whose
    suffix is in `suffixes` (None: any) or that have none, folders when `folder_ok(path)`. Links, other names and
    temporaries of running processes are left alone. A replaced folder's old copy (`.NAME.old.tmp-PID`) whose
    `NAME` is missing (the replacing process died between its two renames) is renamed back to `NAME`, not deleted."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or path.is_symlink() or _pid_running(int(match["pid"])):
            continue
        if suffixes is not None and match["suffix"] and match["suffix"] not in suffixes:
            continue
        try:
            if path.is_dir():
                stem = match["stem"]
                if stem.endswith(_OLD) and not (folder / stem[: -len(_OLD)]).exists():
                    os.rename(path, folder / stem[: -len(_OLD)])
                    continue
                if not folder_ok(path):
                    continue
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another writer of this folder removed it first
            continue
        removed.append(path)
    return removed
