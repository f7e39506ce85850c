"""Writing files so that nothing is ever half-written: temp file in the same folder, then rename.

Directories (saved models, artifacts) are replaced by :func:`atomic_directory`: the new
folder is written beside the old one under a hidden temp name, then swapped in. On Linux the
swap is one ``renameat2(RENAME_EXCHANGE)`` call, so a reader, or a ``kill -9`` at any moment,
sees the old or the new folder, never neither. Where the call is missing (other systems, a
file system without it) the old folder is renamed aside first and the new one renamed in; a
kill between those two renames leaves the aside copy, which the next write to the same
target restores before doing anything else.

Temp names carry a host tag and the writer's pid (``.<name>.new.<host>.<pid>.<random>``,
``.<name>.old.<host>.<pid>.<random>``, ``.<name>.<host>.<pid>.<random>.tmp``): the next write
to the same target removes the leftovers of dead writers on this host, and never touches a
live writer's (a concurrent export) or another host's.

Test hooks (environment variables, read when the swap runs): ``ADDONS_TEST_PAUSE_AT=<point>``
prints ``paused at <point>`` to stderr and sleeps at that point of the swap (``before-swap``,
``between-renames``, ``after-swap``) so a test can kill the process there;
``ADDONS_TEST_NO_EXCHANGE=1`` uses the two-rename fallback.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: Short tag of this host in temp names: a pid is only meaningful on the host that wrote it.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie, killed but not yet reaped by its
    parent, counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust kill()
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _tag() -> str:
    return f"{HOST_TAG}.{os.getpid()}"


def _leftovers(target: Path) -> Iterator[tuple[Path, str]]:
    """(path, kind) of the temp files and folders of dead writers to ``target`` on this host;
    kind is ``new`` (being written), ``old`` (a replaced version) or ``tmp`` (a file)."""
    name = re.escape(target.name)
    pattern = re.compile(
        rf"^\.{name}\.(?:(?P<kind>new|old)\.)?(?P<host>[0-9a-f]{{8}})\.(?P<pid>\d+)\.[^./]+(?P<tmp>\.tmp)?$"
    )
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for path in entries:
        m = pattern.match(path.name)
        if not m or m["host"] != HOST_TAG or bool(m["kind"]) == bool(m["tmp"]):
            continue
        if int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
            continue  # a live writer (a concurrent export): not ours to touch
        yield path, m["kind"] or "tmp"


def recover(target: str | Path) -> None:
    """Repair what a killed writer left beside ``target``: restore the replaced version if
    ``target`` itself is missing (killed between the two renames of the fallback swap), and
    remove every other leftover temp file or folder of dead writers on this host."""
    target = Path(target)
    for path, kind in sorted(_leftovers(target), key=lambda p: p[1] != "old"):
        if kind == "old" and not target.exists():
            try:
                path.rename(target)
                continue
            except OSError:  # a concurrent recovery got there first
                pass
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _pause(point: str) -> None:
    """Test hook: stop at ``point`` of the swap so a test can ``kill -9`` the process there."""
    if os.environ.get("ADDONS_TEST_PAUSE_AT") == point:
        print(f"paused at {point}", file=sys.stderr, flush=True)
        time.sleep(600)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux ``renameat2``); False if unsupported."""
    if os.environ.get("ADDONS_TEST_NO_EXCHANGE") or not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # C library without the call (old glibc, musl < 1.2)
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, target: Path) -> None:
    """Make ``new`` the folder at ``target``, replacing what is there (see the module doc)."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):
        old = new  # the swap left the replaced version under the temp name
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.{_tag()}.", dir=target.parent))
        old.rmdir()  # only the unique name is wanted
        target.rename(old)
        _pause("between-renames")
        try:
            new.rename(target)
        except BaseException:
            old.rename(target)
            raise
    _pause("after-swap")
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the temp file to ``path``.

    If ``write`` raises, the temp file is removed and ``path`` is untouched. Temp files left
    by killed writers to the same ``path`` are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_tag()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes it private; a plain file is wanted
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


@contextmanager
def atomic_directory(target: str | Path, marker: str) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it replaces ``target`` atomically.

    ``target`` may only be replaced if it is one of ours, i.e. holds the file ``marker``
    (a saved model, an artifact): any other existing folder raises ``FileExistsError`` and is
    left alone. On failure the temp folder is removed and ``target`` is untouched. Leftovers
    of killed writers to ``target`` are repaired first (:func:`recover`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    if target.exists() and not (target / marker).is_file():
        raise FileExistsError(f"{target} exists and has no {marker}: refusing to overwrite it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new.{_tag()}.", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a plain folder is wanted
        _pause("before-swap")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
