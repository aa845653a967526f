"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd started here.

Why a private cluster: these machines have no systemd and no running Slurm, and several people
may run the suite at once, so every session gets its own temp folder holding slurm.conf, state,
spool, logs, its own munged socket and its own free ports. Nothing outside that folder is written
(except the packages that scripts/ci/install-slurm.sh installs).

Use it as a pytest plugin (`pytest_plugins = ["slurm_cluster"]`) for the session fixture
`slurm_cluster`, or by hand for experiments:
    python tests/slurm_cluster.py start /tmp/mycluster   # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop /tmp/mycluster
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo")
# Requeued jobs wait this long before they may start again (slurm.conf AuthInfo cred_expire,
# 120 s by default); a short value keeps the preemption test quick.
CRED_EXPIRE_S = 5
FAKE_GPUS = 2


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin", "/usr/bin") if (p := Path(d) / name).exists()),
        None)


def unavailable_reason() -> str | None:
    """Why this machine cannot run the test cluster, or None when it can."""
    missing = [n for n in DAEMONS + CLIENTS + ("runuser",) if _which(n) is None]
    if missing:
        return (f"Slurm/munge binaries not found ({', '.join(missing)}); run "
                "scripts/ci/install-slurm.sh (Debian: apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "starting slurmd needs root (it launches jobs and sets their user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing (scripts/ci/install-slurm.sh creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> tuple[str, str]:
    """(node name, NodeName=... line) from `slurmd -C`, the node's own hardware report."""
    out = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    name = line.split()[0].split("=", 1)[1]
    # A little less memory than measured, so a registration that reads a few MB less does
    # not drain the node ("Low RealMemory").
    line = re.sub(r"RealMemory=(\d+)", lambda m: f"RealMemory={int(m.group(1)) * 9 // 10}", line)
    return name, line


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    partition: str = "debug"
    procs: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (and the jobs they submit)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        res = subprocess.run(list(args), capture_output=True, text=True, env=self.env,
                             timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip()

    def log_tail(self, n: int = 30) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel this cluster's jobs (no training left running), then stop its daemons."""
        if self.conf.exists() and (self.procs.get("slurmctld")
                                   or _read_pid(self.root / "slurmctld.pid")):
            self.run("scancel", f"--user={pwd.getpwuid(os.geteuid()).pw_name}", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run(
                    "squeue", "-h", "-o", "%i", check=False).strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / ("munge/munged.pid" if name == "munged" else f"{name}.pid")
            pid = self.procs.pop(name, None) or _read_pid(pid_file)
            if pid:
                _terminate(pid)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _terminate(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


SLURM_CONF = """\
# Single-node test cluster written by tests/slurm_cluster.py
ClusterName={cluster}
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
GresTypes=gpu
{node_line} Gres=gpu:{gpus} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(root: Path, *, timeout: float = 60) -> SlurmCluster:
    """Write the config into `root`, start munged/slurmctld/slurmd, wait until the node is idle."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    for sub in ("state", "spool", "log"):  # a fresh cluster: no state from an earlier one
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(exist_ok=True)
    mu = pwd.getpwnam("munge")
    os.chown(munge_dir, mu.pw_uid, mu.pw_gid)
    os.chmod(munge_dir, 0o755)
    (root / "plugstack.conf").write_text("")
    # Stand-in GPUs (links to /dev/null) so jobs can ask for --gpus-per-node as on a GPU
    # cluster: Slurm's allocation, CUDA_VISIBLE_DEVICES and launch are real, while the tasks
    # compute on the CPU (torch finds no CUDA).
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    for i in range(FAKE_GPUS):
        link = dev / f"gpu{i}"
        if not link.is_symlink():
            link.symlink_to("/dev/null")
    (root / "gres.conf").write_text(f"Name=gpu File={dev}/gpu[0-{FAKE_GPUS - 1}]\n")
    node, node_line = _node_line()
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(
        cluster=f"wkd{secrets.token_hex(3)}", node=node, node_line=node_line, root=root,
        gpus=FAKE_GPUS, ctld_port=_free_port(), slurmd_port=_free_port(), cred_expire=CRED_EXPIRE_S,
        munge_socket=munge_dir / "munge.socket"))
    cluster = SlurmCluster(root=root, conf=conf, node=node)

    # munged as user munge, on a private socket (no clash with a system munged).
    subprocess.run(
        [_which("runuser") or "runuser", "-u", "munge", "--", _which("munged") or "munged",
         f"--socket={munge_dir / 'munge.socket'}", f"--pid-file={munge_dir / 'munged.pid'}",
         f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}",
         "--key-file=/etc/munge/munge.key"],
        check=True, capture_output=True, timeout=30)
    cluster.procs["munged"] = _wait_pid(munge_dir / "munged.pid")
    env = cluster.env
    for daemon in ("slurmctld", "slurmd"):
        # Both daemonize; their pid files say which processes to stop.
        res = subprocess.run([_which(daemon) or daemon, "-f", str(conf)], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        if res.returncode != 0:
            cluster.stop()
            raise RuntimeError(f"{daemon} failed to start: {res.stderr.strip()}\n"
                               f"{cluster.log_tail()}")
        cluster.procs[daemon] = _wait_pid(root / f"{daemon}.pid")
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = cluster.node_state()
        if state == "idle":
            return cluster
        if state.startswith(("down", "drain")):
            cluster.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        time.sleep(0.5)
    cluster.stop()
    raise RuntimeError(f"node never became idle (last state {state!r})\n{cluster.log_tail()}")


def _wait_pid(path: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _read_pid(path)
        if pid:
            return pid
        time.sleep(0.1)
    raise RuntimeError(f"no pid file {path} after {timeout} s")


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """A running single-node cluster; SLURM_CONF points clients (and wattkd) at it."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no test Slurm cluster: {reason}")
    root = Path(tempfile.mkdtemp(prefix="wattkd-slurm-"))
    cluster = start_cluster(root)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if os.environ.get("WATTKD_KEEP_SLURM") != "1":
            shutil.rmtree(root, ignore_errors=True)


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "start":
        cluster = start_cluster(root)
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        SlurmCluster(root=root, conf=root / "slurm.conf", node="").stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
