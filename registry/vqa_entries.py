"""VQA models by name: a fine-tuned VQA run published as ``<weights dir>/vqa/<NAME>/`` and loaded back by NAME.

``grace register RUN --name NAME`` on a VQA run (``checkpoint.json`` ``"task": "vqa"``) writes, as a unit (a
temporary folder renamed into place):

* ``model.safetensors``, ``text.safetensors``, ``checkpoint.json``: the run's own files (the weights' sha256 checked
  against the run's record), so the entry loads through the same code as the run folder;
* ``card.json``: the machine-readable card: name, task, base CLIP and ``--init``, recipe, steps, the answer
  vocabulary's size, both files' sha256, the source run, and with ``--report`` the VQA evaluation it was given
  (per set, the group means, pixel robustness);
* ``README.md``: the model card for people (what it is, how it was trained, its measured numbers, how to load it),
  as a Hugging Face model card is the README of its repository.

RobustBench and timm name image classifiers (``registry.naming``); a VQA model is neither, so its name is the user's
and is resolved by ``grace eval --task vqa --model NAME`` (``eval_suites.vqa.load_vqa_model``) and by
``load_vqa_entry``. The weights dir is the classifiers' (``$GRACE_WEIGHTS_DIR``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from grace_plugin.checkpoint import load_run, load_run_meta
from grace_plugin.errors import read_json
from grace_plugin.tensor_io import atomic_write_text, sha256_file
from grace_plugin.vqa.accuracy import accuracy_cell

from .grace_models import CARD_FILE, CARD_FORMAT, TEXT_FILE, WEIGHTS_FILE, RegistryError, weights_dir
from .weights import verify_sha256

__all__ = ["register_vqa_run", "vqa_entry", "list_vqa_models", "load_vqa_entry", "load_vqa_run", "VQA_SUBDIR"]

VQA_SUBDIR = "vqa"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _base(out_dir: str | Path | None) -> Path:
    return Path(out_dir or weights_dir()).expanduser() / VQA_SUBDIR


def vqa_entry(name: str, out_dir: str | Path | None = None) -> Path | None:
    """The folder of the registered VQA model ``name``, or None."""
    if not _NAME.match(str(name)):
        return None
    folder = _base(out_dir) / name
    return folder if (folder / CARD_FILE).is_file() else None


def list_vqa_models(out_dir: str | Path | None = None) -> list[str]:
    base = _base(out_dir)
    return sorted(p.parent.name for p in base.glob(f"*/{CARD_FILE}")) if base.is_dir() else []


def _results(report_file: str | Path | None) -> dict | None:
    """The card's copy of a ``grace eval --task vqa`` report: per set (group, n, accuracy, interval), the group means,
    the pixel robustness; what was measured and where it came from."""
    if report_file is None:
        return None
    rep = read_json(Path(report_file), RegistryError)
    if not isinstance(rep, dict) or not isinstance(rep.get("sets"), dict) or "metric" not in rep:
        raise RegistryError(f"--report {report_file}: not a `grace eval --task vqa` report.json (no 'sets'/'metric')")
    keep = ("accuracy", "ci95", "n")
    out = {"source": str(Path(report_file).resolve()), "model": rep.get("model"), "metric": rep["metric"],
           "sets": {n: {"group": s.get("group")} | {k: s.get(k) for k in keep} for n, s in rep["sets"].items()},
           "means": {g: {k: (rep.get(g) or {}).get(k) for k in ("accuracy", "ci95")} for g in
                     ("id", "near", "far", "ood")}}
    if rep.get("adversarial"):
        adv = rep["adversarial"]
        out["adversarial"] = {k: adv.get(k) for k in ("attack", "eps", "set", "accuracy", "ci95", "n")}
    return out


def card_markdown(card: dict) -> str:
    """The model card for people: what the model is, how it was trained, what was measured, how to load it."""
    clip = card["clip"]
    lines = [f"# {card['name']}", "", f"A visual question answering model fine-tuned with grace-plugin: the CLIP "
             f"{clip['model_name']} image tower, its text tower encoding the question (frozen), and an answer head "
             f"over {card['answers']} answers trained on soft VQA targets (the official VQA accuracy's).", "",
             "| field | value |", "|---|---|",
             f"| task | {card['task']} |", f"| base CLIP (`--init`) | {card['init']} |",
             f"| recipe | {card['recipe']} |", f"| training data | {card['data']} |",
             f"| steps | {card['steps']} |", f"| answers | {card['answers']} |",
             f"| weights sha256 | `{card['weights_sha256']}` |", f"| text tower sha256 | `{card['text_sha256']}` |",
             ""]
    res = card.get("results")
    if res:
        lines += ["## Evaluation", "", f"{res['metric']}. From `{res['source']}` ({res['model']}).", "",
                  "| set | group | n | VQA accuracy [95%] |", "|---|---|---:|---|"]
        lines += [f"| {n} | {s['group']} | {s['n']} | {accuracy_cell(s)} |" for n, s in res["sets"].items()]
        lines += ["", "| ID | near OOD | far OOD | OOD |" + (" Adv |" if res.get("adversarial") else ""),
                  "|---|---|---|---|" + ("---|" if res.get("adversarial") else ""),
                  "| " + " | ".join(accuracy_cell(res["means"][g]) for g in ("id", "near", "far", "ood")) + " |"
                  + (f" {accuracy_cell(res['adversarial'])} |" if res.get("adversarial") else ""), ""]
        if res.get("adversarial"):
            a = res["adversarial"]
            lines += [f"Adv: {a['attack']} on the image, l_inf {a['eps']:.4g}, the first {a['n']} questions of "
                      f"{a['set']}.", ""]
    else:
        lines += ["## Evaluation", "", "Not measured when registered (`grace register ... --report E/report.json` "
                  "copies a `grace eval --task vqa` report here).", ""]
    lines += ["## Use", "", "```bash", f"grace eval --task vqa --model {card['name']} --data vqav2=DIR --out E",
              "```", "", "```python", "from registry import load_vqa_entry",
              f"model, meta, encoder = load_vqa_entry({card['name']!r})", "```", ""]
    return "\n".join(lines)


def register_vqa_run(run_dir: str | Path, name: str, out_dir: str | Path | None = None,
                     report: str | Path | None = None) -> Path:
    """Publish the VQA run ``run_dir`` as ``<out_dir or weights dir>/vqa/<name>/`` (see the module's docstring);
    an existing entry of that name is replaced only after the new one is complete."""
    run_dir = Path(run_dir)
    meta = load_run_meta(run_dir)
    if meta.get("task") != "vqa":
        raise RegistryError(f"{run_dir}: a {meta.get('task', 'classification')} run; this registers VQA runs")
    if not _NAME.match(str(name)):
        raise RegistryError(f"--name {name!r}: a VQA model name is letters, digits, '_', '.', '-' (at most 128)")
    for f in (WEIGHTS_FILE, TEXT_FILE):
        if not (run_dir / f).is_file():
            raise RegistryError(f"{run_dir / f}: missing; not a finished VQA run")
    results = _results(report)
    base = _base(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in (WEIGHTS_FILE, TEXT_FILE, "checkpoint.json"):
        shutil.copyfile(run_dir / f, tmp / f)
    weights_sha = sha256_file(tmp / WEIGHTS_FILE)  # the copy's, read once: it must be the run's recorded weights
    if meta.get("weights_sha256") and weights_sha != meta["weights_sha256"]:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RegistryError(f"{run_dir / WEIGHTS_FILE}: sha256 differs from checkpoint.json")
    card = {"format_version": CARD_FORMAT, "name": name, "task": "vqa",
            "clip": {"model_name": meta["clip"]["model_name"]}, "init": meta.get("init"),
            "recipe": meta.get("recipe"), "data": meta.get("data"),
            "steps": ((meta.get("metrics") or {}).get("train") or {}).get("steps"),
            "answers": len(meta["classnames"]), "weights_sha256": weights_sha,
            "text_sha256": sha256_file(tmp / TEXT_FILE), "license": "mit",
            "source": {"run_dir": str(run_dir.resolve()), "run_weights_sha256": meta.get("weights_sha256")}}
    if results:
        card["results"] = results
    atomic_write_text(tmp / CARD_FILE, json.dumps(card, indent=2) + "\n")
    atomic_write_text(tmp / "README.md", card_markdown(card))
    folder = base / name
    old = base / f".{name}.old-{os.getpid()}"
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_vqa_run(folder: str | Path, device="cpu"):
    """``(model, meta, question encoder)`` of a VQA run folder (or a registered entry's, which holds the same files);
    a run of another task is refused, naming it."""
    from grace_plugin.models.clip import bundle_from_text_state
    from grace_plugin.vqa.model import QuestionEncoder

    from .weights import load_state_dict_safe

    folder = Path(folder)
    model, meta = load_run(folder, device=device)
    if meta.get("task") != "vqa":
        raise RegistryError(f"--model {folder}: a {meta.get('task', 'classification')} run, not a VQA run")
    clip = meta["clip"]
    bundle = bundle_from_text_state(clip["model_name"], clip["model_cfg"], load_state_dict_safe(folder / TEXT_FILE))
    return model, meta, QuestionEncoder(bundle, device)


def load_vqa_entry(name: str, device="cpu", out_dir: str | Path | None = None):
    """``(model, meta, question encoder)`` of the registered VQA model ``name``, its files checked against the card's
    sha256 (a replaced or corrupt file is refused, naming it)."""
    folder = vqa_entry(name, out_dir)
    if folder is None:
        known = ", ".join(list_vqa_models(out_dir)) or "none"
        raise RegistryError(f"{name!r}: no registered VQA model of that name under {_base(out_dir)} (known: {known})")
    card = read_json(folder / CARD_FILE, RegistryError)
    for f, key in ((WEIGHTS_FILE, "weights_sha256"), (TEXT_FILE, "text_sha256")):
        verify_sha256(folder / f, card.get(key), what=f"VQA entry {name}'s card")
    return load_vqa_run(folder, device)
