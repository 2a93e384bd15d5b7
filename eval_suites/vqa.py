"""VQA evaluation: per-set VQA accuracy (the official metric, ``grace_plugin.vqa.accuracy``), ID / near-OOD /
far-OOD / OOD means (FRAMES-VQA, arXiv 2505.21755: unweighted means of per-set accuracies), predictions in the VQA
result format, per-question scores for paired comparisons, and the scoring of a result file made elsewhere.

Output folder: ``report.json`` and ``report.md``; ``predictions/<set>.json`` (``[{"question_id", "answer"}]``, what
the official evaluator reads); ``scores/<set>.json`` (``{question_id: accuracy}``); with ``--shift``,
``shift/<set>.json`` (every question's distances, ``eval_suites.vqa_analysis``).

VQA is a task of the evaluation engine (``eval_suites.engine``): its suites ``id``, ``ood:<set>``, ``adv:<attack>``
and ``shift`` are registered for ``task="vqa"``, run by the same ``run_suites`` / ``evaluate`` (``grace eval --task
vqa``), with the engine's attack registry and rank gathering (``distributed.merge_records``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from grace_plugin.errors import GraceError, UsageError, read_json
from grace_plugin.tensor_io import atomic_write_text
from grace_plugin.vqa.accuracy import group_mean, question_accuracy, summarise_scores

from .engine import EvalTask, register_eval_task, register_suite
from .vqa_summary import report_markdown

__all__ = ["FRAMES_GROUPS", "set_group", "load_vqa_model", "predict_set", "attack_set", "score_predictions",
           "vqa_report", "report_markdown", "read_prediction_file", "PredictionFileError", "VqaLoaded"]

# FRAMES-VQA's nine OOD sets and their groups (arXiv 2505.21755; github.com/chengyuehuang511/FRAMES-VQA README)
FRAMES_GROUPS = {"vqav2": "id", "iv-vqa": "near", "cv-vqa": "near", "vqa-rephrasings": "near", "vqa-cp": "near",
                 "vqa-ce": "near", "advqa": "near", "textvqa": "far", "vizwiz": "far", "ok-vqa": "far"}


class PredictionFileError(GraceError, ValueError):
    """A result file that does not answer exactly a set's questions; the message names the file."""


def set_group(name: str, shards, is_id: bool) -> str:
    """``id`` for the --data set; else the group its vqa.json declares, else FRAMES-VQA's group of its name; an OOD
    set of unknown group is refused (the means would silently rest on a guess)."""
    if is_id:
        return "id"
    group = (shards.meta.get("info") or {}).get("group") or FRAMES_GROUPS.get(name.lower())
    if group not in ("near", "far"):
        raise UsageError(f"--ood {name}: its group (near or far) is unknown; convert it with --group near|far or "
                         f"name it as FRAMES-VQA does ({', '.join(k for k, g in FRAMES_GROUPS.items() if g != 'id')})")
    return group


def load_vqa_model(spec: str, device, id_records: list[dict] | None = None, min_count: int = 9):
    """``(model, encoder, description, pre-trained CLIP)``: a VQA run folder (data.task=vqa; its ``--init`` is the
    pre-trained CLIP), a registered VQA model's name (``registry.vqa_entries``), or a CLIP folder /
    ``NAME:PRETRAINED`` as the zero-shot answer scorer over the answers of ``id_records`` given at least
    ``min_count`` times."""
    from grace_plugin.models.clip import load_clip
    from grace_plugin.vqa.data import answer_vocabulary
    from grace_plugin.vqa.backbones import backbone_for
    from grace_plugin.vqa.model import QuestionEncoder

    from registry.vqa_entries import load_vqa_entry, load_vqa_run, vqa_entry

    p = Path(spec)
    if (p / "checkpoint.json").is_file():
        model, meta, encoder = load_vqa_run(p, device)
        return model, encoder, f"run {p} ({meta.get('recipe')})", meta.get("init")
    if not p.exists() and vqa_entry(spec) is not None:  # a name registered by `grace register` (registry.vqa_entries)
        model, meta, encoder = load_vqa_entry(spec, device)
        return model, encoder, f"{spec} ({meta.get('recipe')})", meta.get("init")
    bundle = load_clip(spec)
    backbone = backbone_for(bundle)
    answers: list[str] = []
    if backbone.uses_vocabulary:
        answers = answer_vocabulary(id_records or [], min_count)
        if not answers:
            raise UsageError(f"--answers-min-count {min_count}: no answer of the --data set is given that often")
    what = f"{len(answers)} answers" if backbone.uses_vocabulary else "generative, greedy"
    return (backbone.zero_shot(bundle, answers).to(device), QuestionEncoder(bundle, device),
            f"zero-shot {spec} ({what})", spec)


