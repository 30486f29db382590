"""A throwaway PostgreSQL server on loopback for the distributed-sweep test (Debian's postgresql package)."""
import glob
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return found[-1].rsplit("/", 1)[0] if found else None


@contextmanager
def postgres_server():
    """Start PostgreSQL (as user postgres: it refuses root) in a temp folder; yield its SQLAlchemy URL; stop it."""
    pg = bin_dir()
    if pg is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql (.ci/run does)")
    root = tempfile.mkdtemp(prefix="pg-")
    shutil.chown(root, "postgres")
    data, port = f"{root}/data", free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, f"{pg}/initdb", "-D", data, "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_postgres, f"{pg}/pg_ctl", "-D", data, "-o", options, "-l", f"{root}/log", "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, f"{pg}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
