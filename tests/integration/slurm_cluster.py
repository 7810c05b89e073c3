"""An emulated slurm cluster of N nodes on this machine, for the integration tests.

munged (as the munge user, its own key and socket), slurmctld, and one slurmd per node. Each slurmd
runs in its own UTS and mount namespace (`unshare --uts --mount`) with its own hostname (node1,
node2, ...), its own /dev/shm, and a bind-mounted hosts file naming every node, so that each node has a hostname of
its own, as torchrun's c10d rendezvous needs; the nodes share the network namespace and listen on
their own NodeAddr (127.0.1.x) and port. Everything lives in one temporary folder; stop() ends the
daemons by pid.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
from pathlib import Path

from integ_helpers import Procs, free_ports, need, run, tail, wait_for


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2) -> None:
        self.root = root
        self.names = [f"node{i + 1}" for i in range(nodes)]
        self.addrs = [f"127.0.1.{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.procs = Procs()
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- setup ---------------------------------------------------------------------------------

    def _munge(self) -> None:
        # munged checks every folder above its files: they must be reachable by the munge user
        # and writable only by their owner (or sticky, as /tmp), so not under pytest's 0700 tmp.
        mdir = Path(tempfile.mkdtemp(prefix="msllm-munge-", dir="/tmp"))
        mdir.chmod(0o755)
        self.munge_dir = mdir
        munge = pwd.getpwnam("munge")
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(128))
        for p in (mdir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        self.munge_socket = mdir / "munge.socket"
        cmd = [
            "setpriv",
            f"--reuid={munge.pw_uid}",
            f"--regid={munge.pw_gid}",
            "--clear-groups",
            "munged",
            "--foreground",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--seed-file={mdir / 'munged.seed'}",
            f"--log-file={mdir / 'munged.log'}",
        ]
        proc = self.procs.start("munged", cmd, self.root / "munged.out")
        wait_for(
            lambda: self.munge_socket.exists() or proc.poll() is not None,
            20,
            "munged's socket",
        )
        need(
            proc.poll() is None, f"munged did not start:\n{tail(self.root / 'munged.out')}\n{tail(mdir / 'munged.log')}"
        )

    def _write_conf(self) -> None:
        ctld_port, *node_ports = free_ports(1 + len(self.names))
        self.node_ports = node_ports
        host = socket.gethostname()
        (self.root / "state").mkdir()
        (self.root / "spool").mkdir()
        lines = [
            "ClusterName=msllmtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again
            # (default 120 s); a shorter one keeps the requeue test quick.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobRequeue=1",
            "KillWait=30",
            "MinJobAge=600",
            "SlurmdTimeout=60",
            "MessageTimeout=30",
            "InactiveLimit=0",
        ]
        for name, addr, port in zip(self.names, self.addrs, node_ports):
            lines.append(f"NodeName={name} NodeAddr={addr} Port={port} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        hosts = ["127.0.0.1 localhost", f"127.0.0.1 {host}"]
        hosts += [f"{addr} {name}" for name, addr in zip(self.names, self.addrs)]
        self.hosts_file = self.root / "hosts"
        self.hosts_file.write_text("\n".join(hosts) + "\n")

    def start(self) -> SlurmCluster:
        for tool in ("munged", "slurmctld", "slurmd", "sbatch", "unshare", "setpriv"):
            need(shutil.which(tool) is not None, f"{tool} is missing: run .ci/install-system.sh")
        self._munge()
        self._write_conf()
        ctld = self.procs.start(
            "slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], self.root / "slurmctld.out", env=self.env
        )
        for name in self.names:
            # Own hostname, hosts file and /dev/shm (mosaicml-streaming keys its shared memory by
            # local rank: two nodes sharing /dev/shm collide); slurmd -N picks its NodeName line.
            script = (
                f"hostname {name} && mount --bind {self.hosts_file} /etc/hosts && "
                f"mount -t tmpfs -o size=512m tmpfs /dev/shm && "
                f"exec slurmd -D -N {name} -f {self.conf}"
            )
            self.procs.start(
                f"slurmd-{name}",
                ["unshare", "--uts", "--mount", "sh", "-c", script],
                self.root / f"slurmd-{name}.out",
                env=self.env,
            )

        def idle() -> bool:
            if ctld.poll() is not None:
                return True
            out = run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, env=self.env).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            return all(states.get(n) == "idle" for n in self.names)

        wait_for(idle, 60, "both slurm nodes to be idle", diagnostics=self.diagnostics)
        need(ctld.poll() is None, f"slurmctld exited:\n{self.diagnostics()}")
        return self

    def stop(self) -> None:
        self.procs.stop()
        if getattr(self, "munge_dir", None):
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    # -- use -----------------------------------------------------------------------------------

    def diagnostics(self) -> str:
        parts = [run(["sinfo", "-N", "-l"], check=False, env=self.env, timeout=20).stdout]
        parts += [tail(self.root / f) for f in ("slurmctld.out", "slurmctld.log")]
        for name in self.names:
            parts += [tail(self.root / f"slurmd-{name}.out", 10), tail(self.root / f"slurmd-{name}.log", 20)]
        return "\n".join(parts)

    def job_state(self, job_id: str) -> dict:
        out = run(["scontrol", "-o", "show", "job", job_id], check=False, env=self.env).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict:
        info: dict = {}

        def check():
            nonlocal info
            info = self.job_state(job_id)
            return info.get("JobState") in states

        wait_for(
            check,
            timeout,
            f"job {job_id} to reach {states}",
            interval=1,
            diagnostics=lambda: f"job: {info}\n{self.diagnostics()}",
        )
        return info
