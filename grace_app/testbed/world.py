"""The embedded testbed: a small synthetic world that mimics ImageNet and its distribution shifts.

``write_synthetic_world(out, seed)`` writes, deterministically (byte-identical tars for a given seed), WebDataset
shards in the CLIP_benchmark layout (``<set>/<split>/{0..N-1}.tar`` + ``nshards.txt``, ``classnames.txt``,
``zeroshot_classification_templates.txt`` with ``{c}``):

* ``id`` (train + test): "photos" of 10 shape classes. Like ImageNet photos, they carry a *spurious* cue: the
  background hue is correlated with the class (``ID_SPURIOUS``). A model fine-tuned on ``id`` alone can lean on it.
* ``v2``: the same photo generator re-sampled with another seed, a weaker background correlation and a slightly
  different object-scale distribution (ImageNet-V2: re-collected, small drop).
* ``sketch``: grey line drawings on paper, no colour, no background cue (ImageNet-Sketch).
* ``rendition``: style changes: patterned fills, bold outlines, flat saturated backgrounds (ImageNet-R).
* ``a``: hard natural-adversarial images: small low-contrast objects, clutter strokes, a distractor shape, and a
  background hue that points at a *different* class (ImageNet-A: images chosen because shortcuts fail on them).
* ``pairs`` (train): image-caption pairs drawn from every domain with neutral backgrounds, for contrastive
  pretraining of the tiny CLIP ("web data"); captions name the domain and the class.

Because pretraining sees all domains without the background shortcut, the zero-shot model is comparatively
robust; fine-tuning on ``id`` alone buys ID accuracy partly with the shortcut and loses OOD accuracy, which is the
trade-off robust fine-tuning methods are about.

That was world ``v1`` (``world="v1"``, ``grace synth --world v1``), kept for comparison. Its ID background hue encodes
the class 90% of the time and no 4/255 perturbation can change a hue, so the cue is a *robust* shortcut: adversarial
training latched onto it (TeCoA gained 36 points of ID accuracy) and OOD collapsed, unlike the paper's baselines.

World ``v2`` (the default) keeps the classes, the sets and the pretraining pairs, and changes what ``id``, ``v2``,
``rendition`` and ``a`` carry, each after a documented property of natural images:

* **Non-robust predictive features** (Ilyas et al. 2019, arXiv 1905.02175, Sec. 2-3: ImageNet holds patterns that
  predict the label yet flip under an imperceptible l_inf perturbation). Every ``id`` and ``v2`` photo carries its
  class's texture tile (``texture_tiles()``: a fixed +-1 pattern per class, 8x8x3, tiled on the ViT's 8 px patch
  grid) added at ``TEXTURE_AMP`` = 3/255 to the 8-bit pixels, written losslessly. A linear probe on it is nearly
  exact on clean images, and a 4/255 perturbation (``2 * TEXTURE_AMP > 4/255``) moves it to another class. The
  pretraining pairs do not carry it (it is a property of this dataset's pipeline, not of the web data), so fine-tuning
  can buy ID accuracy with it and adversarial training cannot.
* **Spurious context at a realistic strength** (Xiao et al. 2021, arXiv 2006.09994: on ImageNet-9 the background
  alone predicts the class about 40% of the time, chance 11%). The ``id`` background hue encodes the class with
  probability ``V2_CONTEXT["id"]`` = 0.2, so background alone predicts 28% (chance 10%); ``v2`` 0.1.
* **Shape/texture cue conflict** (Geirhos et al. 2019, arXiv 1811.12231: ImageNet-trained models follow texture when
  shape and texture disagree). ``rendition`` images carry *another* class's texture tile at a visible amplitude
  (``CONFLICT_AMP`` = 16/255) on top of v1's style change; a model that learned the ID texture is pulled away from the
  shape.
* **OOD sets that remove or change those cues**, as ImageNet-V2/Sketch/R/A do: ``v2`` re-samples the photo process
  (same texture, weaker context, smaller objects; Recht et al. 2019, arXiv 1902.10811); ``sketch`` has neither
  texture nor colour; ``rendition`` changes style and conflicts texture; ``a`` (Hendrycks et al. 2021, arXiv
  1907.07174: images on which shortcut-reliant classifiers fail) has clutter, a distractor, a background hue of a
  wrong class and the texture tile of a wrong class at the ID amplitude.

The calibration rule: the world was designed and checked on the *baselines only* (zero-shot, ft, wise_ft, tecoa,
pmg_aft): their rows must reproduce the signs of the paper's Table 6 deltas against zero-shot on each axis. GRACE's
numbers are never used to choose the testbed.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CLASSNAMES", "TEMPLATES", "WORLDS", "SyntheticWorldSpec", "render", "texture_tiles",
           "write_synthetic_world", "read_split_images"]

CLASSNAMES = ["circle", "square", "triangle", "plus", "ring", "diamond", "hexagon", "crescent", "star", "bar"]
TEMPLATES = ["a photo of a {c}.", "a sketch of a {c}.", "a rendition of a {c}.", "a drawing of a {c}.",
             "an image of a {c}.", "a cluttered photo of a {c}."]
DOMAIN_CAPTIONS = {
    "photo": ["a photo of a {c}.", "an image of a {c}.", "a picture of a {c}."],
    "sketch": ["a sketch of a {c}.", "a drawing of a {c}.", "a pencil sketch of a {c}."],
    "rendition": ["a rendition of a {c}.", "a cartoon {c}.", "a painting of a {c}."],
    "clutter": ["a cluttered photo of a {c}.", "a photo of a small {c}.", "a hard photo of a {c}."],
}
ID_SPURIOUS = 0.9  # probability that an ID photo's background hue encodes its class
V2_SPURIOUS = 0.3
SS = 2  # supersampling factor for anti-aliased rendering
WORLDS = ("v1", "v2")
# The generator's name in world.json, which keys the tiny-CLIP cache and a study's evaluation records: a stable
# identifier (the module's first home), not the module path, so that moving the code invalidates no cached model
# and no study folder while the worlds it writes stay byte-identical (tests/test_world.py).
GENERATOR_ID = "grace_plugin.data.synthetic"
# world v2 (see the module docstring for the property of natural images behind each)
V2_CONTEXT = {"id": 0.2, "v2": 0.1}  # probability that the background hue encodes the class
TEXTURE_AMP = 3  # the non-robust texture tile, in 8-bit grey levels (3/255)
CONFLICT_AMP = 16  # rendition's conflicting texture, in grey levels (visible)
TEXTURE_TILE = 8  # tile side in pixels = the tiny CLIP's patch size
_TEXTURE_SEED = 1905_02175  # a constant: the tiles are a property of the world, the same for every seed


@dataclass(frozen=True)
class SyntheticWorldSpec:
    image_size: int = 32
    train_per_class: int = 300
    test_per_class: int = 60
    ood_per_class: int = 50
    pairs: int = 20000
    shard_size: int = 300

    @classmethod
    def small(cls) -> SyntheticWorldSpec:
        """A few hundred images: for tests and smoke runs (seconds)."""
        return cls(train_per_class=24, test_per_class=8, ood_per_class=6, pairs=600, shard_size=50)


# ---------------------------------------------------------------------------------------------------- shapes

def _poly(u, v, n, apothem, phase=0.0):
    inside = np.ones_like(u, dtype=bool)
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        inside &= (u * math.cos(a) + v * math.sin(a)) <= apothem
    return inside


def shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of class ``cls`` in object coordinates (unit radius, y down)."""
    r2 = u * u + v * v
    name = CLASSNAMES[cls]
    if name == "circle":
        return r2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":
        return _poly(u, v, 3, 0.5, phase=math.pi / 2)
    if name == "plus":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if name == "hexagon":
        return _poly(u, v, 6, math.cos(math.pi / 6))
    if name == "crescent":
        return (r2 <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.85**2)
    if name == "star":
        return _poly(u, v, 3, 0.5, phase=math.pi / 2) | _poly(u, v, 3, 0.5, phase=-math.pi / 2)
    if name == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.28)
    raise ValueError(cls)


