"""Start a real, throw-away PostgreSQL server for tests (initdb + pg_ctl in a temp folder).

The server binaries come from the OS (Debian's ``postgresql`` package; ``.ci/run`` installs it
when missing). PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` system user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.processes import free_port


def _bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    if not found:
        raise RuntimeError(
            f"PostgreSQL server binary {name!r} not found: apt-get install postgresql"
        )
    return found


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL of a fresh database on a server listening on 127.0.0.1."""
    # Directly under /tmp: the postgres user must be able to reach it (pytest's own temp
    # folders are private to root).
    folder = Path(tempfile.mkdtemp(prefix="addons-pg-"))
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, cwd="/")

    run(_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(_bin("pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                run(
                    _bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"
                )
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*prefix, _bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, cwd="/")  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
