"""Image classification recast as VQA (DiGraP, arXiv 2502.15895 §4.2, after oVQA, Ging et al. ICLR 2024): every
image of a classification set asked "what is in the image?", its class name the answer; scored by exact match and
by ClipMatch (the answer text mapped to the nearest class name by a CLIP text tower and the class prompts).

``classification_to_vqa`` writes a classification shard set (any registered layout with class names) as a VQA set
(the ``vqa`` layout); each record keeps the ``label`` and ``class`` it came from, and ``vqa.json`` the class names and
templates, so the answers can be mapped back. The stored answer is the class name as the VQA evaluator compares
answers (``accuracy.normalize_prediction``: lower case, no articles): the evaluator never normalises ground truth.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import UsageError
from .accuracy import normalize_prediction

__all__ = ["QUESTION", "classification_to_vqa", "simple_text", "clip_match", "classification_scores"]

QUESTION = "what is in the image?"  # DiGraP's "What is in the image?" (question_type what-is-in-image)


def classification_to_vqa(src: str | Path, out: str | Path, split: str | None = None, name: str | None = None,
                          group: str | None = None, maxcount: int = 1000):
    """Write the classification set ``src`` (split ``split``) as the VQA set ``out``; a sample without an image or a
    valid label is skipped and counted (``skipped.json``), as the converter does."""
    from ..data.decode import check_image_header
    from ..data.shards import open_shard_set
    from ..data.tars import tar_samples
    from ..tensor_io import atomic_write_text
    from .convert import IMAGE_EXT, write_vqa_split

    shards = open_shard_set(src, split=split)
    classes = shards.require_classnames()
    records, images = [], {}
    for i, s in enumerate(tar_samples([{"url": u} for u in shards.urls])):
        key = f"{shards.split}-{i:08d}"
        img = next((s[k] for k in ("webp", "png", "jpg", "jpeg") if k in s), None)
        try:
            label = int(s["cls"].decode("ascii").strip()) if isinstance(s.get("cls"), bytes) else int(s["cls"])
        except (KeyError, ValueError, TypeError):
            label = -1
        fmt = check_image_header(img) if img is not None else None
        ok = fmt in IMAGE_EXT and 0 <= label < len(classes)
        reason = s.get("__skip__") or ("missing_image" if img is None else "bad_label" if not 0 <= label < len(classes)
                                       else "image_unreadable")
        images[key] = (img, IMAGE_EXT[fmt]) if ok else (None, reason)
        records.append({"question_id": key, "question": QUESTION, "image": key, "image_id": s.get("__key__"),
                        "answers": [normalize_prediction(classes[label]) if ok else "-"] * 10,
                        "question_type": "what is in the image", "answer_type": "other",
                        "label": label, "class": classes[label] if ok else None})
    res = write_vqa_split(records, lambda r: images[r["question_id"]], out, shards.split, name=name, group=group,
                          maxcount=maxcount, source=f"classification:{src}")
    info_file = Path(out) / "vqa.json"
    info = json.loads(info_file.read_text())
    info["classification"] = {"classes": classes, "templates": list(shards.templates or [])}
    atomic_write_text(info_file, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return res


def simple_text(text: str) -> str:
    """oVQA's ``preprocess_text_simple``: non-alphanumerics to spaces, lower case, single spaces."""
    return " ".join(re.sub(r"[^0-9a-zA-Z]+", " ", text).lower().split())


@torch.no_grad()
def clip_match(answers: list[str], bundle, classnames: list[str], templates: list[str], k: int = 5
               ) -> torch.Tensor:
    """``[n, k]`` class indices nearest to each answer text: cosine between the answer's CLIP text embedding and
    each class's zero-shot embedding (the mean of its normalised template embeddings), ClipMatch (oVQA; DiGraP uses
    EVA01-g-14's text tower, here any open_clip CLIP)."""
    from ..models.clip import zero_shot_weights

    if not classnames:
        raise UsageError("ClipMatch needs the class names of the set")
    w = zero_shot_weights(bundle, classnames, templates or ["{c}"]).float()
    tok = bundle.tokenizer()
    a = torch.cat([bundle.clip.encode_text(tok(answers[i:i + 256]), normalize=True).float()
                   for i in range(0, len(answers), 256)])
    return (a @ w.t()).topk(min(k, len(classnames)), dim=1).indices


def classification_scores(answers: list[str], labels: list[int], classnames: list[str], bundle=None,
                          templates: list[str] | None = None) -> dict:
    """Exact match (the normalised answer equals the normalised class name) and, with a CLIP ``bundle``,
    ClipMatch@1 and @5, in percent, over the questions."""
    n = len(answers)
    if not n:
        return {"n": 0}
    names = [simple_text(c) for c in classnames]
    out = {"n": n, "exact_match": 100 * sum(simple_text(a) == names[y] for a, y in zip(answers, labels)) / n}
    if bundle is not None:
        top = clip_match(answers, bundle, classnames, templates or [])
        y = torch.tensor(labels).view(-1, 1)
        out["clip_match_1"] = 100 * float((top[:, :1] == y).any(1).float().mean())
        out["clip_match_5"] = 100 * float((top == y).any(1).float().mean())
    return out