def _object_mask(rng, cls, size, scale_range, center_margin=0.1):
    n = size * SS
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    scale = rng.uniform(*scale_range)
    lo, hi = center_margin + scale * 0.8, 1 - center_margin - scale * 0.8
    cx, cy = (rng.uniform(lo, hi), rng.uniform(lo, hi)) if hi > lo else (0.5, 0.5)
    theta = rng.uniform(-0.26, 0.26)  # +-15 degrees: keeps square/diamond and bar/plus distinct
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    c, s = math.cos(theta), math.sin(theta)
    return shape_mask(cls, c * dx + s * dy, -s * dx + c * dy)


def _downsample(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // SS, img.shape[1] // SS
    return img.reshape(h, SS, w, SS, -1).mean(axis=(1, 3))


def _hsv(h, s, v):
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _class_hue(cls):
    return cls / len(CLASSNAMES)


def _background(rng, n, hue, sat_range=(0.45, 0.8), val_range=(0.45, 0.85)):
    base = _hsv(hue, rng.uniform(*sat_range), rng.uniform(*val_range))
    g = np.linspace(-1, 1, n, dtype=np.float32)
    grad = rng.uniform(-0.12, 0.12) * g[:, None, None] + rng.uniform(-0.12, 0.12) * g[None, :, None]
    return np.clip(base[None, None] + grad + rng.normal(0, 0.04, (n, n, 3)).astype(np.float32), 0, 1)


def _contrasting_color(rng, bg_mean, min_dist=0.45):
    for _ in range(20):
        col = rng.uniform(0, 1, 3).astype(np.float32)
        if np.abs(col - bg_mean).sum() >= min_dist * 3 / 2:
            return col
    return 1.0 - bg_mean


def _photo(rng, cls, size, spurious_p, scale_range=(0.22, 0.38), neutral=False):
    n = size * SS
    if neutral:
        hue = rng.uniform()
    elif rng.uniform() < spurious_p:
        hue = _class_hue(cls) + rng.uniform(-0.03, 0.03)
    else:
        hue = rng.uniform()
    img = _background(rng, n, hue)
    mask = _object_mask(rng, cls, size, scale_range)
    col = _contrasting_color(rng, img.mean(axis=(0, 1)))
    shade = 1 + 0.15 * np.linspace(-1, 1, n, dtype=np.float32)[:, None, None] * rng.uniform(-1, 1)
    obj = np.clip(col[None, None] * shade + rng.normal(0, 0.03, (n, n, 3)).astype(np.float32), 0, 1)
    img = np.where(mask[..., None], obj, img)
    return _downsample(img)


def _outline(mask, width):
    er = mask.copy()
    for _ in range(width):
        er = er & np.roll(er, 1, 0) & np.roll(er, -1, 0) & np.roll(er, 1, 1) & np.roll(er, -1, 1)
    return mask & ~er


def _sketch(rng, cls, size):
    n = size * SS
    paper = rng.uniform(0.85, 1.0)
    img = np.full((n, n, 3), paper, np.float32) + rng.normal(0, 0.02, (n, n, 1)).astype(np.float32)
    mask = _object_mask(rng, cls, size, (0.24, 0.4))
    line = _outline(mask, int(rng.integers(2, 4)))
    line &= rng.uniform(size=line.shape) > 0.12  # broken pencil strokes
    ink = rng.uniform(0.05, 0.35)
    img = np.where(line[..., None], ink, img)
    return np.clip(_downsample(img), 0, 1)


def _pattern(rng, n, c1, c2):
    yy, xx = np.mgrid[0:n, 0:n]
    kind = rng.integers(3)
    period = int(rng.integers(4, 9))
    if kind == 0:
        sel = ((xx + yy) // period) % 2 == 0
    elif kind == 1:
        sel = ((xx // period) + (yy // period)) % 2 == 0
    else:
        sel = (xx // period) % 2 == 0
    return np.where(sel[..., None], c1[None, None], c2[None, None])


def _rendition(rng, cls, size):
    n = size * SS
    bg = _hsv(rng.uniform(), rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    img = np.broadcast_to(bg, (n, n, 3)).astype(np.float32).copy()
    if rng.uniform() < 0.5:
        img = _pattern(rng, n, bg, _hsv(rng.uniform(), 0.6, 0.9)).astype(np.float32)
    mask = _object_mask(rng, cls, size, (0.25, 0.4))
    fill = _pattern(rng, n, _hsv(rng.uniform(), 0.9, 0.95), _hsv(rng.uniform(), 0.9, 0.5))
    img = np.where(mask[..., None], fill, img)
    img = np.where(_outline(mask, 2)[..., None], 0.05, img)
    if rng.uniform() < 0.3:
        img = 1.0 - img
    return _downsample(img.astype(np.float32))


def _clutter(rng, cls, size, misleading=True):
    n = size * SS
    k = len(CLASSNAMES)
    hue = _class_hue((cls + int(rng.integers(1, k))) % k) if misleading else rng.uniform()
    img = _background(rng, n, hue, sat_range=(0.5, 0.85))
    # clutter strokes
    for _ in range(int(rng.integers(3, 7))):
        x0, y0, x1, y1 = rng.uniform(0, n, 4)
        t = np.linspace(0, 1, 4 * n)
        xs = np.clip((x0 + (x1 - x0) * t).astype(int), 0, n - 1)
        ys = np.clip((y0 + (y1 - y0) * t).astype(int), 0, n - 1)
        img[ys, xs] = rng.uniform(0, 1, 3)
    # a small distractor of another class
    other = (cls + int(rng.integers(1, k))) % k
    dmask = _object_mask(rng, other, size, (0.1, 0.14), center_margin=0.05)
    img = np.where(dmask[..., None], rng.uniform(0, 1, 3).astype(np.float32), img)
    mask = _object_mask(rng, cls, size, (0.2, 0.28))
    bgm = img.mean(axis=(0, 1))
    col = np.clip(bgm + rng.choice([-1, 1], 3) * rng.uniform(0.25, 0.4, 3), 0, 1).astype(np.float32)
    img = np.where(mask[..., None], col, img)
    return np.clip(_downsample(img), 0, 1)


def render(domain: str, rng: np.random.Generator, cls: int, size: int = 32) -> np.ndarray:
    """One HxWx3 float image in [0,1] of class ``cls`` from ``domain``."""
    if domain == "id":
        return _photo(rng, cls, size, ID_SPURIOUS)
    if domain == "v2":
        return _photo(rng, cls, size, V2_SPURIOUS, scale_range=(0.2, 0.34))
    if domain == "photo":  # pretraining photos: no background shortcut
        return _photo(rng, cls, size, 0.0, neutral=True)
    if domain == "sketch":
        return _sketch(rng, cls, size)
    if domain == "rendition":
        return _rendition(rng, cls, size)
    if domain == "a":
        return _clutter(rng, cls, size, misleading=True)
    if domain == "clutter":
        return _clutter(rng, cls, size, misleading=False)
    raise ValueError(f"unknown synthetic domain {domain!r}")


# ---------------------------------------------------------------------------------------------------- world v2

def texture_tiles() -> np.ndarray:
    """The per-class texture tiles of world v2: int8 +-1, shape (classes, TEXTURE_TILE, TEXTURE_TILE, 3)."""
    rng = np.random.default_rng(_TEXTURE_SEED)
    return rng.choice(np.array([-1, 1], np.int8), size=(len(CLASSNAMES), TEXTURE_TILE, TEXTURE_TILE, 3))


def _quantize(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _add_texture(img8: np.ndarray, cls: int, amp: int) -> np.ndarray:
    """Add class ``cls``'s tile times ``amp`` grey levels to an 8-bit image (exact: integers, clipped to 0..255)."""
    h, w = img8.shape[:2]
    reps = (-(-h // TEXTURE_TILE), -(-w // TEXTURE_TILE), 1)
    tile = np.tile(texture_tiles()[cls].astype(np.int16), reps)[:h, :w]
    return np.clip(img8.astype(np.int16) + amp * tile, 0, 255).astype(np.uint8)


def _other_class(rng, cls: int) -> int:
    k = len(CLASSNAMES)
    return (cls + int(rng.integers(1, k))) % k


def render_v2(domain: str, rng: np.random.Generator, cls: int, size: int = 32) -> np.ndarray:
    """One HxWx3 uint8 image of class ``cls`` from ``domain`` in world v2 (module docstring)."""
    if domain == "id":
        return _add_texture(_quantize(_photo(rng, cls, size, V2_CONTEXT["id"])), cls, TEXTURE_AMP)
    if domain == "v2":
        img = _photo(rng, cls, size, V2_CONTEXT["v2"], scale_range=(0.2, 0.34))
        return _add_texture(_quantize(img), cls, TEXTURE_AMP)
    if domain == "rendition":
        return _add_texture(_quantize(_rendition(rng, cls, size)), _other_class(rng, cls), CONFLICT_AMP)
    if domain == "a":
        return _add_texture(_quantize(_clutter(rng, cls, size, misleading=True)), _other_class(rng, cls),
                            TEXTURE_AMP)
    return _quantize(render(domain, rng, cls, size))  # sketch and the pretraining domains: as in v1


# ---------------------------------------------------------------------------------------------------- writing

def _encode(img: np.ndarray, fmt: str) -> bytes:
    pil = Image.fromarray(img if img.dtype == np.uint8 else _quantize(img))
    buf = io.BytesIO()
    if fmt == "jpg":
        pil.save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        # lossless at libwebp's fastest effort: the same pixels as the default effort, 5x faster to write
        pil.save(buf, format="WEBP", lossless=True, method=0)
    else:
        pil.save(buf, format="PNG")
    return buf.getvalue()


def _write_split(split_dir: Path, samples, shard_size: int) -> int:
    import webdataset as wds

    split_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with wds.ShardWriter(str(split_dir / "%d.tar"), maxcount=shard_size, verbose=0, mtime=0.0) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
        nshards = sink.shard
    (split_dir / "nshards.txt").write_text(f"{nshards}\n")
    return count


def _class_samples(domain, rng, per_class, size, fmt, world="v1"):
    draw = render_v2 if world == "v2" else render
    labels = np.repeat(np.arange(len(CLASSNAMES)), per_class)
    rng.shuffle(labels)
    for i, y in enumerate(labels):
        img = draw(domain, rng, int(y), size)
        yield {"__key__": f"s{i:07d}", fmt: _encode(img, fmt), "cls": int(y)}


def _pair_samples(rng, n, size):
    domains = ["photo", "photo", "sketch", "rendition", "clutter"]
    caption_domain = {"photo": "photo", "sketch": "sketch", "rendition": "rendition", "clutter": "clutter"}
    for i in range(n):
        y = int(rng.integers(len(CLASSNAMES)))
        d = domains[int(rng.integers(len(domains)))]
        img = render(d, rng, y, size)
        opts = DOMAIN_CAPTIONS[caption_domain[d]]
        cap = opts[int(rng.integers(len(opts)))].format(c=CLASSNAMES[y])
        yield {"__key__": f"s{i:07d}", "webp": _encode(img, "webp"), "cls": y, "txt": cap}


def _write_meta(set_dir: Path, templates=TEMPLATES):
    set_dir.mkdir(parents=True, exist_ok=True)
    (set_dir / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (set_dir / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")


def _write_step(job) -> tuple[str, str, int]:
    out, seed, spec, world, set_name, split, domain, per_class, fmt, stream = job
    rng = np.random.default_rng([seed, stream])
    _write_meta(out / set_name)
    if domain is None:
        samples = _pair_samples(rng, spec.pairs, spec.image_size)
    else:
        samples = _class_samples(domain, rng, per_class, spec.image_size, fmt, world)
    return set_name, split, _write_split(out / set_name / split, samples, spec.shard_size)


def write_synthetic_world(out: str | Path, seed: int = 0, spec: SyntheticWorldSpec = SyntheticWorldSpec(),
                          progress: bool = False, workers: int | None = None, world: str = "v2") -> dict:
    """Write the testbed under ``out``; return ``{set: {split: n_samples}}`` (also saved as ``world.json``).

    ``workers``: processes writing splits in parallel (default: the CPU count; 1 writes in this process).
    ``world``: ``v2`` (default) or ``v1`` (the first design, kept for comparison; module docstring)."""
    if world not in WORLDS:
        from grace_plugin.errors import UsageError

        raise UsageError(f"world: unknown synthetic world {world!r} (one of {', '.join(WORLDS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size, k = spec.image_size, len(CLASSNAMES)
    # (set, split, domain, per-class count, image format, rng stream); v2 writes every set carrying a texture tile
    # losslessly (JPEG would blur a 3/255 pattern), and the texture-free sketches as JPEG
    fmts = {"id": "jpg", "v2": "jpg", "sketch": "png", "rendition": "webp", "a": "jpg"} if world == "v1" else \
        {"id": "webp", "v2": "webp", "sketch": "jpg", "rendition": "webp", "a": "png"}
    plan = [
        ("id", "train", "id", spec.train_per_class, fmts["id"], 1),
        ("id", "test", "id", spec.test_per_class, fmts["id"], 2),
        ("v2", "test", "v2", spec.ood_per_class, fmts["v2"], 3),
        ("sketch", "test", "sketch", spec.ood_per_class, fmts["sketch"], 4),
        ("rendition", "test", "rendition", spec.ood_per_class, fmts["rendition"], 5),
        ("a", "test", "a", spec.ood_per_class, fmts["a"], 6),
    ]
    steps = plan + [("pairs", "train", None, None, "webp", 7)]
    # Every split has its own random stream, so splits are written in parallel (the pairs dominate) with the same
    # bytes as a sequential run.
    # Workers are forked (they use numpy and PIL only); without fork (macOS, Windows) the splits are written here, as
    # spawned workers would re-import the caller's main module.
    can_fork = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
    workers = max(1, min(workers if workers is not None else (os.cpu_count() or 1), len(steps)))
    workers = workers if can_fork else 1
    jobs = [(out, seed, spec, world, *step) for step in steps]
    if workers == 1:
        results = map(_write_step, jobs)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        # the largest split first, so the others fill the remaining workers
        order = sorted(range(len(jobs)), key=lambda i: jobs[i][4] != "pairs")
        futures = {pool.submit(_write_step, jobs[i]): i for i in order}
        results = (f.result() for f in as_completed(futures))
    if progress:
        from grace_plugin.progress import progress as bar

        results = bar(results, total=len(jobs), desc="synth", unit="split")
    done: dict = {}
    try:
        for set_name, split, n in results:
            done[set_name, split] = n
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
    counts: dict = {}
    for set_name, split, *_ in steps:  # in plan order, whatever order the workers finished in
        counts.setdefault(set_name, {})[split] = done[set_name, split]
    meta = {"generator": GENERATOR_ID, "version": WORLDS.index(world) + 1, "world": world,
            "seed": seed, "classes": k, "image_size": size, "spec": asdict(spec), "counts": counts}
    if world == "v2":  # the cue strengths define the world (and so the tiny-CLIP cache key)
        meta["cues"] = {"context": V2_CONTEXT, "texture_amp": TEXTURE_AMP, "conflict_amp": CONFLICT_AMP,
                        "texture_tile": TEXTURE_TILE}
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_split_images(split_dir: str | Path, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a written split (``<set>/<split>/{0..N-1}.tar``) as an ``(n, H, W, 3)`` array of 0-255 values
    in shard and member order, with its labels: for probing the written cues (tests/test_world.py,
    bench/testbed_probe.py), not a loader."""
    import tarfile

    xs, ys = [], []
    for tar in sorted(Path(split_dir).glob("*.tar"), key=lambda t: int(t.stem)):
        with tarfile.open(tar) as tf:
            samples: dict = {}
            for m in tf:
                key, ext = m.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for d in samples.values():
            ext = next(e for e in ("webp", "png", "jpg") if e in d)
            xs.append(np.asarray(Image.open(io.BytesIO(d[ext])).convert("RGB"), dtype))
            ys.append(int(d["cls"]))
    return np.stack(xs), np.array(ys)
