"""A private Docker engine for the integration tests, and the locally made base image.

dockerd (Debian's docker.io) runs with its data and exec roots in a temporary folder, its own unix
socket, no bridge and no iptables rules: it touches nothing of the machine's networking. No image
can be pulled here, so the base image is made locally (make_base_image.sh: debootstrap of Debian
bookworm minbase plus this machine's Python prefix) and cached as a tarball under
~/.cache/msllm-test (MSLLM_TEST_CACHE), keyed by the script, the Python version and the installed
packages, so that only the first run pays for debootstrap.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from integ_helpers import HERE, Procs, need, run, tail, wait_for

CACHE = Path(os.environ.get("MSLLM_TEST_CACHE", Path.home() / ".cache" / "msllm-test"))
IMAGE_PATH = "/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def docker_client() -> str | None:
    # Debian's client (docker.io) has BuildKit built in; newer clients need the buildx plugin.
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def base_image_key() -> str:
    """What the base image is made of: the script, the Python version and every installed
    distribution with its version (msllm's own install is left out of the image). Not the prefix's
    path, so a fresh clone's venv with the same packages reuses the tarball."""
    from importlib import metadata

    packages = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()}
        - {f"msllm=={metadata.version('msllm')}"}
    )
    h = hashlib.sha256()
    h.update((HERE / "make_base_image.sh").read_bytes())
    h.update(f"{sys.version}|{'|'.join(packages)}".encode())
    return h.hexdigest()[:16]


def base_image_tar() -> Path:
    """The cached base image tarball, made (about 2 minutes, network to the Debian mirror) if missing."""
    key = base_image_key()
    tar = CACHE / f"base-bookworm-{key}.tar"
    if tar.exists():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob("base-bookworm-*.tar"):
        old.unlink()  # made for another Python prefix or script version
    proc = run(["bash", str(HERE / "make_base_image.sh"), str(tar)], check=False, timeout=1200)
    need(proc.returncode == 0 and tar.exists(), f"making the base image failed:\n{proc.stdout[-4000:]}")
    return tar


class DockerEngine:
    def __init__(self) -> None:
        # Short path: the exec root holds unix sockets (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="msllm-dockerd-", dir="/tmp"))
        self.sock = self.root / "docker.sock"
        self.procs = Procs()
        self.client = docker_client()
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_BUILDKIT="1")
        self.env.pop("DOCKER_CONTEXT", None)

    def start(self) -> DockerEngine:
        need(shutil.which("dockerd") is not None, "dockerd is missing: run .ci/install-system.sh (docker.io)")
        need(self.client is not None, "the docker client is missing: run .ci/install-system.sh (docker.io)")
        cmd = [
            "dockerd",
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'x'}",
            f"--pidfile={self.root / 'dockerd.pid'}",
            f"--host=unix://{self.sock}",
            "--bridge=none",
            "--iptables=false",
        ]
        proc = self.procs.start("dockerd", cmd, self.root / "dockerd.log")

        def up() -> bool:
            if proc.poll() is not None:
                return True
            return self.docker("version", check=False, timeout=10).returncode == 0

        wait_for(up, 60, "dockerd to answer", diagnostics=lambda: tail(self.root / "dockerd.log"))
        need(proc.poll() is None, f"dockerd exited:\n{tail(self.root / 'dockerd.log')}")
        return self

    def docker(self, *args, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
        return run([self.client, *args], check=check, timeout=timeout, env=self.env, **kw)

    def stop(self) -> None:
        ps = self.docker("ps", "-q", check=False, timeout=30).stdout.split()
        if ps:
            self.docker("rm", "-f", *ps, check=False, timeout=60)
        self.procs.stop()
        # The data root holds a copy of the base image (several GB): do not leave it behind.
        for _ in range(3):
            try:
                shutil.rmtree(self.root)
                break
            except OSError:
                time.sleep(2)
