"""The ``fse_arith`` tasks: small arithmetic word problems shipped with vllm-fse for lm-eval.

No data set can be downloaded on an offline CI machine, so this task set is generated here
(seeded) and shipped as ``fse_arith.jsonl``. It exercises both of lm-eval's request types that
matter for FSE: ``fse_arith_mc`` scores four candidate answers by loglikelihood, and
``fse_arith_gen`` generates a gsm8k-style answer ending in ``#### N`` after 5 examples, scored by
exact match with gsm8k's filters. On a random tiny model the accuracies are near chance; what the
A/B checks there is that both arms give the same loglikelihoods and the same generations.

Regenerate with ``python -m vllm_fse.bench.tasks.fse_arith`` (the output is byte-identical).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).with_name("fse_arith.jsonl")
SPLITS = {"train": 20, "test": 200}
_OPS = (("plus", "+", lambda a, b: a + b), ("minus", "-", lambda a, b: a - b), ("times", "*", lambda a, b: a * b))


def build_items(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for split, count in SPLITS.items():
        for _ in range(count):
            word, sign, fn = rng.choice(_OPS)
            a, b = (rng.randint(2, 12), rng.randint(2, 12)) if sign == "*" else (rng.randint(10, 99), rng.randint(1, 60))
            result = fn(a, b)
            distractors = set()
            while len(distractors) < 3:
                wrong = result + rng.choice((-1, 1)) * rng.randint(1, 12)
                if wrong != result:
                    distractors.add(wrong)
            choices = [str(x) for x in sorted({result, *distractors})]
            items.append(
                {
                    "split": split,
                    "question": f"What is {a} {word} {b}?",
                    "answer": f"{a} {sign} {b} = {result}.\n#### {result}",
                    "choices": choices,
                    "label": choices.index(str(result)),
                }
            )
    return items


def render_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, sort_keys=True) + "\n" for item in items)


def load(**_kwargs):
    """lm-eval's ``custom_dataset``: the shipped JSONL as a ``DatasetDict`` of train and test."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list([r for r in rows if r["split"] == split]) for split in SPLITS}
    )


if __name__ == "__main__":
    DATA.write_text(render_jsonl(build_items()))
    print(f"wrote {DATA}")
