"""A throw-away single-node Slurm cluster on localhost, for tests.

    cluster = SlurmCluster(Path("/tmp/c"), cpus=8, mem_mb=65536, gpus=2)
    cluster.start()           # munged, MariaDB, slurmdbd, slurmctld, slurmd; waits for "idle"
    subprocess.run(["sinfo"], env=cluster.env)
    cluster.stop()

Every daemon runs in the foreground as the invoking user (root: slurmd launches jobs),
with its configuration, state, logs, pid file and sockets under one scratch directory and
its ports picked free on 127.0.0.1: nothing in /etc, /run or /var is read or written, so
a system Slurm (if any) and a second test cluster are left alone. ``env`` carries
``SLURM_CONF``; every Slurm client command (and so Snakemake's Slurm executor, and the
jobs, which inherit it through ``sbatch --export=ALL``) must run with it.

Accounting goes through slurmdbd and a private MariaDB, because the Slurm executor plugin
polls job states with ``sacct``: with ``accounting_storage/none`` sacct only answers
"Slurm accounting storage is disabled" (Slurm 22.05), and the old
``accounting_storage/filetxt`` no longer exists.

GPUs are fake: gres.conf binds each to a character device every machine has, which the
scheduler allocates and accounts like a real GPU (``--gpus``, ``AllocTRES gres/gpu``).

``bin/srun`` is a shim put first on ``env["PATH"]``: it sets ``SLURM_CONF`` and runs the
real srun. snakemake-executor-plugin-slurm-jobstep 0.6.1 strips every ``SLURM_*`` variable
but the job's identity from the environment of the ``srun`` it runs inside each job, so
without the shim that srun finds no configuration (a real cluster keeps its slurm.conf in
/etc/slurm or serves it "configless"; this one cannot, without touching /etc or /run).

Also a command line, for trying the workflow profile by hand:

    python tests/slurm/slurm_cluster.py up /tmp/slurm-test     # prints: export SLURM_CONF=...
    python tests/slurm/slurm_cluster.py down /tmp/slurm-test
"""

from __future__ import annotations

import atexit
import getpass
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Self

HERE = Path(__file__).resolve().parent
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

# Debian/Ubuntu packages. The daemons and clients are split packages on Debian >= 11;
# slurm-wlm is the older all-in-one name.
SLURM_PACKAGES = ("slurmctld", "slurmd", "slurmdbd", "slurm-client", "munge")
SLURM_FALLBACK = ("slurm-wlm", "slurmdbd", "munge")
DB_PACKAGES = ("mariadb-server", "default-mysql-server")

# tool -> alternatives (the first found is used)
TOOLS = {
    "munged": ("munged",),
    "slurmctld": ("slurmctld",),
    "slurmd": ("slurmd",),
    "slurmdbd": ("slurmdbd",),
    "sbatch": ("sbatch",),
    "sacct": ("sacct",),
    "sacctmgr": ("sacctmgr",),
    "sinfo": ("sinfo",),
    "scontrol": ("scontrol",),
    "scancel": ("scancel",),
    "mysqld": ("mariadbd", "mysqld"),
    "mysql_install_db": ("mariadb-install-db", "mysql_install_db"),
}