@torch.no_grad()
def predict_set(model, encoder, urls: list[str], batch_size: int, device) -> tuple[list[dict], dict]:
    """``([{"question_id", "answer", "answers", "answer_type", "question_type"}], skipped)`` for every readable
    question of a set, in shard order. Under ``torchrun`` each rank predicts its own batches
    (``make_eval_loader``) and the per-batch records are gathered (``distributed.merge_records``): every rank holds
    the one-process result."""
    from .distributed import merge_records

    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.transforms import eval_transform
    from grace_plugin.vqa.data import VqaTarget
    from grace_plugin.vqa.model import bound

    records = []
    loader = make_eval_loader(urls, eval_transform(model.pretrained_cfg), batch_size, target=VqaTarget(model.answers))
    for b in loader:
        rows = []
        if b["image"].numel():
            with bound(encoder.context(model, b["question"])):
                pred = model.predict_answers(b["image"].to(device))
            rows = [{**rec, "answer": a} for a, rec in zip(pred, b["record"])]
        records.append({"key": b["key"], "rows": rows, "skipped": b.get("skipped", {})})
    rows, skipped = [], {}
    for r in merge_records(records):
        rows += r["rows"]
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return rows, skipped


def _attacked(model, ctx, x: torch.Tensor, run) -> tuple[list[str], list[str]]:
    """(clean answers, answers on the attacked images) of one batch whose questions are ``ctx``. The attack's label
    is the model's own clean answer (``model.attack_target``: an answer index, or for a generative model label 0 of
    its answer's log-likelihood output), so every row starts "correct" and AutoAttack's APGD-CE (one restart)
    attacks the batch as a whole; an attack that re-runs on a subset of the rows (a second attack, a restart) is
    redone one question at a time, the only batch whose subsets keep their questions."""
    from grace_plugin.vqa.model import UnboundQuestions, bound

    with bound(ctx):
        clean, labels, actx = model.attack_target(x)
    actx = actx or ctx
    with bound(actx):
        try:
            x_adv = run(x, labels)
        except UnboundQuestions:
            x_adv = None
    if x_adv is None:
        parts = []
        for i in range(x.shape[0]):
            with bound(actx[i:i + 1]):
                parts.append(run(x[i:i + 1], labels[i:i + 1]))
        x_adv = torch.cat(parts)
    with bound(ctx), torch.no_grad():
        return clean, model.predict_answers(x_adv)


