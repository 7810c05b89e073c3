"""launchers/local.sh multi-node mode across two network namespaces joined by a veth pair.

Two "hosts": network namespaces with addresses 198.51.100.1 and .2 (TEST-NET-2, which exists only
inside them), each process in its own UTS and mount namespace with its own hostname (hosta,
hostb) and a bind-mounted hosts file naming both. The launcher runs on each with --nnodes 2 and
--head hosta:PORT (torchrun's c10d rendezvous, hosted by hosta) and, in the second test, with the
static rendezvous (--node-rank). Each also gets its own /dev/shm, as separate machines have.
"""

from __future__ import annotations

import os

import pytest
from integ_helpers import REPO, Procs, base_env, need, need_root_and_tools, run, tail

LOCAL_SH = REPO / "launchers" / "local.sh"
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ADDRS = {"hosta": "198.51.100.1", "hostb": "198.51.100.2"}


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    need_root_and_tools("ip", "unshare")
    tag = f"{os.getpid() % 100000}"
    ns = {"hosta": f"msllm-a-{tag}", "hostb": f"msllm-b-{tag}"}
    veth = {"hosta": f"msva{tag}", "hostb": f"msvb{tag}"}
    root = tmp_path_factory.mktemp("netns")
    hosts = root / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in ADDRS.items()))
    created = []
    try:
        for h in ns.values():
            proc = run(["ip", "netns", "add", h], check=False)
            need(proc.returncode == 0, f"`ip netns add {h}` failed (needs root and netns support):\n{proc.stdout}")
            created.append(h)
        steps = [
            ["ip", "link", "add", veth["hosta"], "type", "veth", "peer", "name", veth["hostb"]],
        ]
        for host in ("hosta", "hostb"):
            steps += [
                ["ip", "link", "set", veth[host], "netns", ns[host]],
                ["ip", "-n", ns[host], "addr", "add", f"{ADDRS[host]}/24", "dev", veth[host]],
                ["ip", "-n", ns[host], "link", "set", veth[host], "up"],
                ["ip", "-n", ns[host], "link", "set", "lo", "up"],
            ]
        for cmd in steps:
            proc = run(cmd, check=False)
            need(proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}")
        yield {"ns": ns, "veth": veth, "hosts": hosts}
    finally:
        for h in created:
            run(["ip", "netns", "del", h], check=False)


def _launch(two_hosts, trainer, shards_dir, out, tmp_path, static: bool):
    procs = Procs()
    env = base_env(trainer)
    port = "29555"
    results = {}
    try:
        for rank, host in enumerate(("hosta", "hostb")):
            extra = ["--node-rank", str(rank)] if static else []
            launcher = [
                str(LOCAL_SH),
                "--nnodes",
                "2",
                "--nproc",
                "1",
                "--head",
                f"hosta:{port}",
                "--rdzv-id",
                "netns-test",
                *extra,
                *trainer.recipe_args(out, shards_dir),
            ]
            # Its own /dev/shm too, as a real host has: mosaicml-streaming names its shared memory
            # by the local rank, and two "hosts" sharing /dev/shm would collide.
            script = (
                f"hostname {host} && mount --bind {two_hosts['hosts']} /etc/hosts && "
                f'mount -t tmpfs -o size=512m tmpfs /dev/shm && exec "$@"'
            )
            cmd = [
                "ip",
                "netns",
                "exec",
                two_hosts["ns"][host],
                "unshare",
                "--uts",
                "--mount",
                "sh",
                "-c",
                script,
                "sh",
                *launcher,
            ]
            results[host] = (procs.start(host, cmd, tmp_path / f"{host}.log", env=env), tmp_path / f"{host}.log")
        for host, (proc, _log) in results.items():
            try:
                proc.wait(timeout=420)
            except Exception:
                pytest.fail(f"{host} did not finish in time\n{tail(results['hosta'][1])}\n{tail(results['hostb'][1])}")
        return {h: (p.returncode, log.read_text()) for h, (p, log) in results.items()}
    finally:
        procs.stop()


@pytest.mark.parametrize("static", [False, True], ids=["c10d", "static"])
def test_local_launcher_across_two_namespaces(two_hosts, trainer, shards_dir, tmp_path, static):
    out = tmp_path / "run"
    res = _launch(two_hosts, trainer, shards_dir, out, tmp_path, static)
    for host, (rc, text) in res.items():
        assert rc == 0, f"{host} exited with {rc}:\n{text[-4000:]}"
    both = res["hosta"][1] + res["hostb"][1]
    assert "--nnodes=2" in both
    if static:
        assert "--node-rank=0" in res["hosta"][1] and "--master-addr=hosta" in res["hosta"][1], res["hosta"][1][:2000]
    else:
        assert "--rdzv-endpoint=hosta:29555" in both
    assert trainer.start_steps(both) == [0], both[-4000:]
    hosts = trainer.hosts(both)
    if hosts is not None:
        assert hosts == {"hosta", "hostb"}, both[-4000:]
    assert trainer.world_size(both) == 2, both[-4000:]
    assert trainer.checkpoint_steps(out)[-1] == 6, both[-4000:]
