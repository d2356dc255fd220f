"""POPE-style object probing (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models"):
yes/no questions ``is there a {object} in the image ?`` about every object an image holds (answer yes) and as many
it does not hold (answer no), the absent ones drawn three ways:

* ``random``: uniformly among the objects the image does not hold;
* ``popular``: the objects most frequent over the whole set (that the image does not hold);
* ``adversarial``: the objects that co-occur most often with the image's own objects over the set.

An answer is read as LLaVA's ``eval_pope`` reads it: the first sentence, ``no`` or ``not`` among its words → no,
else yes. The scores, with yes as the positive class: accuracy, precision, recall, F1 and the share of yes answers.

Pure functions, torch-free: :func:`build_questions`, :func:`parse_answer`, :func:`pope_metrics`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Sequence

SETTINGS = ("random", "popular", "adversarial")


def object_stats(objects_per_image: Sequence[Sequence[str]]) -> tuple[Counter, dict[str, Counter]]:
    """How many images hold each object, and for each object how many images hold it together with each other."""
    freq: Counter = Counter()
    co: dict[str, Counter] = {}
    for objs in objects_per_image:
        uniq = sorted(set(objs))
        freq.update(uniq)
        for a in uniq:
            row = co.setdefault(a, Counter())
            row.update(b for b in uniq if b != a)
    return freq, co


def negatives(present: Sequence[str], k: int, setting: str, vocabulary: Sequence[str], freq: Counter,
              co: dict[str, Counter], rng: random.Random) -> list[str]:
    """``k`` objects (fewer when fewer exist) of ``vocabulary`` that are not in ``present``, drawn as ``setting``
    says; ties go to the object named first in ``vocabulary``."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown POPE setting {setting!r}; expected one of {SETTINGS}")
    have = set(present)
    absent = [o for o in vocabulary if o not in have]
    k = min(k, len(absent))
    if setting == "random":
        return rng.sample(absent, k)
    order = {o: i for i, o in enumerate(vocabulary)}
    if setting == "popular":
        score = {o: freq[o] for o in absent}
    else:
        score = {o: sum(co.get(p, Counter())[o] for p in have) for o in absent}
    return sorted(absent, key=lambda o: (-score[o], order[o]))[:k]


def build_questions(objects_per_image: Sequence[Sequence[str]], setting: str, seed: int = 0,
                    vocabulary: Sequence[str] | None = None) -> list[tuple[int, str, bool]]:
    """``(image index, object, is it there)`` for every image of a set: each object it holds (in its order, once),
    then as many it does not hold, drawn as ``setting`` says (module docstring). ``vocabulary``: the objects to draw
    from (default: every object the set holds, in order of first appearance); the statistics of ``popular`` and
    ``adversarial`` are over the whole set."""
    freq, co = object_stats(objects_per_image)
    if vocabulary is None:
        vocabulary = list(dict.fromkeys(o for objs in objects_per_image for o in objs))
    rng = random.Random(f"{seed}-{setting}")
    out = []
    for i, objs in enumerate(objects_per_image):
        pos = list(dict.fromkeys(objs))
        out += [(i, o, True) for o in pos]
        out += [(i, o, False) for o in negatives(pos, len(pos), setting, vocabulary, freq, co, rng)]
    return out


def parse_answer(text: str) -> bool:
    """Whether an answer says yes: LLaVA's rule (the first sentence; ``no`` / ``not`` among its words → no)."""
    first = text.split(".")[0] if "." in text else text
    words = re.findall(r"[a-z']+", first.lower())
    return not ("no" in words or "not" in words)


def pope_metrics(predicted_yes: Sequence[bool], truth_yes: Sequence[bool]) -> dict:
    """Accuracy, precision, recall, F1 (yes = positive) and yes-ratio of yes/no answers; precision (and F1) is 0
    when nothing was answered yes."""
    if len(predicted_yes) != len(truth_yes):
        raise ValueError(f"{len(predicted_yes)} answers for {len(truth_yes)} questions")
    if not truth_yes:
        raise ValueError("no questions")
    tp = sum(p and t for p, t in zip(predicted_yes, truth_yes))
    fp = sum(p and not t for p, t in zip(predicted_yes, truth_yes))
    fn = sum(t and not p for p, t in zip(predicted_yes, truth_yes))
    tn = len(truth_yes) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"questions": len(truth_yes), "accuracy": (tp + tn) / len(truth_yes), "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / len(truth_yes),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def format_table(results: dict[str, dict]) -> str:
    """The scores per setting as a text table."""
    lines = [f"{'setting':<12} {'questions':>9} {'accuracy':>9} {'precision':>9} {'recall':>9} {'f1':>9} "
             f"{'yes-ratio':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<12} {r['questions']:>9} {r['accuracy']:>9.4f} {r['precision']:>9.4f} "
                     f"{r['recall']:>9.4f} {r['f1']:>9.4f} {r['yes_ratio']:>9.4f}")
    return "\n".join(lines)