def attack_set(model, encoder, urls: list[str], attack: str, eps: float, n: int, device, seed: int = 0,
               batch_size: int = 64, state_path: Path | None = None, signature: dict | None = None) -> list[dict]:
    """Pixel-space robustness on the first ``n`` questions of a set (shard order): the registered ``attack``
    (``eval_suites.attacks``, e.g. APGD-CE) on the image, l_inf ``eps``, against the model's clean answer (it
    maximises the loss of what the model said), then the answer on the attacked image, scored by the VQA accuracy
    (``_attacked``). Under torchrun the batches are shared by the ranks and gathered. Resumable as the classification
    attack is (``evaluate.BatchState``): with ``state_path``, a rerun with the same ``signature`` reuses the finished
    batches."""
    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.transforms import eval_transform
    from grace_plugin.vqa.data import VqaTarget

    from .attacks import create_attack
    from .distributed import merge_records
    from .evaluate import BatchState

    records, state = [], BatchState(state_path, dict(signature or {}, attack=attack, eps=eps, n=n, seed=seed,
                                                     batch_size=batch_size))
    loader = make_eval_loader(urls, eval_transform(model.pretrained_cfg), batch_size,
                              target=VqaTarget(model.answers), limit=n)
    for b in loader:
        name, rows = ":".join(map(str, b["key"])), []
        done = state.get(name)
        if done is not None and [r["question_id"] for r in done["rows"]] == [r["question_id"] for r in b["record"]]:
            rows = done["rows"]
        elif b["image"].numel():
            clean, adv = _attacked(model, encoder.context(model, b["question"]), b["image"].to(device),
                                   create_attack(attack, model, eps, seed=seed))
            rows = [{**rec, "answer": a, "clean_answer": c} for a, c, rec in zip(adv, clean, b["record"])]
        records.append({"key": b["key"], "rows": rows})
        state.put(name, records[-1])
    return [{**r, "score": question_accuracy(r["answer"], r["answers"])} for rec in merge_records(records)
            for r in rec["rows"]]


def score_predictions(predictions: list[dict], records: list[dict], where: str) -> list[dict]:
    """Score ``[{"question_id", "answer"}]`` against a set's ``records`` (the evaluator's ``loadRes`` check: the
    predictions answer exactly the set's questions)."""
    if not isinstance(predictions, list) or not all(isinstance(p, dict) and "question_id" in p
                                                    and isinstance(p.get("answer"), str) for p in predictions):
        raise PredictionFileError(f"{where}: expected [{{\"question_id\": ..., \"answer\": str}}, ...]")
    by_id = {str(p["question_id"]): p["answer"] for p in predictions}
    ids = {str(r["question_id"]) for r in records}
    if set(by_id) != ids:
        missing, extra = ids - set(by_id), set(by_id) - ids
        raise PredictionFileError(f"{where}: does not answer exactly the set's questions ({len(missing)} missing, "
                                  f"{len(extra)} not in the set)")
    return [{**r, "answer": by_id[str(r["question_id"])],
             "score": question_accuracy(by_id[str(r["question_id"])], r["answers"])} for r in records]


def vqa_report(model: str, sets: dict[str, dict], adversarial: dict | None = None) -> dict:
    """``sets``: name -> ``{"group", "rows" (scored), "skipped"}``; the per-set summaries and the group means;
    ``adversarial``: ``{"attack", "eps", "set", "rows"}`` (pixel-space robustness, reported apart from AdVQA-style
    sets, whose questions are adversarial, not their pixels)."""
    out = {"model": model, "metric": "VQA accuracy (official evaluator, github.com/GT-Vision-Lab/VQA), percent; "
           "95% t interval over questions; group means unweighted over sets (normal interval)", "sets": {}}
    for name, s in sets.items():
        rows = s["rows"]
        summ = summarise_scores([r["score"] for r in rows], [r.get("answer_type") or "-" for r in rows],
                                [r.get("question_type") or "-" for r in rows])
        out["sets"][name] = {"group": s["group"], **summ, "skipped": s.get("skipped", {})}
        if "classification" in s:
            out["sets"][name]["classification"] = s["classification"]
    for group in ("id", "near", "far"):
        out[group] = group_mean([v for v in out["sets"].values() if v["group"] == group])
    out["ood"] = group_mean([v for v in out["sets"].values() if v["group"] in ("near", "far")])
    if adversarial is not None:
        rows = adversarial["rows"]
        out["adversarial"] = {k: adversarial[k] for k in ("attack", "eps", "set")} | summarise_scores(
            [r["score"] for r in rows])
    return out


