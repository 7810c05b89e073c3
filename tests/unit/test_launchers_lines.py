"""Every launch line the docs print, dry-run: what it would start must fit its recipe.

The lines: each `launchers/...`, `sbatch ...` and `docker compose ...` command in a code block of
the documentation (every page of docs/, README.md, launchers/slurm/README.md), or in the header comments of a
recipe, a launch script or docker/compose.yaml, and each such inline `code` span there that names a recipe.
Each is run as written, from the repository root (RECIPE stands for recipes/quickstart.yaml, `[...]` parts are
left out, $PWD is the repository):

- `launchers/local.sh ...`: its --dry-run, on a machine where torch sees no GPU (so a line that
  needs N GPUs per node must say --nproc N);
- `sbatch [options] SCRIPT ...`: SCRIPT's --dry-run under the SLURM_* variables sbatch would set for
  the options of the line and the script's #SBATCH lines (the line's win);
- `docker compose -f FILE ...`: `docker compose config` where the docker client has compose, else
  FILE read here with compose's variable substitution.

Then what it would start must work: world size (nodes x ranks per node) fits the recipe's
parallel.sp (msllm.distributed.ParallelDims), each sequence-parallel group stays inside a node (as
docs/sequence-parallel.md asks), and what follows the recipe is what `msllm train` accepts, with overrides that load.
Nothing here needs a GPU, slurm daemons or a Docker engine; a missing client is replaced by what
this file can check, with a warning, never skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from msllm.cli import build_parser
from msllm.config import load_recipe
from msllm.distributed import ParallelDims

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDER_RECIPE = "recipes/quickstart.yaml"
DOCS = ("README.md", "docs/*.md", "launchers/slurm/README.md")  # globs, from the repository root
HEADERS = ("recipes/**/*.yaml", "launchers/**/*.sh", "launchers/**/*.sbatch", "docker/compose.yaml")
COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:launchers/\S+\.(?:sh|sbatch)|sbatch|docker compose)(?:\s|$)")
NAMES_A_RECIPE = re.compile(r"\bRECIPE\b(?!=)|\.yaml\b")


# ------------------------------------------------------------------------------------------------
# The lines
# ------------------------------------------------------------------------------------------------


def _code_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, inside a code block) of a markdown file, or of a file's header comments."""
    lines = path.read_text().splitlines()
    if path.suffix != ".md":  # the comment block at the top (after a shebang)
        header = []
        for n, line in enumerate(lines, 1):
            if n == 1 and line.startswith("#!"):
                continue
            if not line.startswith("#"):
                break
            header.append((n, line.lstrip("#").strip(), True))
        return header
    out, fenced = [], False
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        out.append((n, line.strip() if fenced or line.startswith("    ") else line, fenced or line.startswith("    ")))
    return out


def launch_lines() -> list[tuple[str, str]]:
    """(where, command) of every launch line, continuation lines joined, shell comments dropped."""
    files = [p for d in DOCS for p in sorted(REPO.glob(d))] + sorted(
        {p for pattern in HEADERS for p in REPO.glob(pattern)}
    )
    found = []
    for path in files:
        lines = iter(_code_lines(path))
        for n, text, code in lines:
            if not code:
                found += [
                    (f"{path.relative_to(REPO)}:{n}", span)
                    for span in re.findall(r"`([^`]+)`", text)
                    if COMMAND.match(span) and NAMES_A_RECIPE.search(span)
                ]
                continue
            command = re.sub(r"\s+#\s.*$", "", text).strip()
            while command.endswith("\\"):
                command = command[:-1].rstrip() + " " + re.sub(r"\s+#\s.*$", "", next(lines, (0, "", True))[1]).strip()
            if COMMAND.match(command):
                found.append((f"{path.relative_to(REPO)}:{n}", command))
            else:  # a comment line of a header, say: its `code` spans
                found += [
                    (f"{path.relative_to(REPO)}:{n}", span)
                    for span in re.findall(r"`([^`]+)`", text)
                    if COMMAND.match(span) and NAMES_A_RECIPE.search(span)
                ]
    return found


