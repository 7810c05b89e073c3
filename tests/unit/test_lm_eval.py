"""lm-evaluation-harness on msllm exports: `lm_eval --model hf --model_args
pretrained=EXPORT/hf,trust_remote_code=True` runs offline, in a process where msllm cannot be
imported, on a local cloze task built from the built-in corpus (tests/lm_eval_tasks/), for each
architecture, and the log-likelihood it logs for every (context, continuation) equals msllm's
own model's (msllm.use.evaluate.continuation_loglikelihoods)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fixtures.hf import ARCHS, SEQ_LEN, export_random_model, run_isolated, wiki_tokenizer

TASKS = Path(__file__).parent.parent / "lm_eval_tasks"
TASK = "msllm_wiki_cloze"

# One isolated process runs `lm_eval` once per export (argv: a JSON list of argument lists), as
# six separate `lm_eval` commands would, without six start-ups of torch, transformers and lm_eval.
# Each run's failure is written into its output folder, so that only its own test fails.
LM_EVAL = """
import json, sys, traceback
from pathlib import Path
from lm_eval.__main__ import cli_evaluate
for arguments in json.loads(sys.argv[1]):
    sys.argv = ["lm_eval", *arguments]
    output = Path(arguments[arguments.index("--output_path") + 1])
    try:
        cli_evaluate()
    except BaseException as error:
        if isinstance(error, SystemExit) and error.code in (0, None):
            continue  # the command's own successful exit
        output.mkdir(parents=True, exist_ok=True)
        (output / "failed.txt").write_text(traceback.format_exc())
"""


def test_the_shipped_task_is_what_its_builder_builds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_wiki_cloze", TASKS / "build_wiki_cloze.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    records = builder.build()
    assert (TASKS / f"{TASK}.jsonl").read_text() == builder.jsonl(records)
    assert len(records) == 24 and all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in records)
    assert len({r["answer"] for r in records}) > 1  # the true continuation is not always in the same place


@pytest.fixture(scope="module")
def tokenizer(made_once):
    return wiki_tokenizer(made_once)[0]


@pytest.fixture(scope="module")
def lm_eval_runs(tokenizer, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """For each architecture: (the exported random model, the folder of its lm_eval results)."""
    base = tmp_path_factory.mktemp("lm_eval")
    work = base / "task"
    shutil.copytree(TASKS, work)  # the task's data_files are relative to the working directory
    runs, commands = {}, []
    for name in sorted(ARCHS):
        model = export_random_model(name, tokenizer, base / name / "export")
        runs[name] = (model, base / name / "results")
        commands.append(
            [
                "--model",
                "hf",
                "--model_args",
                f"pretrained={base / name / 'export' / 'hf'},trust_remote_code=True",
                "--tasks",
                TASK,
                "--include_path",
                str(work),
                "--device",
                "cpu",
                "--batch_size",
                "4",  # batches are right-padded
                "--log_samples",
                "--output_path",
                str(runs[name][1]),
            ]
        )
    proc = run_isolated(LM_EVAL, json.dumps(commands), cwd=work, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_lm_eval_logs_msllms_loglikelihoods(name, tokenizer, lm_eval_runs):
    from msllm.data.tokenizer import load_sentencepiece
    from msllm.use.evaluate import continuation_loglikelihoods

    model, results = lm_eval_runs[name]
    assert not (results / "failed.txt").exists(), (results / "failed.txt").read_text()[-3000:]
    (samples_file,) = results.rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 24
    requests, logged = [], []
    for sample in samples:
        arguments = [sample["arguments"][f"gen_args_{k}"] for k in range(len(sample["arguments"]))]
        requests += [(a["arg_0"], a["arg_1"]) for a in arguments]
        logged += [(float(ll), greedy == "True") for ((ll, greedy),) in sample["resps"]]
    assert len(requests) == 96 and {c for _, c in requests[:4]} == {" " + c for c in samples[0]["doc"]["choices"]}
    sp = load_sentencepiece(tokenizer)
    assert max(len(sp.encode(c + x)) for c, x in requests) <= SEQ_LEN  # lm-eval truncates nothing
    ours = continuation_loglikelihoods(model, sp, requests)
    assert max(abs(a - b) for (a, _), (b, _) in zip(logged, ours)) <= 1e-4
    assert [g for _, g in logged] == [g for _, g in ours]
    accuracy = sum(
        max(range(4), key=lambda k: ours[4 * i + k][0]) == sample["doc"]["answer"] for i, sample in enumerate(samples)
    ) / len(samples)
    (results_file,) = results.rglob("results_*.json")
    assert json.loads(results_file.read_text())["results"][TASK]["acc,none"] == pytest.approx(accuracy)
