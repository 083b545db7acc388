"""Files that readers never see half-written, with the permissions the user's umask gives new files.

``write_text_atomic`` / ``write_bytes_atomic`` write a sibling temporary file and rename it over the target
(one rename: the old content or the new, never a mix). ``swap_dir`` puts a freshly written folder in the
place of an existing one without a moment where neither exists (Linux ``renameat2(RENAME_EXCHANGE)``;
elsewhere the old folder is renamed aside first, so the gap is one rename). ``normalise_modes`` gives files
written by libraries that create them private (safetensors writes 0600) the mode their siblings have."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import stat
from pathlib import Path
from typing import Callable

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 with the usual 022)."""
    return 0o666 & ~_umask()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, write: Callable[[Path], None], fsync: bool = True) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda p: p.write_text(text))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda p: p.write_bytes(data))


def normalise_modes(directory: str | Path) -> None:
    """Files under ``directory`` get the umask's file mode (executables keep their x bits); folders too."""
    mode = file_mode()
    dir_mode = 0o777 & ~_umask()
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), dir_mode)
        for f in files:
            p = os.path.join(root, f)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, mode | (st.st_mode & 0o111 & dir_mode))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def swap_dir(new: str | Path, dst: str | Path) -> None:
    """Put folder ``new`` at ``dst`` (replacing what is there) so that ``dst`` always exists once it did."""
    new, dst = Path(new), Path(dst)
    if not dst.exists():
        os.replace(new, dst)
        return
    if _exchange(new, dst):  # dst now holds the new folder, ``new`` the old one
        shutil.rmtree(new, ignore_errors=True)
        return
    old = dst.with_name(f".{dst.name}.old.{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)