LINES = launch_lines()


def test_the_lines_are_found():
    """The extraction finds the lines it is meant to (so that the checks below check something)."""
    where = {w.split(":")[0] for w, _ in LINES}
    assert {
        "docs/launching.md",
        "docs/sequence-parallel.md",
        "launchers/slurm/README.md",
        "docker/compose.yaml",
        "launchers/local.sh",
        "recipes/long_context/bottom_up-256k-multinode.yaml",
    } <= where, where
    # Every launch path the launching page describes has its lines there.
    launching = [c for w, c in LINES if w.startswith("docs/launching.md:")]
    for start in (
        "launchers/local.sh --nnodes",
        "launchers/local.sh --nproc",
        "sbatch --nodes",
        "docker compose -f docker/compose.yaml",
    ):
        assert any(start in c for c in launching), (start, launching)
    assert any("launchers/deepspeed/train.sbatch" in c for c in launching), launching
    commands = [c for _, c in LINES]
    assert any(c.startswith("sbatch") and "deepspeed/train.sbatch" in c for c in commands)
    assert any("bottom_up-256k-multinode.yaml" in c and c.startswith("sbatch") for c in commands)
    assert any("docker compose" in c for c in commands)
    assert any(c.startswith("NPROC_PER_NODE=4 launchers/local.sh") for c in commands)
    assert len(LINES) >= 28, LINES  # as many as when the README held the docs (28)


# ------------------------------------------------------------------------------------------------
# What a line starts
# ------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    nodes: int
    ranks_per_node: int
    recipe: Path
    train_args: list[str]  # what follows the recipe on `msllm train`'s command line

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def _words(command: str) -> tuple[dict, list[str]]:
    """(VAR=value prefix, the words) of a doc's command line, placeholders filled in."""
    command = re.sub(r"\[[^\]]*\]", "", command)  # optional parts: [OPTIONS], [--set k=v ...]
    command = re.sub(r"(?<![\w$/])RECIPE\b(?!=)", PLACEHOLDER_RECIPE, command)
    words = shlex.split(command.replace("$PWD", str(REPO)))
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def _base_env(**extra: str) -> dict:
    """This environment without any launcher's or scheduler's variables."""
    drop = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NPROC_PER_NODE",
        "NNODES",
        "HEAD_ADDR",
        "NODE_RANK",
        "OMP_NUM_THREADS",
        "MSLLM_MODULE",
        "MSLLM_HOME",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def _after_train(words: list[str], what: str) -> tuple[Path, list[str]]:
    """The recipe and the rest of `... train RECIPE REST` in a printed command."""
    assert "train" in words, f"{what}: no `train` in {words}"
    i = words.index("train")
    return REPO / words[i + 1], words[i + 2 :]


def _option(words: list[str], name: str, default: str | None = None) -> str:
    for w in words:
        if w.startswith(f"--{name}="):
            return w.split("=", 1)[1]
    assert default is not None, f"no --{name}= in {words}"
    return default