def read_prediction_file(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--predictions {p}: file does not exist")
    return read_json(p, PredictionFileError)


# --- VQA on the evaluation engine (eval_suites.engine): the task's loader, suites, report and writer -------------

@dataclass
class VqaLoaded:
    """What the VQA suites take: the model and its question encoder (None: result files are scored), a description,
    and the pre-trained CLIP (a run's ``--init``: the uni-modal concepts' and ClipMatch's reference)."""

    name: str
    model: object | None = None
    encoder: object | None = None
    init: str | None = None


def _vqa_set(ctx, name: str, path, is_id: bool):
    """``(ShardSet, group)`` of a set, opened once per evaluation; a set that is not a VQA set is refused."""
    from grace_plugin.data.shards import open_shard_set

    key = ("vqa-set", name)
    if key not in ctx.cache:
        s = open_shard_set(path)
        if s.layout != "vqa":
            raise UsageError(f"{path}: a {s.layout} set, not a VQA set (grace shards convert --format frames|coco-vqa)")
        ctx.cache[key] = (s, set_group(name, s, is_id))
    return ctx.cache[key]


def _set_args(ctx, suite: str) -> tuple[str, Path, bool]:
    """``(name, folder, is ID)`` of the set a clean suite (``id`` or ``ood:SET``) scores."""
    if suite == "id":
        if ctx.id_set is None:
            raise UsageError("--task vqa needs --data NAME=DIR (the ID set)")
        return ctx.id_set[0], Path(ctx.id_set[1]), True
    name, path = ctx.resolve_set(suite.partition(":")[2])
    # one name, one set: its predictions, scores and group are keyed by it
    paths = ctx.cache.setdefault(("vqa-set-paths",), {})
    if (ctx.id_set and name == ctx.id_set[0]) or paths.setdefault(name, str(path)) != str(path):
        raise UsageError(f"set name {name!r} given twice; name them NAME=DIR")
    return name, path, False


def _clean_suites(ctx) -> list[str]:
    return [n for n in ctx.suite_names if n == "id" or n.startswith("ood:")]


def _prediction_file(ctx, name: str):
    files = ctx.predictions
    if None in files:
        if len(files) > 1 or len(_clean_suites(ctx)) != 1:
            raise UsageError("--predictions FILE without SET= needs exactly one set; name them SET=FILE")
        return files[None]
    return files.get(name)


def _scored(loaded: VqaLoaded, ctx, suite: str) -> dict:
    """A set's scored questions (memoised: the ``shift`` suite reads them too): ``{"name", "path", "group",
    "rows", "skipped", "classification"?}``; ``rows`` None where result files are scored and none is for this set."""
    name, path, is_id = _set_args(ctx, suite)
    key = ("vqa-scored", name)
    if key in ctx.cache:
        return ctx.cache[key]
    from grace_plugin.vqa.data import read_records

    s, group = _vqa_set(ctx, name, path, is_id)
    out = {"name": name, "path": str(path), "group": group, "rows": None, "skipped": {}}
    if loaded.model is None:
        f = _prediction_file(ctx, name)
        if f is not None:
            out["rows"] = score_predictions(read_prediction_file(f), read_records(s.urls), str(f))
    else:
        rows, out["skipped"] = predict_set(loaded.model, loaded.encoder, s.urls, ctx.batch_size, ctx.device)
        out["rows"] = [{**r, "score": question_accuracy(r["answer"], r["answers"])} for r in rows]
    info = (s.meta.get("info") or {}).get("classification")
    if info and out["rows"] is not None:  # a set recast from classification: exact match and ClipMatch
        from grace_plugin.vqa.classification import classification_scores

        out["classification"] = classification_scores(
            [r["answer"] for r in out["rows"]], [int(r["label"]) for r in out["rows"]], info["classes"],
            _reference_clip(loaded, ctx), info["templates"])
    ctx.cache[key] = out
    return out


def _reference_clip(loaded: VqaLoaded, ctx):
    """The CLIP that maps answers to class names (ClipMatch): ``--reference``, else the run's ``--init``; None
    (exact match only) without either."""
    clip = ctx.reference or loaded.init
    if not clip:
        return None
    if ("vqa-clip", clip) not in ctx.cache:
        from grace_plugin.models.clip import load_clip

        ctx.cache[("vqa-clip", clip)] = load_clip(clip)
    return ctx.cache[("vqa-clip", clip)]


def _clean_result(loaded: VqaLoaded, ctx, suite: str) -> dict:
    sc = _scored(loaded, ctx, suite)
    res = {"kind": "id" if suite == "id" else "ood", "dataset": sc["name"], "path": sc["path"], "group": sc["group"]}
    if sc["rows"] is None:
        return res | {"scored": False, "reason": "no --predictions file for this set"}
    summ = summarise_scores([r["score"] for r in sc["rows"]])
    return res | {k: summ[k] for k in ("accuracy", "ci95", "n")} | {"skipped": sc["skipped"]}


@register_suite("id", task="vqa")
def _suite_id(loaded: VqaLoaded, ctx, arg=None) -> dict:
    """VQA accuracy (the official evaluator's) on the ID set, with its per-question scores and predictions."""
    return _clean_result(loaded, ctx, "id")


@register_suite("ood", takes_arg=True, task="vqa")
def _suite_ood(loaded: VqaLoaded, ctx, arg: str) -> dict:
    """VQA accuracy on an OOD set (its group, near or far: its vqa.json's, else FRAMES-VQA's for its name)."""
    return _clean_result(loaded, ctx, f"ood:{arg}")


def _encoder_id(encoder) -> str:
    """The question encoder's identity for a resume state: its text tower's weights (a CoCa reads its own)."""
    from .evaluate import model_sha256

    clip = getattr(encoder, "clip", None)
    return model_sha256(clip) if clip is not None else type(encoder).__name__


@register_suite("adv", takes_arg=True, task="vqa")
def _suite_adv(loaded: VqaLoaded, ctx, arg: str) -> dict:
    """Pixel-space robustness: the attack on the image of the first --n-adv ID questions, against the clean answer."""
    from .context import files_signature
    from .evaluate import model_sha256

    name, path, _ = _set_args(ctx, "id")
    s, _ = _vqa_set(ctx, name, path, True)
    state = None if ctx.out_dir is None else Path(ctx.out_dir) / "state" / f"vqa-adv-{arg}.json"
    sig = None if state is None else {  # what the result was computed from: a resume state must match all of it
        "weights_sha256": model_sha256(loaded.model), "questions": _encoder_id(loaded.encoder),
        "data": files_signature(s.urls)}
    rows = attack_set(loaded.model, loaded.encoder, s.urls, arg, ctx.eps, ctx.n_adv, ctx.device, ctx.seed,
                      ctx.batch_size, state, sig)
    ctx.cache[("vqa-adv", arg)] = rows
    return {"kind": "adv", "attack": arg, "eps": ctx.eps, "set": name,
            **summarise_scores([r["score"] for r in rows])}


@register_suite("shift", task="vqa")
def _suite_shift(loaded: VqaLoaded, ctx, arg=None) -> dict:
    """Shift per modality (Mahalanobis to ID train; FRAMES-VQA) and modality importance of every set evaluated."""
    from .vqa_analysis import analyse

    if loaded.model is None:
        raise UsageError("suite 'shift' needs a --model (it embeds the questions), not --predictions")
    scored = [_scored(loaded, ctx, n) for n in _clean_suites(ctx)]
    if not scored:
        raise UsageError("suite 'shift' needs the sets: --data NAME=DIR and --ood NAME=DIR")
    shards = {sc["name"]: _vqa_set(ctx, sc["name"], sc["path"], sc["group"] == "id") for sc in scored}
    accuracy = {sc["name"]: summarise_scores([r["score"] for r in sc["rows"]])["accuracy"] for sc in scored}
    analysis, samples = analyse(loaded.model, loaded.encoder, ctx.reference or loaded.init, shards, accuracy,
                                ctx.shift, ctx.device, ctx.batch_size)
    ctx.cache[("vqa-shift-samples",)] = samples
    return {"kind": "shift", **analysis}


def _worst_case(per_attack: dict[str, list[dict]]) -> list[dict]:
    """Per question, the lowest score over the attacks (all ran on the same first --n-adv questions)."""
    runs = list(per_attack.values())
    if len(runs) == 1:
        return runs[0]
    out = []
    for rows in zip(*runs):
        assert len({str(r["question_id"]) for r in rows}) == 1, "the attacks ran on different questions"
        out.append(min(rows, key=lambda r: r["score"]))
    return out


def _report(loaded: VqaLoaded, results: dict, ctx) -> dict:
    from .engine import context_config

    if loaded.model is None:
        scored_names = {r["dataset"] for r in results.values() if r["kind"] in ("id", "ood")}
        unknown = set(ctx.predictions) - scored_names - {None}
        if unknown:
            raise UsageError(f"--predictions {sorted(map(str, unknown))[0]}=...: no such set among --data/--ood")
    sets = {}
    for r in results.values():
        if r["kind"] in ("id", "ood") and r.get("scored", True):
            sc = ctx.cache[("vqa-scored", r["dataset"])]
            sets[r["dataset"]] = {k: sc[k] for k in ("group", "rows", "skipped", "classification") if k in sc}
    attacked = {r["attack"]: ctx.cache[("vqa-adv", r["attack"])] for r in results.values() if r["kind"] == "adv"}
    adversarial = None
    if attacked:
        first = next(r for r in results.values() if r["kind"] == "adv")
        adversarial = {"attack": first["attack"] if len(attacked) == 1 else
                       f"worst case of {', '.join(attacked)}", "eps": first["eps"], "set": first["set"],
                       "rows": _worst_case(attacked)}
    rep = vqa_report(loaded.name, sets, adversarial)
    shift = next((r for r in results.values() if r["kind"] == "shift"), None)
    if shift is not None:
        rep["analysis"] = {k: v for k, v in shift.items() if k != "kind"}
    rep["config"] = context_config(ctx)
    return rep


def _write(out: str | Path, rep: dict, ctx) -> Path:
    """``report.json``, ``report.md``, ``predictions/<set>.json`` (the VQA result format), ``scores/<set>.json``
    (per-question accuracy) and, with the ``shift`` suite, ``shift/<set>.json`` (every question's distances)."""
    out = Path(out)
    for name in rep["sets"]:
        rows = ctx.cache[("vqa-scored", name)]["rows"]
        atomic_write_text(out / "predictions" / f"{name}.json",
                          json.dumps([{"question_id": r["question_id"], "answer": r["answer"]} for r in rows]) + "\n")
        atomic_write_text(out / "scores" / f"{name}.json",
                          json.dumps({str(r["question_id"]): r["score"] for r in rows}) + "\n")
    for name, per in (ctx.cache.get(("vqa-shift-samples",)) or {}).items():
        atomic_write_text(out / "shift" / f"{name}.json", json.dumps(per) + "\n")
    atomic_write_text(out / "report.json", json.dumps(rep, indent=2) + "\n")
    atomic_write_text(out / "report.md", report_markdown(rep))
    return out / "report.md"


def _load(spec: str | None, ctx) -> VqaLoaded:
    """A VQA run, or a CLIP as the zero-shot scorer over the ID set's answers; None with ``ctx.predictions``."""
    from grace_plugin.vqa.data import read_records

    if ctx.predictions:
        if spec is not None:
            raise UsageError("--predictions scores result files: give no --model with it")
        if any(n.startswith("adv:") for n in ctx.suite_names):
            raise UsageError("--attack needs a --model to attack, not --predictions")
        return VqaLoaded("predictions " + ", ".join(str(p) for p in ctx.predictions.values()))
    if spec is None:
        raise UsageError("--model is required (only --task vqa --predictions scores result files without one)")
    name, path, _ = _set_args(ctx, "id")
    id_set, _ = _vqa_set(ctx, name, path, True)
    model, encoder, desc, init = load_vqa_model(spec, ctx.device, read_records(id_set.urls), ctx.answers_min_count)
    return VqaLoaded(desc, model, encoder, init)


def _id_scores(rep: dict, name: str) -> tuple:
    """VQA accuracy of the ID set clean and on the attacked images; a VQA model reports no feature spread."""
    return rep["sets"][name]["accuracy"], (rep.get("adversarial") or {}).get("accuracy"), None


register_eval_task(EvalTask("vqa", _load, _report, _write, report_markdown, _id_scores))