# One GPU per device file (never opened).
FAKE_GPU_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (the test skips, naming this reason)."""


def _search_path() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [p for p in SBIN if p not in parts])


def find_tools() -> tuple[dict[str, str], list[str]]:
    """(tool -> path) of what is installed, and the names of what is missing."""
    found, missing = {}, []
    path = _search_path()
    for tool, names in TOOLS.items():
        hit = next((shutil.which(n, path=path) for n in names if shutil.which(n, path=path)), None)
        if hit:
            found[tool] = hit
        else:
            missing.append(tool)
    return found, missing


def _apt_candidate(pkg: str) -> bool:
    proc = subprocess.run(["apt-cache", "policy", pkg], check=False, capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split(":", 1)[1].strip() not in ("", "(none)")
    return False


def _tail(text: str, n: int = 5) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def ensure_installed(timeout: float = 900) -> dict[str, str]:
    """Install Slurm, munge and MariaDB from the system packages if any tool is missing.

    Returns tool -> path. Raises SlurmUnavailable saying why, when they are missing and
    cannot be installed (not root, no apt-get, no such package, apt-get failed).
    """
    found, missing = find_tools()
    if not missing:
        return found
    what = ", ".join(missing)
    if os.environ.get("EMBEDLENS_SLURM_NO_INSTALL"):
        raise SlurmUnavailable(f"missing {what} and EMBEDLENS_SLURM_NO_INSTALL is set")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"missing {what}; installing them needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"missing {what} and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    try:
        upd = subprocess.run(["apt-get", *lock, "update", "-qq"], check=False,
                             capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable("apt-get update timed out") from None
    if upd.returncode != 0:
        raise SlurmUnavailable(f"apt-get update failed: {_tail(upd.stdout + upd.stderr)}")
    if all(_apt_candidate(p) for p in SLURM_PACKAGES):
        packages = list(SLURM_PACKAGES)
    elif all(_apt_candidate(p) for p in SLURM_FALLBACK):
        packages = list(SLURM_FALLBACK)
    else:
        raise SlurmUnavailable("apt has no slurmctld/slurmd/slurmdbd/munge packages")
    db = next((p for p in DB_PACKAGES if _apt_candidate(p)), None)
    if db is None:
        raise SlurmUnavailable("apt has no mariadb-server (slurmdbd, and so sacct, needs it)")
    packages.append(db)
    try:
        inst = subprocess.run(["apt-get", *lock, "install", "-y", "-q",
                               "--no-install-recommends", *packages],
                              check=False, capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"apt-get install {' '.join(packages)} timed out") from None
    if inst.returncode != 0:
        raise SlurmUnavailable(
            f"apt install failed ({' '.join(packages)}): {_tail(inst.stdout + inst.stderr)}")
    found, missing = find_tools()
    if missing:
        raise SlurmUnavailable(f"still missing after apt-get install: {', '.join(missing)}")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _render(name: str, dest: Path, mode: int = 0o644, **values) -> Path:
    text = Template((HERE / f"{name}.in").read_text()).substitute(values)
    dest.write_text(text)
    dest.chmod(mode)
    return dest


@dataclass
class SlurmCluster:
    """A single-node cluster under ``base``; ``partitions`` all hold the one node."""

    base: Path
    cpus: int = 2
    mem_mb: int = 4096
    gpus: int = 1
    partitions: tuple[str, ...] = ("cpu", "gpu")
    cluster: str = "embedlens"
    account: str = "embedlens"
    tools: dict[str, str] = field(default_factory=dict)
    _procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self.base = Path(self.base).resolve()
        self.user = getpass.getuser()

    # -- paths and environment ---------------------------------------------------------

    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.base / "munge" / "munge.sock"

    @property
    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(self.base / "bin"), _search_path()])
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def log(self, name: str) -> Path:
        return self.base / "log" / name

    def run(self, *cmd: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), check=False, capture_output=True, text=True,
                              env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                               f"{proc.stdout}{proc.stderr}")
        return proc

    # -- start / stop ------------------------------------------------------------------

    def start(self, timeout: float = 120) -> SlurmCluster:
        """Write the configuration and start every daemon; raise SlurmUnavailable on failure."""
        if not self.tools:
            self.tools = ensure_installed()
        try:
            self._configure()
            deadline = time.monotonic() + timeout
            self._start_munge(deadline)
            self._start_database(deadline)
            self._start_slurmdbd(deadline)
            self._start_slurm(deadline)
        except SlurmUnavailable:
            self.stop()
            raise
        except Exception as exc:  # a daemon that does not come up: say which and why
            self.stop()
            raise SlurmUnavailable(f"{type(exc).__name__}: {exc}") from exc
        atexit.register(self.stop)  # also on an interrupted test session
        (self.base / "cluster.json").write_text(json.dumps(
            {"SLURM_CONF": str(self.conf),
             "pids": {name: p.pid for name, p in self._procs}}, indent=1))
        return self

    def stop(self) -> None:
        """Cancel any job left and stop the daemons (last started, first stopped)."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self._procs):
            subprocess.run([self.tools.get("scancel", "scancel"), "--user", self.user],
                           check=False, capture_output=True, env=self.env, timeout=30)
            time.sleep(1)
        for name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self._procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for _, proc in self._procs:
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        self._procs.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------

    def _configure(self) -> None:
        for sub in ("etc", "state", "spool", "run", "log", "db", "munge", "bin"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "munge").chmod(0o700)
        (self.base / "etc").chmod(0o700)
        key = self.base / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        if len(str(self.munge_socket)) > 100:
            raise SlurmUnavailable(f"socket path too long for AF_UNIX: {self.munge_socket}")
        if self.gpus > len(FAKE_GPU_DEVICES):
            raise ValueError(f"at most {len(FAKE_GPU_DEVICES)} fake GPUs")
        self.ctld_port, self.slurmd_port, self.dbd_port, self.db_port = free_ports(4)
        self.db_password = secrets.token_hex(12)
        partitions = "\n".join(
            f"PartitionName={name} Nodes=localhost Default={'YES' if i == 0 else 'NO'} "
            f"MaxTime=INFINITE State=UP" for i, name in enumerate(self.partitions))
        values = {"cluster": self.cluster, "base": self.base, "user": self.user,
                  "munge_socket": self.munge_socket, "ctld_port": self.ctld_port,
                  "slurmd_port": self.slurmd_port, "dbd_port": self.dbd_port,
                  "db_port": self.db_port, "db_password": self.db_password,
                  "cpus": self.cpus, "mem_mb": self.mem_mb, "gpus": self.gpus,
                  "partitions": partitions}
        etc = self.base / "etc"
        _render("slurm.conf", etc / "slurm.conf", **values)
        # slurmdbd reads slurmdbd.conf beside $SLURM_CONF and insists on mode 0600.
        _render("slurmdbd.conf", etc / "slurmdbd.conf", mode=0o600, **values)
        gres_lines = "\n".join(f"NodeName=localhost Name=gpu File={dev}"
                               for dev in FAKE_GPU_DEVICES[:self.gpus])
        _render("gres.conf", etc / "gres.conf", gres_lines=gres_lines)
        _render("mariadb-init.sql", etc / "mariadb-init.sql", mode=0o600, **values)
        real_srun = shutil.which("srun", path=_search_path())
        if real_srun:
            _render("srun", self.base / "bin" / "srun", mode=0o755, conf=self.conf,
                    srun=real_srun)

    def _spawn(self, name: str, *cmd: str) -> subprocess.Popen:
        out = open(self.log(f"{name}.out"), "ab")  # noqa: SIM115 (the daemon's stdout)
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self.env, cwd=self.base,
                                start_new_session=True)
        out.close()
        self._procs.append((name, proc))
        return proc

    def _wait(self, what: str, ready, deadline: float, proc: subprocess.Popen | None = None,
              logs: tuple[str, ...] = ()) -> None:
        while time.monotonic() < deadline:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.3)
        detail = " | ".join(_tail(self.log(n).read_text(errors="replace"), 4)
                            for n in logs if self.log(n).exists())
        state = f"exited {proc.returncode}" if proc is not None and proc.poll() is not None \
            else "timed out"
        raise SlurmUnavailable(f"{what} did not start ({state}): {detail}")

    def _ok(self, *cmd: str) -> bool:
        try:
            return subprocess.run(list(cmd), check=False, capture_output=True,
                                  env=self.env, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _port_open(self, port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _start_munge(self, deadline: float) -> None:
        m = self.base / "munge"
        proc = self._spawn("munged", self.tools["munged"], "--foreground", "--force",
                           "--num-threads=8", f"--key-file={m / 'munge.key'}",
                           f"--socket={self.munge_socket}", f"--pid-file={m / 'munged.pid'}",
                           f"--seed-file={m / 'munged.seed'}",
                           f"--log-file={self.log('munged.log')}")
        self._wait("munged", self.munge_socket.exists, deadline, proc,
                   ("munged.out", "munged.log"))

    def _start_database(self, deadline: float) -> None:
        datadir = self.base / "db"
        if not (datadir / "mysql").exists():
            init = subprocess.run(
                [self.tools["mysql_install_db"], "--no-defaults", f"--user={self.user}",
                 f"--datadir={datadir}", "--auth-root-authentication-method=socket",
                 "--skip-test-db"], check=False, capture_output=True, text=True, timeout=180)
            if init.returncode != 0:
                raise SlurmUnavailable(
                    f"mariadb-install-db failed: {_tail(init.stdout + init.stderr)}")
        proc = self._spawn(
            "mariadbd", self.tools["mysqld"], "--no-defaults", f"--user={self.user}",
            f"--datadir={datadir}", f"--socket={self.base / 'run' / 'mysqld.sock'}",
            f"--port={self.db_port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
            f"--pid-file={self.base / 'run' / 'mysqld.pid'}",
            f"--log-error={self.log('mariadbd.log')}",
            f"--init-file={self.base / 'etc' / 'mariadb-init.sql'}",
            "--innodb-buffer-pool-size=128M", "--innodb-lock-wait-timeout=900",
            "--skip-log-bin")
        self._wait("MariaDB", lambda: self._port_open(self.db_port), deadline, proc,
                   ("mariadbd.out", "mariadbd.log"))

    def _start_slurmdbd(self, deadline: float) -> None:
        proc = self._spawn("slurmdbd", self.tools["slurmdbd"], "-D")
        sacctmgr = self.tools["sacctmgr"]
        self._wait("slurmdbd", lambda: self._ok(sacctmgr, "-n", "-P", "list", "cluster"),
                   deadline, proc, ("slurmdbd.out", "slurmdbd.log"))
        # The cluster, an account and the user's association (sacct lists the jobs
        # against it; the executor plugin's account check reads it).
        self.run(sacctmgr, "-i", "add", "cluster", self.cluster)
        self.run(sacctmgr, "-i", "add", "account", self.account,
                 "Description=embedlens test", "Organization=embedlens")
        self.run(sacctmgr, "-i", "add", "user", self.user, f"Account={self.account}",
                 f"DefaultAccount={self.account}")

    def _node_state(self) -> str:
        proc = subprocess.run([self.tools["sinfo"], "-h", "-N", "-o", "%t"], check=False,
                              capture_output=True, text=True, env=self.env, timeout=20)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def _start_slurm(self, deadline: float) -> None:
        ctld = self._spawn("slurmctld", self.tools["slurmctld"], "-D", "-i")
        self._wait("slurmctld", lambda: self._ok(self.tools["scontrol"], "ping"), deadline,
                   ctld, ("slurmctld.out", "slurmctld.log"))
        slurmd = self._spawn("slurmd", self.tools["slurmd"], "-D", "-N", "localhost")
        self._wait("slurmd (node idle)",
                   lambda: self._node_state().split("\n")[0] in ("idle", "mix", "alloc"),
                   deadline, slurmd, ("slurmd.out", "slurmd.log", "slurmctld.log"))


def main(argv: list[str]) -> int:
    """`up DIR [cpus mem_mb gpus]`: start and leave running; `down DIR`: stop."""
    if len(argv) < 2 or argv[0] not in ("up", "down"):
        print(__doc__)
        return 2
    base = Path(argv[1]).resolve()
    if argv[0] == "up":
        cpus, mem, gpus = (int(x) for x in (argv[2:5] + ["8", "65536", "2"][len(argv[2:5]):]))
        cluster = SlurmCluster(base, cpus=cpus, mem_mb=mem, gpus=gpus).start()
        # Detach: the daemons outlive this process (they run in their own sessions).
        cluster._procs.clear()
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    info = json.loads((base / "cluster.json").read_text())
    for name, pid in reversed(list(info["pids"].items())):
        try:
            os.kill(pid, signal.SIGTERM)
            print(f"stopped {name} ({pid})")
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
