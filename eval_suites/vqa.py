"""VQA evaluation: per-set VQA accuracy (the official metric, ``grace_plugin.vqa.accuracy``), ID / near-OOD /
far-OOD / OOD means (FRAMES-VQA, arXiv 2505.21755: unweighted means of per-set accuracies), predictions in the VQA
result format, per-question scores for paired comparisons, and the scoring of a result file made elsewhere.

Output folder: ``report.json`` and ``report.md``; ``predictions/<set>.json`` (``[{"question_id", "answer"}]``, what
the official evaluator reads); ``scores/<set>.json`` (``{question_id: accuracy}``); with ``--shift``,
``shift/<set>.json`` (every question's distances, ``eval_suites.vqa_analysis``).

This is VQA's own path beside the classification suite engine (``eval_suites.engine``): it shares the engine's
loader, attack registry and rank gathering (``distributed.merge_records``), not its suite registry or report.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from grace_plugin.errors import GraceError, UsageError, read_json
from grace_plugin.tensor_io import atomic_write_text
from grace_plugin.vqa.accuracy import group_mean, question_accuracy, summarise_scores

__all__ = ["FRAMES_GROUPS", "set_group", "load_vqa_model", "predict_set", "attack_set", "score_predictions",
           "vqa_report", "report_markdown", "write_vqa_outputs", "PredictionFileError", "run_vqa_eval"]

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
    pre-trained CLIP), or a CLIP folder / ``NAME:PRETRAINED`` as the zero-shot answer scorer over the answers of
    ``id_records`` given at least ``min_count`` times."""
    from grace_plugin.checkpoint import load_run
    from grace_plugin.models.clip import bundle_from_text_state, load_clip
    from grace_plugin.tensor_io import read_tensors
    from grace_plugin.vqa.data import answer_vocabulary
    from grace_plugin.vqa.model import QuestionEncoder, zero_shot_vqa_from_clip

    p = Path(spec)
    if (p / "checkpoint.json").is_file():
        model, meta = load_run(p, device=device)
        if meta.get("task") != "vqa":
            raise UsageError(f"--model {spec}: a {meta.get('task', 'classification')} run, not a VQA run")
        clip = meta["clip"]
        bundle = bundle_from_text_state(clip["model_name"], clip["model_cfg"], read_tensors(p / "text.safetensors"))
        return model, QuestionEncoder(bundle, device), f"run {p} ({meta.get('recipe')})", meta.get("init")
    bundle = load_clip(spec)
    answers = answer_vocabulary(id_records or [], min_count)
    if not answers:
        raise UsageError(f"--answers-min-count {min_count}: no answer of the --data set is given that often")
    return (zero_shot_vqa_from_clip(bundle, answers).to(device), QuestionEncoder(bundle, device),
            f"zero-shot {spec} ({len(answers)} answers)", spec)


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
                pred = model(b["image"].to(device)).argmax(1).tolist()
            rows = [{**rec, "answer": model.answers[i]} for i, rec in zip(pred, b["record"])]
        records.append({"key": b["key"], "rows": rows, "skipped": b.get("skipped", {})})
    rows, skipped = [], {}
    for r in merge_records(records):
        rows += r["rows"]
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return rows, skipped


