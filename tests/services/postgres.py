"""A real PostgreSQL server for the tests: initdb and pg_ctl on a loopback port, one per session.

Tests ask for `postgres_url` (a fresh database on a running server) or `postgres_server` (the
server itself, to stop and start it in fault tests). Nothing starts unless a test asks.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "lgw"
# initdb refuses to run as root, and so does pg_ctl: as root, both run as this user instead.
SERVER_USER = "postgres"
INITDB_SECONDS = 120
START_SECONDS = 30
STOP_SECONDS = 30
INSTALL_SERVER = "install PostgreSQL's server binaries (apt-get install postgresql)"
INSTALL_DRIVER = "install the test extra, which brings psycopg (pip install -e '.[test]')"


@dataclass
class PostgresServer:
    """A PostgreSQL server in a temporary folder, reachable on 127.0.0.1:port as a trusted superuser."""

    bin_dir: Path
    root: Path  # data/, the socket and server.log; owned by SERVER_USER when run as root
    port: int
    run_as: str | None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """The maintenance database, `postgres`."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        # pg_ctl status exits 0 while a server runs on the folder, 3 when none does.
        return self._pg_ctl(["status"], timeout=10, check=False).returncode == 0

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database with a unique name; return its URL."""
        import psycopg
        from psycopg import sql

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def start(self) -> None:
        """Start the server on its port and folder; a no-op if it runs already."""
        if self.running:
            return
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        result = self._pg_ctl(
            ["start", "-w", "-t", str(START_SECONDS), "-l", str(self.log_path), "-o", options],
            timeout=START_SECONDS + 15,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(
                f"PostgreSQL did not start on 127.0.0.1:{self.port} within {START_SECONDS} s "
                f"(pg_ctl exited {result.returncode}):\n{result.stdout}{result.stderr}\n{self.log_tail()}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` disconnects clients and shuts down cleanly, `immediate` aborts."""
        if not self.running:
            return
        self._pg_ctl(["stop", "-w", "-t", str(STOP_SECONDS), "-m", mode], timeout=STOP_SECONDS + 15)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def kill(self) -> None:
        """The last resort of teardown: SIGKILL the postmaster named in postmaster.pid."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _pg_ctl(self, args: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        return run(
            self.run_as, [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args], self.root, timeout, check
        )


def run(
    run_as: str | None, command: list[str], cwd: Path, timeout: float, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a PostgreSQL command, as run_as when given, within timeout seconds."""
    if run_as is not None:
        command = ["runuser", "-u", run_as, "--", *command]
    # cwd: the server user may not be able to enter the test's working directory (/root, say).
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def find_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, else PATH's."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if (on_path := shutil.which("initdb")) is not None:
        candidates.append(Path(on_path).resolve().parent)
    for bin_dir in candidates:
        if all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return bin_dir
    pytest.fail(
        "PostgreSQL's initdb, pg_ctl and postgres were not found in /usr/lib/postgresql/*/bin "
        f"nor on PATH; {INSTALL_SERVER}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_root(run_as: str | None) -> Path:
    """A temporary folder the server user owns, under parents it can traverse."""
    parent = Path(tempfile.gettempdir())
    if run_as is not None and not all(p.stat().st_mode & 0o001 for p in (parent, *parent.parents)):
        parent = Path("/tmp")
    root = Path(tempfile.mkdtemp(prefix="lgw-postgres-", dir=parent))
    if run_as is not None:
        user = pwd.getpwnam(run_as)
        os.chown(root, user.pw_uid, user.pw_gid)
    return root


def server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        pytest.fail(
            f"running as root, the tests start PostgreSQL as the user {SERVER_USER!r}, which does not exist; "
            f"{INSTALL_SERVER}, which creates it, or run the tests as another user"
        )
    if shutil.which("runuser") is None:
        pytest.fail("running as root, the tests need runuser (util-linux) to start PostgreSQL as another user")
    return SERVER_USER


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, started on first use and removed at the end."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail(f"psycopg is not installed; {INSTALL_DRIVER}")
    bin_dir = find_bin_dir()
    run_as = server_user()
    root = make_root(run_as)
    server = PostgresServer(bin_dir, root, free_port(), run_as)
    try:
        run(
            run_as,
            [str(bin_dir / "initdb"), "-D", str(server.data_dir), "-A", "trust", "-U", SUPERUSER]
            + ["-E", "UTF8", "--no-locale", "--no-sync"],
            root,
            INITDB_SECONDS,
        )
        server.start()
        yield server
    finally:
        try:
            server.stop(mode="immediate")
        except (subprocess.SubprocessError, pytest.fail.Exception):
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's server (started again if a test stopped it)."""
    postgres_server.start()
    return postgres_server.new_database()
