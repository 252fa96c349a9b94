"""Publishing a command's output: one writer at a time, no existing output replaced unasked, nothing lost.

Every command that writes (``quantize``, ``eval``, ``bench``, ``generate``, ``export``, ``zoo train``)
and ``diffquant.save`` go through ``claim_output``::

    with claim_output(out, overwrite=overwrite) as output:   # refuses or locks here, before any work
        ...write the file or folder at output.tmp...
        output.publish()                                      # atomic; without it the output is untouched

Guarantee (docs/errors.md): at every instant ``out`` is either absent (never published), the
complete old output or the complete new one (with one documented exception below). A new output is written at a hidden temporary
sibling (``.partial-<pid>-<name>``) and renamed in. An existing one is replaced by an atomic
exchange of the two paths (Linux ``renameat2(RENAME_EXCHANGE)``), then the old one, now at the
temporary name, is deleted. Where the exchange is unsupported the old output is first renamed aside
(``.old-<pid>-<name>``) and the new one renamed in: between those two renames ``out`` is absent, and a
process killed there leaves the old output whole aside, which the next claim of ``out`` renames back.

The lock is ``.<name>.lock`` beside the output, held with ``flock`` (released by the kernel when the
process dies, so a killed writer never blocks the next one) and holding the writer's pid, which a
second writer's one-line refusal names. A claim nested in the same process (``quantize`` claims
``--out`` at start, ``diffquant.save`` claims it again) shares the outer lock.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

_HELD: dict[Path, int] = {}  # resolved output path -> how many claims of this process hold its lock


def _present(path: Path) -> bool:
    """An output counts as present unless absent or an empty folder (a folder the user made for it)."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_output(path: Path) -> None:
    """Undo what a killed writer of ``path`` left: put an output renamed aside back, drop its partial writes."""
    for stale in sorted(path.parent.glob(f".old-*-{path.name}")) + sorted(path.parent.glob(f".partial-*-{path.name}")):
        pid = stale.name.split("-", 2)[1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if stale.name.startswith(".old-") and not _present(path):
            if path.exists():
                path.rmdir()
            os.rename(stale, path)
        else:
            _remove(stale)


class Output:
    """A claimed output: write at ``tmp``, then ``publish()``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".partial-{os.getpid()}-{path.name}")
        self.published = False

    def publish(self) -> Path:
        """Move ``tmp`` to the output path atomically (module docstring); returns the output path."""
        path, tmp = self.path, self.tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written for {path}")
        _umask_modes(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            _remove(tmp)  # the old output, now at the temporary name
        else:
            aside = path.with_name(f".old-{os.getpid()}-{path.name}")
            os.rename(path, aside)
            os.rename(tmp, path)
            _remove(aside)
        self.published = True
        return path


def _umask_modes(root: Path) -> None:
    """Give every file and folder under ``root`` the user's umask (safetensors and mkstemp create 0600)."""
    from .io import file_mode

    mode, folder_mode = file_mode(), file_mode(folder=True)
    os.chmod(root, mode if root.is_file() else folder_mode)
    for folder, dirs, files in os.walk(root):
        for names, new_mode in ((dirs, folder_mode), (files, mode)):
            for name in names:
                if not os.path.islink(os.path.join(folder, name)):  # never change what a link points to
                    os.chmod(os.path.join(folder, name), new_mode)


def _lock(path: Path, lock: Path) -> int:
    """Take ``lock`` (flock, non-blocking) and write our pid in it; refuses naming the holder's pid."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(f"{path} is being written by another diffquant process (pid {holder}); "
                                  "wait for it to finish or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder unlinked while we waited to open it
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


@contextmanager
def claim_output(path: str | Path, *, overwrite: bool = False, flag: str = "--overwrite") -> Iterator[Output]:
    """Claim ``path`` for writing: refuse an existing output unless ``overwrite`` (``flag`` names how), refuse
    while another process writes it; yields an ``Output``. Unpublished writes are removed on exit."""
    path = Path(path)
    key = path.resolve()
    output = Output(path)
    lock, fd = path.with_name(f".{path.name}.lock"), None
    if key not in _HELD:  # a nested claim of this process shares the outer lock
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(path, lock)
    try:
        if fd is not None:
            recover_output(path)
        if _present(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; pass {flag} to replace it, or write elsewhere")
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield output
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
            if not output.published and output.tmp.exists():
                _remove(output.tmp)
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)
            os.close(fd)


def claim_main_output(path: str | Path, *, overwrite: bool = False) -> AbstractContextManager[Output | None]:
    """``claim_output`` in the main process; nothing (``None``) in the other processes of an ``accelerate launch``,
    which never write a command's output."""
    worker = int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"
    return nullcontext() if worker else claim_output(path, overwrite=overwrite)