def dry_run_local(env_prefix: dict, args: list[str]) -> Launch | None:
    env = _base_env(CUDA_VISIBLE_DEVICES="", **env_prefix)
    proc = subprocess.run(
        ["bash", "launchers/local.sh", "--dry-run", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, f"local.sh --dry-run failed ({proc.returncode}): {proc.stderr.strip()}"
    if "--help" in args or "-h" in args:
        assert "--nproc" in proc.stdout, proc.stdout
        return None
    printed = proc.stderr.strip().splitlines()[-1]
    words = shlex.split(printed.split(" ", 2)[2])  # after "local.sh: OMP_NUM_THREADS=N"
    recipe, rest = _after_train(words, "local.sh")
    return Launch(int(_option(words, "nnodes", "1")), int(_option(words, "nproc-per-node")), recipe, rest)


# sbatch's options the lines use: those that set what the scripts read, and those that do not.
SBATCH_SHORT = {
    "-N": "nodes",
    "-c": "cpus-per-task",
    "-J": "job-name",
    "-t": "time",
    "-p": "partition",
    "-A": "account",
    "-o": "output",
}
SBATCH_READ = ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task")
SBATCH_IGNORED = (
    "job-name",
    "time",
    "partition",
    "account",
    "output",
    "open-mode",
    "requeue",
    "signal",
    "wait",
    "mem",
    "exclusive",
    "export",
)
SBATCH_FLAGS = ("requeue", "wait", "exclusive")


def sbatch_options(words: list[str]) -> tuple[dict, list[str]]:
    """({option: value}, the words from the script on) of `sbatch OPTIONS SCRIPT ARGS`."""
    options, i = {}, 1
    while i < len(words) and words[i].startswith("-"):
        word = words[i]
        if word in SBATCH_SHORT:
            name, value, i = SBATCH_SHORT[word], words[i + 1], i + 2
        elif word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            i += 1
            if not equals and name not in SBATCH_FLAGS:
                value, i = words[i], i + 1
        else:
            pytest.fail(f"this test does not know sbatch option {word}: teach it what slurm sets for it")
        if name not in SBATCH_READ + SBATCH_IGNORED:
            pytest.fail(f"this test does not know sbatch option --{name}: teach it what slurm sets for it")
        options[name] = value
    return options, words[i:]


def sbatch_environment(options: dict) -> dict:
    """The SLURM_* variables the batch script sees for these options (slurm's documented output
    environment of sbatch), on nodes named node1..nodeN."""
    nodes, tasks = int(options.get("nodes", "1")), int(options.get("ntasks-per-node", "1"))
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": options.get("job-name", "msllm"),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": f"node[1-{nodes}]" if nodes > 1 else "node1",
        "SLURM_NTASKS_PER_NODE": str(tasks),
        "SLURM_NTASKS": str(nodes * tasks),
        "SLURM_TASKS_PER_NODE": f"{tasks}(x{nodes})" if nodes > 1 else str(tasks),
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    if "gpus-per-node" in options:
        env["SLURM_GPUS_PER_NODE"] = options["gpus-per-node"]
        env["SLURM_GPUS_ON_NODE"] = options["gpus-per-node"].rsplit(":", 1)[-1]  # "a100:8" -> 8 on the node
    if "cpus-per-task" in options:
        env["SLURM_CPUS_PER_TASK"] = options["cpus-per-task"]
    return env


def _scontrol_env(tmp: Path) -> dict:
    """What the scripts need to run `scontrol show hostnames` without a cluster: a minimal
    slurm.conf for the real client, or a stand-in that expands `prefix[a-b]` where slurm's client
    is not installed."""
    conf = tmp / "slurm.conf"
    conf.write_text("ClusterName=dryrun\nSlurmctldHost=localhost\n")
    env = {"SLURM_CONF": str(conf), "TMPDIR": str(tmp)}
    if shutil.which("scontrol"):
        return env
    warnings.warn(
        "scontrol is not installed: the sbatch lines are dry-run with a stand-in that expands node lists", stacklevel=2
    )
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    standin = bin_dir / "scontrol"
    standin.write_text(
        f"#!{sys.executable}\nimport re, sys\n"
        "m = re.fullmatch(r'(.*)\\[(\\d+)-(\\d+)\\]', sys.argv[3])\n"
        "print('\\n'.join(f'{m[1]}{i}' for i in range(int(m[2]), int(m[3]) + 1)) if m else sys.argv[3])\n"
    )
    standin.chmod(0o755)
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def dry_run_sbatch(words: list[str], tmp: Path) -> Launch:
    options, (script, *args) = sbatch_options(words)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", (REPO / script).read_text(), flags=re.M))
    env = _base_env(**sbatch_environment({**directives, **options}), **_scontrol_env(tmp))
    proc = subprocess.run(
        ["bash", script, "--dry-run", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )
    assert proc.returncode == 0, f"{script} --dry-run failed ({proc.returncode}): {proc.stderr.strip()}"
    printed = [line.split(": dry run: ", 1)[1] for line in proc.stdout.splitlines() if ": dry run: " in line]
    command = next(c for c in printed if c.split()[0] != "hostfile:")
    words = shlex.split(command)
    recipe, rest = _after_train(words, script)
    hostfile = next((c for c in printed if c.startswith("hostfile: ")), None)
    if hostfile is None:  # torchrun on every node
        return Launch(int(_option(words, "nnodes")), int(_option(words, "nproc-per-node")), recipe, rest)
    slots = [int(s) for s in re.findall(r"slots=(\d+)", hostfile)]  # the DeepSpeed runner: one rank per slot
    assert len(set(slots)) == 1, hostfile
    return Launch(len(slots), slots[0], recipe, rest)


# ------------------------------------------------------------------------------------------------
# docker compose
# ------------------------------------------------------------------------------------------------


def _interpolate(value, env: dict):
    """compose's ${VAR}, ${VAR:-default} and ${VAR-default} in every string of a loaded file."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, colon, default = m[1], m[2], m[3] or ""
        if name in env and (env[name] or not colon):
            return env[name]
        return default

    return re.sub(r"\$\{(\w+)(?:(:?)-([^}]*))?\}", one, value)


def compose_config(compose_file: Path, env_prefix: dict) -> dict:
    """{service: {command, environment, volumes [{source, target, read_only}]}} as compose resolves
    them: `docker compose config` where the client has compose, else the file read here."""
    env = {**_base_env(), **env_prefix}
    have_compose = (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0
    )
    if have_compose:
        proc = subprocess.run(
            ["docker", "compose", "-f", str(compose_file), "config", "--format", "json"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0, f"docker compose config: {proc.stderr.strip()}"
        services = json.loads(proc.stdout)["services"]
        return {
            name: {
                "command": s["command"],
                "environment": s.get("environment", {}),
                "volumes": [
                    {"source": Path(v["source"]), "target": v["target"], "read_only": bool(v.get("read_only"))}
                    for v in s.get("volumes", [])
                ],
            }
            for name, s in services.items()
        }
    warnings.warn(
        "docker compose is not installed: compose.yaml is read and its variables substituted here", stacklevel=2
    )
    raw = _interpolate(yaml.safe_load(compose_file.read_text()), env)
    out = {}
    for name, s in raw["services"].items():
        volumes = []
        for v in s.get("volumes", []):
            source, target, *mode = v.split(":")
            volumes.append(
                {"source": (compose_file.parent / source).resolve(), "target": target, "read_only": "ro" in mode}
            )
        out[name] = {"command": s["command"], "environment": s.get("environment", {}), "volumes": volumes}
    return out


def host_path(service: dict, container_path: str) -> tuple[dict, Path]:
    """(the bind mount holding container_path, the host path it shows there)."""
    for v in sorted(service["volumes"], key=lambda v: -len(v["target"])):
        target = v["target"].rstrip("/")
        if container_path == target or container_path.startswith(target + "/"):
            return v, v["source"] / os.path.relpath(container_path, target)
    pytest.fail(f"{container_path} is in no mount of the service ({service['volumes']})")


def dry_run_compose(env_prefix: dict, words: list[str]) -> Launch:
    compose_file = REPO / words[words.index("-f") + 1]
    services = compose_config(compose_file, env_prefix)
    worlds = {int(s["environment"]["WORLD_SIZE"]) for s in services.values()}
    assert worlds == {len(services)}, f"WORLD_SIZE {worlds} for {len(services)} containers"
    assert sorted(int(s["environment"]["RANK"]) for s in services.values()) == list(range(len(services)))
    commands = {json.dumps(s["command"]) for s in services.values()}
    assert len(commands) == 1, f"the ranks run different commands: {commands}"
    command = next(iter(services.values()))["command"]
    assert command[0] == "train", command
    _, recipe = host_path(next(iter(services.values())), command[1])
    per_node = {int(s["environment"].get("LOCAL_WORLD_SIZE", 1)) for s in services.values()}
    assert per_node == {1}, per_node  # each container is a node of one rank
    return Launch(len(services), 1, recipe, command[2:])


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------


def what_it_starts(command: str, tmp: Path) -> Launch | None:
    env, words = _words(command)
    if words[0].startswith("launchers/") and words[0].endswith(".sh"):
        return dry_run_local(env, words[1:])
    if words[0] == "sbatch":
        return dry_run_sbatch(words, tmp)
    if words[:2] == ["docker", "compose"]:
        return dry_run_compose(env, words)
    pytest.fail(f"no dry run for {command!r}")


@pytest.mark.parametrize("where,command", LINES, ids=[w for w, _ in LINES])
def test_launch_line_starts_a_world_its_recipe_fits(where, command, tmp_path):
    launch = what_it_starts(command, tmp_path)
    if launch is None:  # --help
        return
    assert launch.recipe.is_file(), f"{where}: no recipe {launch.recipe}"
    try:
        args = build_parser().parse_args(["train", str(launch.recipe), *launch.train_args])
    except SystemExit:
        pytest.fail(f"{where}: `msllm train` does not accept {launch.train_args} after the recipe")
    recipe = load_recipe(launch.recipe, args.overrides)
    sp = recipe.parallel.sp
    ParallelDims(world_size=launch.world_size, rank=0, sp=sp)  # a RecipeError if sp does not fit
    assert sp == 1 or launch.ranks_per_node % sp == 0, (
        f"{where}: sequence-parallel groups of {sp} ranks straddle nodes of {launch.ranks_per_node} ranks"
    )


def test_a_missing_gpus_per_node_is_caught(tmp_path):
    """Without --gpus-per-node the torchrun script starts one rank per node: world 4 against sp=8."""
    from msllm.errors import RecipeError

    launch = what_it_starts(
        "sbatch --nodes=4 launchers/slurm/train.sbatch recipes/long_context/bottom_up-256k-multinode.yaml", tmp_path
    )
    assert (launch.nodes, launch.ranks_per_node) == (4, 1)
    with pytest.raises(RecipeError, match="does not divide the world size 4"):
        ParallelDims(world_size=launch.world_size, rank=0, sp=load_recipe(launch.recipe).parallel.sp)
    launch = what_it_starts(
        "sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launchers/deepspeed/train.sbatch "
        "recipes/quickstart.yaml --set train.max_steps=3",
        tmp_path,
    )
    assert (launch.nodes, launch.ranks_per_node, launch.train_args) == (2, 8, ["--set", "train.max_steps=3"])


def test_compose_mounts_the_recipes_folder_so_that_bases_resolve(tmp_path):
    """A recipe with `base:` loads from a copy of what compose mounts, and nothing else."""
    name = "models/bottom_up-tiny.yaml"
    assert "base" in yaml.safe_load((REPO / "recipes" / name).read_text())
    services = compose_config(REPO / "docker/compose.yaml", {"RECIPE": name})
    service = services["rank0"]
    mount, recipe = host_path(service, service["command"][1])
    assert mount["read_only"] and recipe == REPO / "recipes" / name
    copy = tmp_path / mount["target"].lstrip("/")
    shutil.copytree(mount["source"], copy)  # the container's view: the mount alone
    inside = load_recipe(copy / name)
    assert inside.to_dict() == load_recipe(REPO / "recipes" / name).to_dict()
    assert inside.model.arch == "bottom_up"
    # The default is still the quickstart.
    default = compose_config(REPO / "docker/compose.yaml", {})["rank0"]
    assert host_path(default, default["command"][1])[1] == REPO / "recipes/quickstart.yaml"
