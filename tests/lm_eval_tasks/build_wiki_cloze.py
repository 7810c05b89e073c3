"""Build msllm_wiki_cloze.jsonl, the local lm-evaluation-harness task of tests/unit/test_lm_eval.py: a
4-way cloze over sentences of the validation split of msllm's built-in corpus (the Wikipedia
sample shipped in gensim's test data, CC BY-SA). Each record is the start of a sentence
(`context`), four 3-word continuations (`choices`: the sentence's own next three words and three
spans of other sentences) and the index of the true one (`answer`).

    python tests/lm_eval_tasks/build_wiki_cloze.py     # rewrites msllm_wiki_cloze.jsonl (needs gensim)

tests/unit/test_lm_eval.py checks that the shipped file is what this builds.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
RECORDS = 24
SPAN = 3  # words per choice


def sentences() -> list[str]:
    """Plain sentences of 10 to 24 words (letters, digits and light punctuation) of the validation documents."""
    from msllm.config import DataConfig
    from msllm.data.prepare.split import choose_split_rule
    from msllm.data.sources import iter_documents

    data = DataConfig(source="wikipedia-sample")
    rule = choose_split_rule(data)
    found = []
    for document in iter_documents(data):
        if rule.split_of(document) != "validation":
            continue
        for paragraph in document.split("\n"):
            for sentence in re.split(r"(?<=\.) ", paragraph):
                words = sentence.split()
                if 10 <= len(words) <= 24 and re.fullmatch(r"[A-Za-z0-9 ,.'()-]+", sentence):
                    found.append(sentence)
    return found


def build(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    chosen = rng.sample(sentences(), RECORDS)
    records = []
    for i, sentence in enumerate(chosen):
        words = sentence.split()
        cut = rng.randint(5, len(words) - SPAN)
        others = [s.split() for j, s in enumerate(chosen) if j != i]
        distractors = []
        for other in rng.sample(others, SPAN):
            start = rng.randint(1, len(other) - SPAN)
            distractors.append(" ".join(other[start : start + SPAN]))
        choices = [" ".join(words[cut : cut + SPAN])] + distractors
        order = list(range(len(choices)))
        rng.shuffle(order)
        records.append(
            {"context": " ".join(words[:cut]), "choices": [choices[k] for k in order], "answer": order.index(0)}
        )
    return records


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


if __name__ == "__main__":
    (HERE / "msllm_wiki_cloze.jsonl").write_text(jsonl(build()))
