"""Score trained models on held-out ShapesVQA sets: per-type accuracy, what they answer, and what
switching the injection off changes — the table behind the AGF-read experiment in the model cards.

Per (model, set, question type): accuracy with a 95% Wilson interval, the share of the commonest
answer and the number of distinct answers (a type answered by one constant word is a failure
whatever its accuracy), and with every injection switched off (`tanh(alpha) = 0` in every AGF
layer: the model is then its base) the accuracy and the share of answers that flip.

    python benchmarks/read_variants.py --models a=/work/runs/s3-a b=... --data /tmp/h1 /tmp/h2 --out table.csv
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cliviz.data.samples import read_jsonl  # noqa: E402
from cliviz.inference import answer  # noqa: E402
from cliviz.inputs import load_image  # noqa: E402
from cliviz.model.loading import load_model  # noqa: E402


@contextmanager
def injection_off(model):
    """Every AGF layer's `alpha` at 0 for the duration (tanh(0) = 0: nothing is injected)."""
    saved = [layer.injection.alpha.detach().clone() for layer in model.agf]
    with torch.no_grad():
        for layer in model.agf:
            layer.injection.alpha.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, alpha in zip(model.agf, saved):
                layer.injection.alpha.copy_(alpha)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def _form_constant_share(records, answers: list[str], idx: list[int], vocabulary: set[str]) -> float:
    """Share of answers equal to the commonest answer of their question *form* — the answer words the
    question offers ("left or the right", "top or the bottom"): 1.0 when each form gets one constant
    answer, as a model that cannot see the difference answers."""
    forms: dict[tuple[str, ...], list[str]] = {}
    for i in idx:
        form = tuple(sorted(w for w in records[i].question.split() if w in vocabulary))
        forms.setdefault(form, []).append(answers[i])
    return sum(Counter(a).most_common(1)[0][1] for a in forms.values()) / len(idx)


def answers_of(model, tok, records, batch: int = 64) -> list[str]:
    out: list[str] = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        images = [load_image(r.image_path) for r in chunk]
        out += [a.text for a in answer(model, tok, images, [r.question for r in chunk], max_new_tokens=2)]
    return out


def score(name: str, folder: str, data_dirs: list[Path]) -> list[dict]:
    model, tok = load_model(folder, device="cpu", dtype="float32")
    rows = []
    for data_dir in data_dirs:
        records = [r for r in read_jsonl(data_dir / "samples.jsonl").records if r.answer is not None]
        on = answers_of(model, tok, records)
        with injection_off(model):
            off = answers_of(model, tok, records) if len(model.agf) else on
        by_type: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            by_type.setdefault(r.qtype, []).append(i)
        by_type["overall"] = list(range(len(records)))
        answer_words = {t: {records[i].answer for i in idx} for t, idx in by_type.items()}
        for qtype, idx in by_type.items():
            n = len(idx)
            correct = sum(on[i] == records[i].answer for i in idx)
            common, common_n = Counter(on[i] for i in idx).most_common(1)[0]
            lo, hi = wilson(correct, n)
            rows.append(
                {
                    "model": name,
                    "set": data_dir.name,
                    "type": qtype,
                    "n": n,
                    "accuracy": correct / n,
                    "ci_low": lo,
                    "ci_high": hi,
                    "top_answer": common,
                    "top_answer_share": common_n / n,
                    "distinct_answers": len({on[i] for i in idx}),
                    "form_constant_share": _form_constant_share(records, on, idx, answer_words[qtype]),
                    "accuracy_off": sum(off[i] == records[i].answer for i in idx) / n,
                    "flipped_off": sum(off[i] != on[i] for i in idx) / n,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="name=folder pairs")
    parser.add_argument("--data", nargs="+", required=True, type=Path, help="cliviz data folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for spec in args.models:
        name, folder = spec.split("=", 1)
        rows += score(name, folder, args.data)
        pd.DataFrame(rows).to_csv(args.out, index=False)
    table = pd.DataFrame(rows)
    summary = table.groupby(["model", "type"])[["accuracy", "form_constant_share", "flipped_off"]].mean().unstack(0)
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
