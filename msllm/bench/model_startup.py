"""`msllm bench model-startup`: the memory and time that building the model adds to a rank, from
just before the model is built to its first training step, sharded (ZeRO-3 over several CPU ranks)
against whole (one rank, ZeRO 0).

Each configuration runs `msllm train RECIPE` under torchrun (gloo, fp32, CPU) as
`python -m msllm.bench.model_startup OUT train RECIPE --set ...`: this module's `main` wraps, in
that process only, `Trainer.make_engine` and `Trainer.train_step` (no code in the trainer), and
each rank writes OUT/rank<r>.json when its first step starts and exits there (no step, no
evaluation, no checkpoint: a ZeRO-3 step of the 300M model takes 4+ GiB per rank on top, more
than 4 ranks can share on a 24 GiB machine beside other work):

    base_rss          resident memory just before the model is built (after malloc_trim(0));
                      VmHWM is reset there (writing "5" to /proc/self/clear_refs)
    built_peak        VmHWM once the model is built (msllm.train.engine.build_model_for_training)
    engine_peak       VmHWM once DeepSpeed has wrapped it (deepspeed.initialize: the optimizer's
                      partitions and buffers)
    startup_peak      VmHWM when the first step starts: the start-up's high-water mark
    step_peak         with MSLLM_BENCH_RUN_STEP=1 only (the test's): VmHWM after the first step
    startup_rss, startup_rss_trimmed   VmRSS when the first step starts, before and after
                      malloc_trim(0) (what glibc keeps of memory already freed)
    build_s, engine_s, to_first_step_s   seconds: building the model, the engine (model +
                      DeepSpeed), from the process's start (after Python's) to the first step
    first_step_s      with MSLLM_BENCH_RUN_STEP=1 only: the first step

MSLLM_BENCH_ZERO_CONFIG='{"sub_group_size": 1e7}' (a JSON object) adds entries to DeepSpeed's
zero_optimization in the measured processes, for experiments.

"Start-up memory" is startup_peak - base_rss. The baseline is the same recipe on one rank at ZeRO 0
with the same (current) code: the whole fp32 model is materialised on that rank (on one rank ZeRO
0 holds every parameter, as every rank did before the sharded construction), and the target of
issue 30 is that a ZeRO-3 rank of 4 adds at most 0.35x of that.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from msllm.bench import shipped_recipe
from msllm.distributed.env import free_port

RECIPE_NAME = "bench/model-startup-300m.yaml"  # under the recipes folder (--recipes)
RECIPE = f"recipes/{RECIPE_NAME}"  # the same, from the repository's root
# (ranks, ZeRO stage, environment): the whole-model baseline first, then the same two with glibc's
# mmap threshold fixed at its initial 128 KiB, so that every freed block over it goes back to the
# system at once (by default glibc raises the threshold up to 32 MiB as large blocks are freed, and
# later blocks of that size stay in the heap when freed: the construction's whole values do)
MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
CONFIGS = ((1, 0, {}), (4, 3, {}), (1, 0, MMAP), (4, 3, MMAP))
TARGET = 0.35  # issue 30: ZeRO-3 start-up memory per rank of 4 at most 0.35x the whole-model build

_NOUNS = "cat dog bird river mountain city king queen child teacher ship road garden house forest storm".split()
_VERBS = "sees finds builds crosses follows paints carries remembers watches opens".split()
_ADJS = "old small bright quiet green distant heavy gentle ancient red".split()


def corpus_text(documents: int = 300, seed: int = 0) -> str:
    """Short documents of simple sentences separated by blank lines (about 67 KB, as the tests')."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        docs.append(
            " ".join(
                f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
                f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}."
                for _ in range(rng.randint(3, 8))
            )
        )
    return "\n\n".join(docs) + "\n"


