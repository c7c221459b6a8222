"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` binaries, initdb into a
temporary directory, listening on 127.0.0.1 at a free port, one fresh database per caller.

Postgres refuses to run as root, so under root (CI, this machine) the server runs as the
`postgres` user that Debian's package creates. Durability is off (fsync, synchronous_commit): the
data dies with the test session anyway, and the machine is shared with heavy jobs.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

USER = "postgres"  # the superuser initdb creates, and (under root) the OS user it runs as


def bindir() -> Path | None:
    """The newest installed server's bin directory (Debian keeps it off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, bin_dir: Path, port: int):
        self.bin, self.port = bin_dir, port
        self.dir = Path(tempfile.mkdtemp(prefix="cppg", dir="/tmp"))  # short: the unix socket lives here too
        self.data = self.dir / "data"
        self._names = itertools.count()
        self._as_user = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []
        if self._as_user:
            shutil.chown(self.dir, USER, pwd.getpwnam(USER).pw_gid)

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> "PostgresServer":
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=400 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.dir / "server.log"), "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh empty database; its SQLAlchemy URL."""
        name = f"cp{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"