def _attacked(model, ctx, x: torch.Tensor, run) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean answers, answers on the attacked images) of one batch whose questions are ``ctx``; the attack's label
    is the clean answer, so every row starts "correct" and AutoAttack's APGD-CE (one restart) attacks the batch as a
    whole; an attack that re-runs on a subset of the rows (a second attack, a restart) is redone one question at a
    time, the only batch whose subsets keep their questions."""
    from grace_plugin.vqa.model import UnboundQuestions, bound

    with bound(ctx):
        with torch.no_grad():
            clean = model(x).argmax(1)
        try:
            x_adv = run(x, clean)
        except UnboundQuestions:
            x_adv = None
    if x_adv is None:
        parts = []
        for i in range(x.shape[0]):
            with bound(ctx[i:i + 1]):
                parts.append(run(x[i:i + 1], clean[i:i + 1]))
        x_adv = torch.cat(parts)
    with bound(ctx), torch.no_grad():
        return clean, model(x_adv).argmax(1)


def attack_set(model, encoder, urls: list[str], attack: str, eps: float, n: int, device, seed: int = 0,
               batch_size: int = 64) -> list[dict]:
    """Pixel-space robustness on the first ``n`` questions of a set (shard order): the registered ``attack``
    (``eval_suites.attacks``, e.g. APGD-CE) on the image, l_inf ``eps``, against the model's clean answer (it
    maximises the loss of what the model said), then the answer on the attacked image, scored by the VQA accuracy
    (``_attacked``). Under torchrun the batches are shared by the ranks and gathered."""
    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.transforms import eval_transform
    from grace_plugin.vqa.data import VqaTarget

    from .attacks import create_attack
    from .distributed import merge_records

    records = []
    loader = make_eval_loader(urls, eval_transform(model.pretrained_cfg), batch_size,
                              target=VqaTarget(model.answers), limit=n)
    for b in loader:
        rows = []
        if b["image"].numel():
            clean, adv = _attacked(model, encoder.context(model, b["question"]), b["image"].to(device),
                                   create_attack(attack, model, eps, seed=seed))
            rows = [{**rec, "answer": model.answers[i], "clean_answer": model.answers[c]}
                    for i, c, rec in zip(adv.tolist(), clean.tolist(), b["record"])]
        records.append({"key": b["key"], "rows": rows})
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


def _fmt(m: dict) -> str:
    if m.get("accuracy") is None:
        return "-"
    ci = m.get("ci95")
    return f"{m['accuracy']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def report_markdown(rep: dict) -> str:
    lines = [f"# VQA evaluation: {rep['model']}", "", rep["metric"], "", "| set | group | n | VQA accuracy [95%] |",
             "|---|---|---:|---|"]
    for name, s in rep["sets"].items():
        lines.append(f"| {name} | {s['group']} | {s['n']} | {_fmt(s)} |")
    adv = rep.get("adversarial")
    head, cells = "| ID | near OOD | far OOD | OOD |", [_fmt(rep[g]) for g in ("id", "near", "far", "ood")]
    if adv:
        head += f" Adv ({adv['attack']}, eps {adv['eps']:.4g}, first {adv['n']} of {adv['set']}) |"
        cells.append(_fmt(adv))
    lines += ["", head, "|---" * len(cells) + "|", "| " + " | ".join(cells) + " |", ""]
    cls = {n: v["classification"] for n, v in rep["sets"].items() if v.get("classification")}
    if cls:
        lines += ["Classification recast as VQA (percent): exact match, ClipMatch@1, @5", "",
                  "| set | n | exact match | ClipMatch@1 | ClipMatch@5 |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {v['n']} | " + " | ".join("-" if v.get(k) is None else f"{v[k]:.2f}" for k in
                                                      ("exact_match", "clip_match_1", "clip_match_5")) + " |"
                  for n, v in cls.items()] + [""]
    if rep.get("analysis"):
        lines += _analysis_markdown(rep["analysis"])
    return "\n".join(lines)


def _analysis_markdown(an: dict) -> list[str]:
    from .vqa_analysis import CONCEPTS

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["## Shift per modality", "", f"Mean Mahalanobis distance to ID train ({an['n_fit']} questions; "
             f"uni-modal concepts from {an['reference']}); higher is farther.", "",
             "| set | " + " | ".join(CONCEPTS) + " |", "|---" * (len(CONCEPTS) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f(v.get(c)) for c in CONCEPTS) + " |" for n, v in an["shift"].items()]
    lines += ["", "| concept | Pearson (shift, accuracy) | Spearman | sets |", "|---|---|---|---|"]
    lines += [f"| {c} | {f(v['pearson'])} | {f(v['spearman'])} | {v['sets']} |"
              for c, v in an["shift_vs_accuracy"].items()]
    pairs = sorted({p for v in an["concept_pairs"].values() for p in v})
    lines += ["", "Per-sample Pearson between concept distances:", "", "| set | " + " | ".join(pairs) + " |",
              "|---" * (len(pairs) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f(v.get(p)) for p in pairs) + " |" for n, v in an["concept_pairs"].items()]
    lines += ["", "## Modality importance", "", "Drop of the predicted answer's probability without the image "
              "(the ID mean image) and without the question (empty), and the question's share (median [quartiles]).",
              "", "| set | image | question | question share |", "|---|---|---|---|"]
    for n, v in an["modality_importance"].items():
        lines.append(f"| {n} | " + " | ".join(f"{v[k]['median']:.3f} [{v[k]['q25']:.3f}, {v[k]['q75']:.3f}]"
                                              for k in ("image", "question", "question_share")) + " |")
    return lines + [""]


def write_vqa_outputs(out: str | Path, rep: dict, sets: dict[str, dict]) -> Path:
    out = Path(out)
    for name, s in sets.items():
        atomic_write_text(out / "predictions" / f"{name}.json",
                          json.dumps([{"question_id": r["question_id"], "answer": r["answer"]} for r in s["rows"]])
                          + "\n")
        atomic_write_text(out / "scores" / f"{name}.json",
                          json.dumps({str(r["question_id"]): r["score"] for r in s["rows"]}) + "\n")
    atomic_write_text(out / "report.json", json.dumps(rep, indent=2) + "\n")
    atomic_write_text(out / "report.md", report_markdown(rep))
    return out / "report.md"


def read_prediction_file(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--predictions {p}: file does not exist")
    return read_json(p, PredictionFileError)


def _open_sets(data: str | None, ood: list[str]) -> dict:
    from grace_plugin.data.shards import open_shard_set

    from .context import split_named

    if not data:
        raise UsageError("--task vqa needs --data NAME=DIR (the ID set)")
    ood = [part for o in ood for part in str(o).split(",") if part]  # --ood A=DIR,B=DIR as the classification --ood
    named = [(*split_named(data, "--data"), True)] + [(*split_named(o, "--ood"), False) for o in ood]
    shards = {}
    for name, path, is_id in named:
        name = name or Path(path).name
        if name in shards:
            raise UsageError(f"set name {name!r} given twice; name them NAME=DIR")
        s = open_shard_set(path)
        if s.layout != "vqa":
            raise UsageError(f"{path}: a {s.layout} set, not a VQA set (grace shards convert --format frames|coco-vqa)")
        shards[name] = (s, set_group(name, s, is_id))
    return shards


def _scored_files(shards: dict, predictions: list[str]) -> dict:
    from grace_plugin.vqa.data import read_records

    from .context import split_named

    files = dict(split_named(p, "--predictions") for p in predictions)
    if set(files) == {None} and len(shards) == 1:
        files = {next(iter(shards)): files[None]}
    unknown = set(files) - set(shards)
    if unknown:
        raise UsageError(f"--predictions {sorted(map(str, unknown))[0]}=...: no such set among --data/--ood")
    return {name: {"group": shards[name][1], "rows": score_predictions(read_prediction_file(f),
                                                                        read_records(shards[name][0].urls), str(f))}
            for name, f in files.items()}


def _classification_scores(shards: dict, sets: dict, clip: str | None) -> None:
    """Exact match and ClipMatch for the sets recast from classification (their vqa.json lists the classes)."""
    from grace_plugin.vqa.classification import classification_scores

    bundle = None
    for name, (s, _) in shards.items():
        info = (s.meta.get("info") or {}).get("classification")
        if not info or name not in sets:
            continue
        if bundle is None and clip:
            from grace_plugin.models.clip import load_clip

            bundle = load_clip(clip)
        rows = sets[name]["rows"]
        sets[name]["classification"] = classification_scores(
            [r["answer"] for r in rows], [int(r["label"]) for r in rows], info["classes"], bundle, info["templates"])


def run_vqa_eval(model: str, data: str | None, ood: list[str], out: str | Path, predictions: list[str] = (),
                 device: str = "auto", batch_size: int = 128, answers_min_count: int = 9, attack: str | None = None,
                 eps: float | str = 4 / 255, n_adv: int = 500, seed: int = 0, shift=None,
                 reference: str | None = None) -> str:
    """``grace eval --task vqa``: score ``model`` (a VQA run, or a CLIP as the zero-shot scorer) or the result
    files ``predictions`` (``[SET=]FILE``) on the ID set ``data`` and the OOD sets ``ood`` (``NAME=DIR``); write
    the outputs to ``out`` and return the report's markdown (rank 0; the other ranks of a torchrun get "").
    ``attack``: also the pixel-space robustness of the first ``n_adv`` ID questions (``attack_set``); ``shift``
    (``vqa_analysis.ShiftOptions``): also the shift per modality and the modality importance (``vqa_analysis``).
    A set recast from classification (``grace_plugin.vqa.classification``) also gets exact match and ClipMatch
    (with the CLIP ``reference``, default the run's ``--init``; exact match only without one)."""
    from .attacks import parse_eps

    from grace_plugin.runtime import init_distributed, resolve_device
    from grace_plugin.vqa.data import read_records

    if attack and predictions:
        raise UsageError("--attack needs a --model to attack, not --predictions")
    shards = _open_sets(data, ood)
    rank, _ = init_distributed()  # (a no-op for one process) before choosing this rank's device
    init = None
    if predictions:
        sets = _scored_files(shards, list(predictions))
        desc = "predictions " + ", ".join(str(p) for p in predictions)
    else:
        dev = resolve_device(device)
        id_set = next(s for s, g in shards.values() if g == "id")
        net, encoder, desc, init = load_vqa_model(model, dev, read_records(id_set.urls), answers_min_count)
        sets = {}
        for name, (s, group) in shards.items():
            rows, skipped = predict_set(net, encoder, s.urls, batch_size, dev)
            sets[name] = {"group": group, "skipped": skipped,
                          "rows": [{**r, "score": question_accuracy(r["answer"], r["answers"])} for r in rows]}
    adversarial = None
    if attack:
        id_name, (id_set, _) = next((k, v) for k, v in shards.items() if v[1] == "id")
        eps = parse_eps(eps)
        adversarial = {"attack": attack, "eps": eps, "set": id_name,
                       "rows": attack_set(net, encoder, id_set.urls, attack, eps, n_adv, dev, seed, batch_size)}
    _classification_scores(shards, sets, reference or init)
    rep = vqa_report(desc, sets, adversarial)
    samples = None
    if shift is not None:
        from .vqa_analysis import analyse

        rep["analysis"], samples = analyse(net, encoder, shift.reference or init, shards, rep, shift, dev, batch_size)
    if rank != 0:  # every rank holds the same result; one writes it
        return ""
    write_vqa_outputs(out, rep, sets)
    if samples is not None:
        for name, per in samples.items():
            atomic_write_text(Path(out) / "shift" / f"{name}.json", json.dumps(per) + "\n")
    return report_markdown(rep)