# --- in each rank's process ------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def install_hooks(out_dir: Path, started: float, run_step: bool = False) -> None:
    """Wrap the trainer's engine construction and its first step to record this rank's memory
    and times into out_dir/rank<RANK>.json, then end the process when the first step starts (or,
    with `run_step`, once it has run: its time and high-water mark are recorded too)."""
    import msllm.train.engine as engine_module  # noqa: PLC0415 (timed: a rank's start-up counts from main())
    import msllm.train.trainer as trainer_module  # noqa: PLC0415 (timed: a rank's start-up counts from main())

    Trainer = trainer_module.Trainer

    record: dict = {"rank": int(os.environ.get("RANK", "0")), "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    path = out_dir / f"rank{record['rank']}.json"

    def save() -> None:  # after each stage: a rank that dies (out of memory) leaves how far it got
        path.write_text(json.dumps(record))

    make_engine, train_step = Trainer.make_engine, Trainer.train_step
    build_model = engine_module.build_model_for_training

    def measured_build_model(recipe, device):
        start = time.perf_counter()
        model = build_model(recipe, device)
        record.setdefault("build_s", time.perf_counter() - start)
        record.setdefault("built_peak", _status_bytes("VmHWM"))
        save()
        return model

    def measured_make_engine(self):
        if "base_rss" in record:  # a rebuild after a failed resume: not start-up
            return make_engine(self)
        record["zero_stage"] = self.recipe.parallel.zero_stage
        _malloc_trim()
        record["peak_reset"] = _reset_peak()
        record["base_rss"] = _status_bytes("VmRSS")
        save()
        start = time.perf_counter()
        engine = make_engine(self)
        record["engine_s"] = time.perf_counter() - start
        record["engine_peak"] = _status_bytes("VmHWM")
        record["parameters"] = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        save()
        return engine

    def measured_train_step(self, batches, plan):
        record["startup_peak"] = _status_bytes("VmHWM")
        record["to_first_step_s"] = time.time() - started
        record["startup_rss"] = _status_bytes("VmRSS")
        _malloc_trim()
        record["startup_rss_trimmed"] = _status_bytes("VmRSS")
        if run_step:
            save()
            start = time.perf_counter()
            train_step(self, batches, plan)
            record["first_step_s"] = time.perf_counter() - start
            record["step_peak"] = _status_bytes("VmHWM")
        save()
        import torch.distributed as dist  # noqa: PLC0415 (timed: a rank's start-up counts from main())

        if dist.is_initialized():
            dist.barrier()
        sys.stdout.flush()
        os._exit(0)  # start-up is what is measured: no evaluation, no checkpoint

    trainer_module.build_model_for_training = measured_build_model  # the name make_engine calls
    extra = json.loads(os.environ.get("MSLLM_BENCH_ZERO_CONFIG") or "{}")
    if extra:  # an experiment: entries added to DeepSpeed's zero_optimization (e.g. sub_group_size)
        deepspeed_config = engine_module.deepspeed_config

        def patched_config(recipe) -> dict:
            cfg = deepspeed_config(recipe)
            cfg["zero_optimization"].update(extra)
            return cfg

        engine_module.deepspeed_config = patched_config
        record["zero_config"] = extra
    Trainer.make_engine, Trainer.train_step = measured_make_engine, measured_train_step


def main(argv: list[str]) -> int:
    started = time.time()
    out_dir = Path(argv[0])
    install_hooks(out_dir, started, run_step=os.environ.get("MSLLM_BENCH_RUN_STEP") == "1")
    from msllm.cli import main as msllm_main  # noqa: PLC0415 (timed: a rank's start-up counts from main())

    return msllm_main(argv[1:])


# --- the benchmark ---------------------------------------------------------------------------------


def measure(
    recipe: str,
    ranks: int,
    zero_stage: int,
    work: Path,
    overrides: tuple[str, ...] = (),
    timeout: float = 1800,
    run_step: bool = False,
    extra_env: dict | None = None,
) -> dict:
    """One configuration: `msllm train` of `recipe` on `ranks` gloo ranks at ZeRO `zero_stage` up
    to its first step (through it with `run_step`); its ranks' records and the command's wall time."""
    corpus = work / "corpus.txt"
    if not corpus.exists():
        work.mkdir(parents=True, exist_ok=True)
        corpus.write_text(corpus_text(), encoding="utf-8")
    name = f"r{ranks}-z{zero_stage}" + "".join(f"-{k}{v}" for k, v in (extra_env or {}).items())
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    settings = [
        f"data.paths=[{corpus}]",
        f"data.shards_dir={work / 'shards'}",
        f"run.output_dir={work / name / 'run'}",
        f"parallel.zero_stage={zero_stage}",
        "train.max_steps=1",
        "checkpoint.every=0",
        "eval.every=0",
        "log.tensorboard=false",
        *overrides,
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "msllm.bench.model_startup",
        str(out),
        "train",
        recipe,
        *[a for s in settings for a in ("--set", s)],
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.update(
        OMP_NUM_THREADS=str(max(1, cores // ranks)),
        PYTHONUNBUFFERED="1",
        MSLLM_BENCH_RUN_STEP=str(int(run_step)),
        **(extra_env or {}),
    )
    if not (work / "shards" / "manifest.json").is_file():  # once, so that no rank's start-up includes it
        prep = subprocess.run(
            [sys.executable, "-m", "msllm.cli", "prep", recipe, *command[command.index("train") + 2 :]],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if prep.returncode != 0:
            raise RuntimeError(f"msllm prep failed: {prep.stderr.strip()[-2000:]}")
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    records = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    if proc.returncode != 0 or len(records) != ranks or not all("startup_peak" in r for r in records):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"{name}: exit {proc.returncode}, records {records}:\n{tail}")
    return {"ranks": ranks, "zero_stage": zero_stage, "env": dict(extra_env or {}), "wall_s": wall, "records": records}


def startup_bytes(record: dict) -> int:
    return record["startup_peak"] - record["base_rss"]


def to_markdown(runs: list[dict], recipe: str) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    baseline = runs[0]
    base = max(startup_bytes(r) for r in baseline["records"])
    n = baseline["records"][0]["parameters"]
    stepped = all("step_peak" in r for run in runs for r in run["records"])
    env = " ".join(f"{k}={v}" for k, v in baseline.get("env", {}).items()) or "glibc's default malloc settings"
    lines = [
        f"**{env}.** "
        f"{recipe}: {n / 1e6:.1f}M parameters (fp32 weights {mib(4 * n)} MiB), seq_len 64, micro-batch 1, one step, "
        "gloo on the CPU, OMP_NUM_THREADS = cores / ranks. Per rank, from just before the model is built "
        "(`Trainer.make_engine`, resident memory after malloc_trim(0), VmHWM reset there) to the first step: "
        "start-up memory = VmHWM when the first step starts - resident memory before the build. "
        f"Baseline: the same recipe on 1 rank at ZeRO 0 (the whole fp32 model on that rank, built on the meta "
        f"device and materialised once, as every rank held it before the sharded construction).",
        "",
        "| ranks | ZeRO | rank | before MiB | model built MiB | engine MiB | start-up MiB | vs baseline | "
        "resident at step 1 MiB (trimmed) | build s | engine s | to first step s |"
        + (" with step 1 MiB | step 1 s |" if stepped else ""),
        "|" + "---|" * (14 if stepped else 12),
    ]
    for run in runs:
        for r in run["records"]:
            b = r["base_rss"]
            lines.append(
                f"| {run['ranks']} | {run['zero_stage']} | {r['rank']} | {mib(b)} | +{mib(r['built_peak'] - b)} | "
                f"+{mib(r['engine_peak'] - b)} | +{mib(startup_bytes(r))} | {startup_bytes(r) / base:.2f}x | "
                f"+{mib(r['startup_rss'] - b)} (+{mib(r['startup_rss_trimmed'] - b)}) | "
                f"{r['build_s']:.1f} | {r['engine_s']:.1f} | {r['to_first_step_s']:.1f} |"
                + (f" +{mib(r['step_peak'] - b)} | {r['first_step_s']:.1f} |" if stepped else "")
            )
    lines += [
        "",
        "Columns after `before` are increases over it: `model built`, `engine` and `start-up` are the "
        "high-water marks once the model is built, once DeepSpeed has wrapped it and when the first step starts; "
        "`resident at step 1` is VmRSS then (after malloc_trim(0) in brackets)"
        + (
            "; `with step 1` the high-water mark after the first step (gradients, AdamW's moments, ZeRO's buckets)."
            if stepped
            else "; the processes end there (the step is not run)."
        ),
        "",
    ]
    for run in runs[1:]:
        worst = max(startup_bytes(r) for r in run["records"])
        time_ratio = statistics.median(r["to_first_step_s"] for r in run["records"]) / statistics.median(
            r["to_first_step_s"] for r in baseline["records"]
        )
        verdict = "meets" if worst / base <= TARGET else "misses"
        lines.append(
            f"**{run['ranks']} ranks, ZeRO {run['zero_stage']}: the largest rank's start-up memory is "
            f"{mib(worst)} MiB = "
            f"{worst / base:.2f}x the whole-model build on one rank ({mib(base)} MiB): {verdict} the target of "
            f"{TARGET}x (issue 30).** Time to the first step (median rank): {time_ratio:.2f}x the baseline's; "
            f"whole command {run['wall_s']:.0f} s against {baseline['wall_s']:.0f} s."
        )
    return "\n".join(lines)


def bench_model_startup(args) -> str:
    recipe = getattr(args, "recipe", None) or shipped_recipe(RECIPE_NAME)
    overrides = tuple(getattr(args, "set", None) or ())
    with tempfile.TemporaryDirectory(prefix="msllm-model-startup-") as tmp:
        runs = [measure(recipe, ranks, zero, Path(tmp), overrides, extra_env=env) for ranks, zero, env in CONFIGS]
    return "\n\n".join(to_markdown([run for run in runs if run["env"] == env], recipe) for env in ({}, MMAP))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
