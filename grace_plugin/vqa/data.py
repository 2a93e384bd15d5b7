"""VQA samples in shards: a sample's task fields (``VqaTarget``, the ``target`` of ``data.decode.decode_sample``),
the answer vocabulary of a training set (``answer_vocabulary``) and the records of a set without its images
(``read_records``)."""
from __future__ import annotations

import json
from collections import Counter

import torch

from .accuracy import answer_scores, prepare_ground_truth

__all__ = ["VqaTarget", "parse_record", "answer_vocabulary", "read_records", "RECORD_FIELDS"]

RECORD_FIELDS = ("question_id", "answers", "question_type", "answer_type", "label")  # label: classification as VQA


def parse_record(sample: dict) -> dict | None:
    """A sample's VQA record (its ``json`` member), or None when it is not a usable one."""
    raw = sample.get("json")
    try:
        rec = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
    except (ValueError, UnicodeDecodeError):
        return None
    if (not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip()
            or not isinstance(rec.get("answers"), list) or not rec["answers"]
            or not all(isinstance(a, str) for a in rec["answers"]) or "question_id" not in rec):
        return None
    return rec


class VqaTarget:
    """A raw VQA sample -> ``{"label": soft target [A], "question": str, "record": {...}}`` or a skip reason.

    ``label``: each vocabulary answer's official accuracy for this question (``accuracy.answer_scores``),
    normalised to sum 1, so ``F.cross_entropy(logits, label)`` (every recipe's loss) is the soft-target
    cross-entropy; all zeros when no annotator's answer is in the vocabulary. ``train``: such a question teaches
    nothing and is skipped (``answer_not_in_vocabulary``, counted); in evaluation it is kept and scored (a model
    cannot answer it, which is part of its accuracy). A picklable class, so loader workers can use it."""

    def __init__(self, vocabulary: list[str], train: bool = False):
        self.index = {a: i for i, a in enumerate(vocabulary)}
        self.size, self.train = len(vocabulary), train

    def __call__(self, sample: dict) -> dict | str:
        rec = parse_record(sample)
        if rec is None:
            return "bad_record"
        label = torch.zeros(self.size)
        for i, s in answer_scores(rec["answers"], self.index).items():
            label[i] = s
        total = float(label.sum())
        if total > 0:
            label /= total
        elif self.train:
            return "answer_not_in_vocabulary"
        return {"label": label, "question": rec["question"], "record": {k: rec.get(k) for k in RECORD_FIELDS}}


def read_records(urls: list[str]) -> list[dict]:
    """Every sample's record (the ``json`` members of local tar shards, in shard order; images are not read)."""
    from ..data.shards import _file_members

    out = []
    for _, tf, m in _file_members(urls):
        if m.name.endswith(".json"):
            rec = parse_record({"json": tf.extractfile(m).read()})
            if rec is not None:
                out.append(rec)
    return out


def answer_vocabulary(records: list[dict], min_count: int = 9, max_answers: int | None = None) -> list[str]:
    """The answers a classifier head predicts: every annotator answer (as the evaluator compares it) given at least
    ``min_count`` times over ``records``, most frequent first (ties alphabetical), at most ``max_answers``. VQAv2's
    3,129-answer vocabulary is this rule with ``min_count=9`` on train (Teney et al., arXiv 1708.02711 §3)."""
    counts: Counter = Counter()
    for rec in records:
        counts.update(prepare_ground_truth(rec["answers"]))
    ranked = sorted((a for a, c in counts.items() if c >= min_count and a.strip()), key=lambda a: (-counts[a], a))
    return ranked[:max_answers] if max_answers else ranked
