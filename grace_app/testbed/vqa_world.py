"""The embedded VQA world: scenes of shapes, templated questions, ten annotators, and ten sets in FRAMES-VQA's roles.

``write_vqa_world(out, seed)`` writes, deterministically, ten VQA sets in the ``vqa`` shard layout
(``grace_plugin/vqa/convert.py``) plus ``pairs/`` (image-caption pairs for the tiny CLIP's contrastive
pretraining, ``grace_app/testbed/tiny_clip.py``) and ``world.json``. FRAMES-VQA (arXiv 2505.21755) fine-tunes on
VQAv2 and tests on nine OOD sets; each set here plays one of their roles, by a construction its test checks
(``tests/test_vqa_world.py``):

* ``vqav2`` (ID; train / val / test): 32 px scenes of 1-4 objects (4 shapes x 4 colours in a 2x2 grid) on a grey
  background; questions from four templates (colour of a shape, shape of a colour, count of a shape, existence of
  a coloured shape). Answer priors as in VQAv2: counts are mostly 1-2, "is there" is mostly yes, and a circle is
  red 80% of the time (a joint image+question shortcut).
* near OOD: ``iv-vqa`` (image-invariant, Agarwal et al. CVPR 2020: an object irrelevant to the question removed,
  answer unchanged), ``cv-vqa`` (image-covariant: one instance of the counted shape removed, answer one less),
  ``vqa-rephrasings`` (held-out paraphrase templates, Shah et al. 2019), ``vqa-cp`` (answer priors flipped per
  question type, Agrawal et al. 2018), ``vqa-ce`` (counter-examples to the circle-is-red shortcut, Dancette et al.
  2021), ``advqa`` (adversarial questions: those a reference model gets wrong; the reference here is the
  question-only prior model of ID train, the "blind" baseline of Goyal et al. 2017, as AdVQA kept questions that
  fooled models, Sheng et al. 2021).
* far OOD: ``textvqa`` (reading a digit drawn on a square), ``vizwiz`` (degraded capture: blur, low light,
  shifted framing; half its colour questions ask about an object out of frame, answered "unanswerable" by most
  annotators),
  ``ok-vqa`` (outside knowledge: how many corners the object has, never asked in ID, described in pretraining
  captions).

Ten annotators per question: the true answer 6-10 times, the rest plausible wrong answers of the same type, stored
pre-normalised (lower case, digits) as the VQA evaluator expects. The pretraining pairs describe scenes in words
and in question-answer form, with digits and corner counts, so zero-shot answering is possible where a skill was
pretrained. The calibration rule is the classification world's: designed and checked on baselines only.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .world import SS, _downsample, _quantize, shape_mask

__all__ = ["SHAPES", "COLOURS", "KINDS", "SETS", "VqaWorldSpec", "answer_of", "question_text", "write_vqa_world",
           "ANSWER_TYPES", "ID_PRIOR"]

GENERATOR_ID = "grace_app.testbed.vqa_world"
VERSION = 1
SHAPES = {"circle": 0, "square": 1, "triangle": 2, "plus": 3}  # -> world.shape_mask class index
COLOURS = {"red": (0.86, 0.16, 0.14), "green": (0.16, 0.68, 0.22), "blue": (0.18, 0.30, 0.90),
           "yellow": (0.92, 0.84, 0.14)}
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "plus": 12}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "plus": "pluses"}
CELLS = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
# kind -> (ID template, paraphrase template, answer type, question type)
KINDS = {
    "colour": ("what colour is the {shape}?", "which colour does the {shape} have?", "other", "what colour"),
    "shape": ("what shape is the {colour} object?", "what is the form of the {colour} thing?", "other",
              "what shape"),
    "count": ("how many {shapes} are there?", "what number of {shapes} can you see?", "number", "how many"),
    "exist": ("is there a {colour} {shape}?", "can you see a {colour} {shape}?", "yes/no", "is there"),
    "read": ("what number is written on the square?", None, "number", "what number"),
    "corners": ("how many corners does the {colour} object have?", None, "number", "how many corners"),
}
ANSWER_TYPES = {k: v[2] for k, v in KINDS.items()}
ID_PRIOR = {"count": (0.1, 0.4, 0.4, 0.1), "yes": 0.7, "circle_red": 0.8}
# (set, group, split, spec field for its size, rng stream)
SETS = (("vqav2", "id", "train", "train", 1), ("vqav2", "id", "val", "val", 2), ("vqav2", "id", "test", "test", 3),
        ("iv-vqa", "near", "test", "ood", 4), ("cv-vqa", "near", "test", "ood", 5),
        ("vqa-rephrasings", "near", "test", "ood", 6), ("vqa-cp", "near", "test", "ood", 7),
        ("vqa-ce", "near", "test", "ood", 8), ("advqa", "near", "test", "ood", 9),
        ("textvqa", "far", "test", "ood", 10), ("vizwiz", "far", "test", "ood", 11),
        ("ok-vqa", "far", "test", "ood", 12))
DIGITS = {  # 3x5 glyphs, rows top to bottom
    "1": ("010", "110", "010", "010", "111"), "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "011", "001", "111"), "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"), "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"), "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111")}


@dataclass(frozen=True)
class VqaWorldSpec:
    train: int = 6000
    val: int = 600
    test: int = 600
    ood: int = 400
    pairs: int = 20000
    shard_size: int = 500

    @classmethod
    def small(cls) -> VqaWorldSpec:
        return cls(train=240, val=40, test=60, ood=40, pairs=400, shard_size=100)


# ------------------------------------------------------------------------------------------------ scene graph
def answer_of(scene: list, kind: str, slots: dict) -> str | None:
    """The answer a scene gives to a question (None: the question does not apply, e.g. two circles for "what colour
    is the circle?"); ``scene``: ``[[shape, colour, cell], ...]`` (a "read" scene's square also holds its digit)."""
    if kind == "colour":
        hits = [o for o in scene if o[0] == slots["shape"]]
        return hits[0][1] if len(hits) == 1 else None
    if kind in ("shape", "corners"):
        hits = [o for o in scene if o[1] == slots["colour"]]
        if len(hits) != 1:
            return None
        return hits[0][0] if kind == "shape" else str(CORNERS[hits[0][0]])
    if kind == "count":
        return str(sum(o[0] == slots["shape"] for o in scene))
    if kind == "exist":
        return "yes" if any(o[0] == slots["shape"] and o[1] == slots["colour"] for o in scene) else "no"
    if kind == "read":
        return next((str(o[3]) for o in scene if o[0] == "square" and len(o) > 3), None)
    raise ValueError(kind)


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _colour(rng, shape: str, circle_red: float, avoid=()) -> str:
    """A colour for an object: a circle is red with probability ``circle_red`` (the ID shortcut), else any other."""
    if shape == "circle":
        if "red" not in avoid and rng.uniform() < circle_red:
            return "red"
        return _pick(rng, [c for c in COLOURS if c != "red" and c not in avoid])
    return _pick(rng, [c for c in COLOURS if c not in avoid])


def _place(rng, objects: list) -> list:
    cells = rng.permutation(len(CELLS))[:len(objects)]
    return [[s, c, int(cell)] for (s, c), cell in zip(objects, cells)]


def _item(rng, kind: str, prior: dict, shape: str | None = None) -> tuple[list, dict]:
    """A scene and the slots of a ``kind`` question about it, answer priors from ``prior`` (``shape``: the shape a
    colour question asks about)."""
    shapes, red = list(SHAPES), prior["circle_red"]
    if kind == "colour":
        s = shape or _pick(rng, shapes)
        objs = [(s, _colour(rng, s, red))]
        for _ in range(int(rng.integers(0, 3))):
            o = _pick(rng, [x for x in shapes if x != s])
            objs.append((o, _colour(rng, o, red)))
        return _place(rng, objs), {"shape": s}
    if kind in ("shape", "corners"):
        s = _pick(rng, shapes)
        c = _colour(rng, s, red)
        objs = [(s, c)]
        for _ in range(int(rng.integers(0, 3))):
            o = _pick(rng, shapes)
            objs.append((o, _colour(rng, o, red, avoid=(c,))))
        return _place(rng, objs), {"colour": c}
    if kind == "count":
        k = int(rng.choice(4, p=prior["count"]))
        s = _pick(rng, shapes)
        others = int(rng.integers(1 if k == 0 else 0, min(2, 4 - k) + 1))
        objs = [(s, _colour(rng, s, red)) for _ in range(k)]
        objs += [(o, _colour(rng, o, red)) for o in (_pick(rng, [x for x in shapes if x != s]) for _ in range(others))]
        return _place(rng, objs), {"shape": s}
    if kind == "exist":
        s, c = _pick(rng, shapes), _pick(rng, list(COLOURS))
        yes, total = rng.uniform() < prior["yes"], int(rng.integers(1, 4))
        objs = [(s, c)] if yes else []
        if not yes and rng.uniform() < 0.5:  # a near miss: the shape in another colour
            objs.append((s, _colour(rng, s, red, avoid=(c,))))
        while len(objs) < total:
            o = _pick(rng, shapes)
            objs.append((o, _colour(rng, o, red, avoid=(c,) if o == s and not yes else ())))
        return _place(rng, objs), {"shape": s, "colour": c}
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------ rendering
def _digit_mask(n: int, digit: str, cx: float, cy: float, height: float) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    cell = height / 5
    col = np.floor((xx - (cx - 1.5 * cell)) / cell).astype(int)
    row = np.floor((yy - (cy - 2.5 * cell)) / cell).astype(int)
    inside = (col >= 0) & (col < 3) & (row >= 0) & (row < 5)
    glyph = np.array([[ch == "1" for ch in r] for r in DIGITS[digit]])
    return inside & glyph[row.clip(0, 4), col.clip(0, 2)]


def render_scene(rng, scene: list, size: int = 32, degrade: bool = False) -> np.ndarray:
    """A scene as a ``size`` px RGB float image in [0, 1] (supersampled ``SS``x)."""
    n = size * SS
    grey = rng.uniform(0.4, 0.62)
    img = np.clip(grey + rng.normal(0, 0.03, (n, n, 3)), 0, 1).astype(np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    for o in scene:
        cx, cy = CELLS[o[2]]
        big = len(o) > 3  # a square with a digit: larger, centred
        if big:
            cx, cy = 0.5, 0.5
        cx, cy = cx + rng.uniform(-0.03, 0.03), cy + rng.uniform(-0.03, 0.03)
        r = rng.uniform(0.36, 0.4) if big else rng.uniform(0.17, 0.21)
        theta = rng.uniform(-0.2, 0.2)
        u, v = (xx - cx) / r, (yy - cy) / r
        c, s = np.cos(theta), np.sin(theta)
        mask = shape_mask(SHAPES[o[0]], c * u + s * v, -s * u + c * v)
        col = np.clip(np.array(COLOURS[o[1]]) + rng.normal(0, 0.04, 3), 0, 1).astype(np.float32)
        img[mask] = col
        if big:
            img[_digit_mask(n, str(o[3]), cx, cy, 0.42)] = 0.05
    img = _downsample(img)
    if degrade:  # VizWiz-like capture: blur, low light, shifted framing
        k = int(rng.integers(1, 3))
        pad = np.pad(img, ((k, k), (k, k), (0, 0)), mode="edge")
        img = sum(pad[i:i + size, j:j + size] for i in range(2 * k + 1) for j in range(2 * k + 1)) / (2 * k + 1) ** 2
        img = img * rng.uniform(0.35, 0.6)
        img = np.roll(img, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
    return img


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_quantize(img)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ questions
def _annotate(rng, answer: str, kind: str, unanswerable: bool = False) -> list[str]:
    """Ten annotators: the answer 6-10 times (8-10 for "unanswerable"), the rest wrong answers of the same type."""
    pool = {"colour": list(COLOURS), "shape": list(SHAPES), "count": ["0", "1", "2", "3"], "exist": ["yes", "no"],
            "read": list(DIGITS), "corners": ["0", "3", "4", "12"]}[kind]
    right = int(rng.integers(8 if unanswerable else 6, 11))
    wrong = [a for a in pool if a != answer]
    return [answer] * right + [_pick(rng, wrong) for _ in range(10 - right)]


def question_text(kind: str, slots: dict, paraphrase: bool = False) -> str:
    return KINDS[kind][1 if paraphrase else 0].format(**slots, shapes=PLURAL.get(slots.get("shape"), ""))


def _record(qid: str, kind: str, slots: dict, scene: list, answer: str, answers: list[str], paraphrase=False):
    text = question_text(kind, slots, paraphrase)
    return {"question_id": qid, "question": text, "answers": answers, "image": f"{qid}.png",
            "question_type": KINDS[kind][3], "answer_type": KINDS[kind][2], "scene": scene, "kind": kind,
            "slots": slots, "answer": answer}


def _id_item(rng, prior=ID_PRIOR, kinds=("colour", "shape", "count", "exist")):
    kind = _pick(rng, list(kinds))
    scene, slots = _item(rng, kind, prior)
    return kind, scene, slots, answer_of(scene, kind, slots)


def _edited(rng, role: str):
    """IV: an object irrelevant to the question removed (answer unchanged); CV: one counted object removed."""
    while True:
        if role == "iv":
            kind, scene, slots, ans = _id_item(rng)
            keep = [i for i in range(len(scene)) if answer_of(scene[:i] + scene[i + 1:], kind, slots) == ans]
        else:
            kind, prior = "count", dict(ID_PRIOR, count=(0.0, 1 / 3, 1 / 3, 1 / 3))
            scene, slots = _item(rng, kind, prior)
            ans = answer_of(scene, kind, slots)
            keep = [i for i, o in enumerate(scene) if o[0] == slots["shape"]]
        if len(scene) >= 2 and keep:
            i = keep[int(rng.integers(len(keep)))]
            edited = scene[:i] + scene[i + 1:]
            return kind, edited, slots, answer_of(edited, kind, slots), {"base_scene": scene, "base_answer": ans}


def _blind_prior(train: list[dict]) -> dict:
    """The question-only reference model: the most frequent answer of each question text in ID train."""
    from collections import Counter

    by_q: dict = {}
    for r in train:
        by_q.setdefault(r["question"], Counter())[r["answer"]] += 1
    return {q: max(sorted(c), key=c.__getitem__) for q, c in by_q.items()}


def _set_items(name: str, rng, n: int, blind: dict | None):
    """``n`` (kind, scene, slots, answer, extra, options) items of set ``name``."""
    items = []
    while len(items) < n:
        extra, opts = {}, {}
        if name in ("vqav2", "vqa-rephrasings", "advqa"):
            kind, scene, slots, ans = _id_item(rng)
            opts["paraphrase"] = name == "vqa-rephrasings"
            if name == "advqa" and blind.get(question_text(kind, slots)) == ans:
                continue  # the reference model answers it: not adversarial
        elif name in ("iv-vqa", "cv-vqa"):
            kind, scene, slots, ans, extra = _edited(rng, name[:2])
        elif name == "vqa-cp":
            kind, scene, slots, ans = _id_item(rng, dict(ID_PRIOR, count=(0.4, 0.1, 0.1, 0.4), yes=0.3),
                                               ("count", "exist"))
        elif name == "vqa-ce":
            kind = "colour"
            scene, slots = _item(rng, kind, dict(ID_PRIOR, circle_red=0.0), shape="circle")
            ans = answer_of(scene, kind, slots)
        elif name == "textvqa":
            kind, slots, d = "read", {}, _pick(rng, list(DIGITS))
            scene = [["square", _pick(rng, ["yellow", "green"]), 0, int(d)]]
            ans = d
        elif name == "vizwiz":
            kind, scene, slots, ans = _id_item(rng)
            opts["degrade"] = True
            if kind == "colour" and rng.uniform() < 0.5:  # the asked-about object is out of frame
                scene = [o for o in scene if o[0] != slots["shape"]]
                ans, opts["unanswerable"] = "unanswerable", True
        elif name == "ok-vqa":
            kind = "corners"
            scene, slots = _item(rng, kind, ID_PRIOR)
            ans = answer_of(scene, kind, slots)
        else:
            raise ValueError(name)
        if ans is None or not scene and not opts.get("unanswerable"):
            continue
        items.append((kind, scene, slots, ans, extra, opts))
    return items


PRETRAIN_PRIOR = {"count": (0.25, 0.25, 0.25, 0.25), "yes": 0.5, "circle_red": 0.25}


def _describe(scene: list) -> str:
    parts = [f"a {c} {s}" for s, c, *_ in sorted(scene, key=lambda o: o[2])]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _pair(rng) -> tuple[list, str]:
    """A pretraining scene and its caption: words (40%), a question and its answer (40%), a digit (10%), corners."""
    u = rng.uniform()
    if u < 0.8:
        kind, scene, slots, ans = _id_item(rng, PRETRAIN_PRIOR)
        if u < 0.4:
            return scene, _describe(scene)
        return scene, f"question: {question_text(kind, slots)} answer: {ans}"
    if u < 0.9:
        d, c = _pick(rng, list(DIGITS)), _pick(rng, ["yellow", "green"])
        cap = f"a {c} square with the number {d}" if u < 0.85 else f"question: {KINDS['read'][0]} answer: {d}"
        return [["square", c, 0, int(d)]], cap
    scene, slots = _item(rng, "corners", PRETRAIN_PRIOR)
    ans = answer_of(scene, "corners", slots)
    shape = next(o[0] for o in scene if o[1] == slots["colour"])
    cap = (f"a {slots['colour']} {shape} with {ans} corners" if u < 0.95
           else f"question: {question_text('corners', slots)} answer: {ans}")
    return scene, cap


def _write_pairs(out: Path, rng, n: int, shard_size: int) -> int:
    import webdataset as wds

    split = out / "pairs" / "train"
    split.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(split / "%d.tar"), maxcount=shard_size, verbose=0, mtime=0.0) as sink:
        for i in range(n):
            scene, cap = _pair(rng)
            sink.write({"__key__": f"p{i:07d}", "png": _png(render_scene(rng, scene)), "txt": cap})
        shards = sink.shard
    (split / "nshards.txt").write_text(f"{shards}\n")
    return n


def _write_set(out: Path, name: str, group: str, split: str, rng, n: int, blind, shard_size: int) -> list[dict]:
    from grace_plugin.vqa.convert import write_vqa_split

    records, images = [], {}
    for i, (kind, scene, slots, ans, extra, opts) in enumerate(_set_items(name, rng, n, blind)):
        qid = f"{name}-{split}-{i:06d}"
        answers = _annotate(rng, ans, kind, opts.get("unanswerable", False))
        rec = _record(qid, kind, slots, scene, ans, answers, opts.get("paraphrase", False)) | extra
        images[qid] = _png(render_scene(rng, scene, degrade=opts.get("degrade", False)))
        records.append(rec)
    write_vqa_split(records, lambda r: (images[r["question_id"]], "png"), out / name, split, name=name, group=group,
                    maxcount=shard_size, source=f"{GENERATOR_ID} seed stream")
    return records


def write_vqa_world(out: str | Path, seed: int = 0, spec: VqaWorldSpec = VqaWorldSpec()) -> dict:
    """Write the VQA world under ``out``; return (and save as ``world.json``) what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict = {}
    blind = None
    for name, group, split, size_field, stream in SETS:
        rng = np.random.default_rng([seed, stream])
        recs = _write_set(out, name, group, split, rng, getattr(spec, size_field), blind, spec.shard_size)
        if (name, split) == ("vqav2", "train"):
            blind = _blind_prior(recs)
        counts.setdefault(name, {})[split] = len(recs)
    counts["pairs"] = {"train": _write_pairs(out, np.random.default_rng([seed, 99]), spec.pairs, spec.shard_size)}
    meta = {"generator": GENERATOR_ID, "version": VERSION, "task": "vqa", "seed": seed, "image_size": 32,
            "spec": asdict(spec), "priors": {"id": ID_PRIOR, "pretrain": PRETRAIN_PRIOR}, "counts": counts}
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
