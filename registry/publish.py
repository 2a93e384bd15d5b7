"""Publishing a trained run: ``register_run`` (timm + RobustBench names) and ``export_open_clip`` / ``export_timm_hub``.

* ``register_run(run_dir, rb_name, dataset)`` builds the dataset's head through the run's text tower (ImageNet:
  ``open_clip.IMAGENET_CLASSNAMES`` x ``OPENAI_IMAGENET_TEMPLATES``), writes ``<weights dir>/<timm name>/`` (weights,
  text tower, ``card.json`` with RobustBench ``ModelInfo`` fields and sha256) and registers the timm name.
* ``export_open_clip`` writes an open_clip model config (``<name>.json``) and ``open_clip_model.safetensors`` with
  the fine-tuned image tower mapped back to open_clip keys and the run's text tower, plus the classifier's head.
* ``export_timm_hub`` writes the folder ``timm.models.push_to_hf_hub`` uploads (``config.json`` +
  ``model.safetensors``, via timm's own ``save_for_hf``) plus our card and text tower.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from grace_plugin.checkpoint import load_run
from grace_plugin.tensor_io import atomic_write_text, save_tensors, sha256_file

from .grace_models import CARD_FILE, CARD_FORMAT, TEXT_FILE, WEIGHTS_FILE, RegistryError, register_card, weights_dir
from .naming import NUM_CLASSES, model_info_fields, timm_name

__all__ = ["dataset_classes", "register_run", "RegisteredModel", "export_open_clip",
           "export_timm_hub", "timm_to_open_clip_visual", "build_entry"]

TEMPLATE_SETS = ("openai", "simple")
_ARCH_NAMES = {"vit_base_patch32_clip_quickgelu_224": "ViT-B/32", "vit_base_patch16_clip_quickgelu_224": "ViT-B/16",
               "vit_large_patch14_clip_quickgelu_224": "ViT-L/14"}


def dataset_classes(dataset: str, templates: str = "openai") -> tuple[list[str], list[str]]:
    """Class names and prompt templates (as ``{}`` strings) for a RobustBench dataset."""
    import open_clip

    if templates not in TEMPLATE_SETS:
        raise RegistryError(f"templates {templates!r}: valid choices are {', '.join(TEMPLATE_SETS)}")
    if dataset != "imagenet":
        raise RegistryError(f"dataset {dataset!r}: heads can be built for imagenet only (open_clip ships its class "
                            "names); valid choices: imagenet")
    fns = open_clip.OPENAI_IMAGENET_TEMPLATES if templates == "openai" else open_clip.SIMPLE_IMAGENET_TEMPLATES
    return list(open_clip.IMAGENET_CLASSNAMES), [t("{}") for t in fns]


def _load_run_with_text(run_dir: Path):
    from grace_plugin.models.clip import bundle_from_text_state

    from .weights import load_state_dict_safe

    model, meta = load_run(run_dir)
    if meta.get("task", "classification") != "classification":  # RobustBench, timm and open_clip names classify
        raise RegistryError(f"{run_dir}: a {meta['task']} run; timm/RobustBench names and export publish image "
                            "classifiers (a VQA run: grace register RUN --name NAME, registry/vqa_entries.py)")
    text_file = run_dir / "text.safetensors"
    if not meta.get("clip") or not text_file.is_file():
        raise RegistryError(f"{text_file}: missing; the run carries no text tower to build a head with")
    bundle = bundle_from_text_state(meta["clip"]["model_name"], meta["clip"]["model_cfg"],
                                    load_state_dict_safe(text_file))
    return model, meta, bundle


def _arch_label(tower: dict, model_name: str) -> str:
    return _ARCH_NAMES.get(tower.get("arch") or "", model_name) + " (CLIP)"


def build_entry(run_dir: str | Path, rb_name: str, dataset: str = "imagenet", threat_model: str = "Linf",
                templates: str = "openai", model_info: dict | None = None):
    """The classifier with the dataset's head and its card (no files written). Returns ``(model, card, text_state)``."""
    from grace_plugin.models.classifier import ClipClassifier, ZeroShotHead
    from grace_plugin.models.clip import text_state_dict, zero_shot_weights

    run_dir = Path(run_dir)
    name = timm_name(rb_name, dataset, threat_model)
    fields = model_info_fields()
    bad = set(model_info or {}) - set(fields)
    if bad:
        raise RegistryError(f"model info field(s) {sorted(bad)}: valid fields are {', '.join(fields)}")
    model, meta, bundle = _load_run_with_text(run_dir)
    classnames, tmpl = dataset_classes(dataset, templates)
    w = zero_shot_weights(bundle, classnames, tmpl)
    if w.shape[0] != NUM_CLASSES[dataset]:
        raise RegistryError(f"{dataset}: built {w.shape[0]} class embeddings, RobustBench expects "
                            f"{NUM_CLASSES[dataset]}")
    logit_scale = float(model.head.logit_scale)
    clf = ClipClassifier(model.visual, ZeroShotHead(w, logit_scale), meta["pretrained_cfg"]).eval()
    tower = meta["architecture"]["tower"]
    pc = meta["pretrained_cfg"]
    info = dict.fromkeys(fields)  # RobustBench's ModelInfo; accuracies stay null until measured
    info.update(dataset=dataset, architecture=_arch_label(tower, meta["clip"]["model_name"]),
                eps="4/255" if (dataset, threat_model) == ("imagenet", "Linf") else None,
                additional_data=True,  # CLIP pretraining on web image-text pairs is extra data for RobustBench
                number_forward_passes=1, footnote=f"{meta.get('recipe', '?')} fine-tuning of CLIP; zero-shot head "
                f"from {len(tmpl)} templates")
    info.update(model_info or {})
    card = {
        "format_version": CARD_FORMAT, "timm_name": name, "rb_name": rb_name, "dataset": dataset,
        "threat_model": threat_model,
        "architecture": {"tower": tower, "embed_dim": int(w.shape[1]), "num_classes": int(w.shape[0])},
        "pretrained_cfg": {k: list(pc[k]) if isinstance(pc[k], (list, tuple)) else pc[k]
                           for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std") if k in pc},
        "logit_scale": logit_scale, "classnames": classnames, "templates": tmpl, "clip": meta["clip"],
        "model_info": info, "license": "mit",
        "source": {"run_dir": str(run_dir.resolve()), "recipe": meta.get("recipe"),
                   "run_weights_sha256": meta.get("weights_sha256")},
    }
    return clf, card, text_state_dict(bundle)


@dataclass
class RegisteredModel:
    timm_name: str
    rb_name: str
    folder: Path


def register_run(run_dir: str | Path, rb_name: str, dataset: str = "imagenet", threat_model: str = "Linf",
                 out_dir: str | Path | None = None, templates: str = "openai", model_info: dict | None = None,
                 hf_hub_id: str | None = None) -> RegisteredModel:
    """Write ``<out_dir or weights_dir()>/<timm name>/`` for a run and register the name in this process."""
    clf, card, text_sd = build_entry(run_dir, rb_name, dataset, threat_model, templates, model_info)
    folder = Path(out_dir or weights_dir()).expanduser() / card["timm_name"]
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(clf.state_dict(), folder / WEIGHTS_FILE)
    save_tensors(text_sd, folder / TEXT_FILE)
    card["weights_sha256"] = sha256_file(folder / WEIGHTS_FILE)
    card["text_sha256"] = sha256_file(folder / TEXT_FILE)
    if hf_hub_id:
        card["hf_hub_id"] = hf_hub_id
    atomic_write_text(folder / CARD_FILE, json.dumps(card, indent=2) + "\n")
    register_card(folder / CARD_FILE)
    return RegisteredModel(card["timm_name"], rb_name, folder)


# ---------------------------------------------------------------------------------------------------- open_clip
def timm_to_open_clip_visual(sd: dict, prefix: str = "visual.") -> dict:
    """timm CLIP ViT keys -> open_clip ``VisionTransformer`` keys: the inverse of timm's ``_convert_openai_clip``.

    Hand-written because neither timm nor open_clip ships this direction.
    """
    out = {}
    for k, v in sd.items():
        if k == "head.bias":
            if v.abs().max() > 0:
                raise RegistryError("the tower's projection has a non-zero bias, which open_clip's CLIP cannot hold "
                                    "(a run trained before the bias was frozen); export it with --format timm-hub")
            continue
        if k == "head.weight":
            out[prefix + "proj"] = v.t().contiguous()
            continue
        if k == "cls_token":
            out[prefix + "class_embedding"] = v.reshape(-1)
            continue
        if k == "pos_embed":
            out[prefix + "positional_embedding"] = v[0]
            continue
        n = (k.replace("patch_embed.proj", "conv1").replace("norm_pre", "ln_pre")
             .replace("blocks.", "transformer.resblocks.")
             .replace(".norm1", ".ln_1").replace(".norm2", ".ln_2").replace("attn.qkv.weight", "attn.in_proj_weight")
             .replace("attn.qkv.bias", "attn.in_proj_bias").replace("attn.proj", "attn.out_proj")
             .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
        if n.startswith("norm."):
            n = "ln_post." + n[len("norm."):]
        out[prefix + n] = v
    return out


def export_open_clip(run_dir: str | Path, out: str | Path, name: str | None = None) -> dict:
    """open_clip config ``<out>/<name>.json`` + ``open_clip_model.safetensors`` (+ the classifier head).

    Load with ``open_clip.add_model_config(out / f"{name}.json")`` and
    ``open_clip.create_model_and_transforms(name, pretrained=str(out / "open_clip_model.safetensors"))``.
    """
    import open_clip

    from grace_plugin.models.clip import register_open_clip_config

    run_dir, out = Path(run_dir), Path(out)
    model, meta, bundle = _load_run_with_text(run_dir)
    name = name or f"{meta['clip']['model_name']}-{run_dir.resolve().name}"
    if "/" in name or name.startswith("."):
        raise RegistryError(f"--name {name!r}: an open_clip model name is a file stem (no '/')")
    clip_cfg = meta["clip"]["model_cfg"]
    register_open_clip_config(name, clip_cfg)
    clip = open_clip.create_model(name, pretrained=None)
    sd = {k: v for k, v in bundle.clip.state_dict().items() if not k.startswith("visual.")}
    sd.update(timm_to_open_clip_visual({k[len("visual."):]: v for k, v in model.state_dict().items()
                                        if k.startswith("visual.")}))
    sd["logit_scale"] = torch.tensor(math.log(float(model.head.logit_scale)))
    missing, unexpected = clip.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RegistryError(f"{run_dir}: its tower does not map onto open_clip {name} (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "open_clip_model.safetensors"
    save_tensors(clip.state_dict(), weights)
    atomic_write_text(out / f"{name}.json", json.dumps(clip_cfg, indent=2) + "\n")
    save_tensors({"weight": model.head.weight.detach(), "logit_scale": model.head.logit_scale.detach()},
                  out / "zero_shot_head.safetensors")
    atomic_write_text(out / "classnames.txt", "\n".join(meta["classnames"]) + "\n")
    if meta.get("templates"):
        atomic_write_text(out / "zeroshot_classification_templates.txt", "\n".join(meta["templates"]) + "\n")
    return {"name": name, "config": out / f"{name}.json", "weights": weights,
            "head": out / "zero_shot_head.safetensors"}


# ---------------------------------------------------------------------------------------------------- timm hub
def export_timm_hub(run_dir: str | Path, out: str | Path, rb_name: str, dataset: str = "imagenet",
                    threat_model: str = "Linf", templates: str = "openai", model_info: dict | None = None) -> dict:
    """The folder ``push_to_hf_hub`` would upload: ``config.json`` + ``model.safetensors`` (timm's ``save_for_hf``).

    ``config.json``'s ``architecture`` is the GRACE timm name, so loading it needs that name registered (``grace
    register``, or our card ``grace_card.json`` from this folder copied into the weights dir).
    """
    from timm.models._hub import save_for_hf

    clf, card, text_sd = build_entry(run_dir, rb_name, dataset, threat_model, templates, model_info)
    out = Path(out)
    clf.pretrained_cfg = dict(clf.pretrained_cfg, architecture=card["timm_name"],
                              num_classes=card["architecture"]["num_classes"])
    clf.num_features = card["architecture"]["embed_dim"]  # save_config_for_hf records timm's num_features
    save_for_hf(clf, str(out), model_config={"label_names": card["classnames"]}, safe_serialization=True)
    save_tensors(text_sd, out / TEXT_FILE)
    card["weights_sha256"] = sha256_file(out / WEIGHTS_FILE)
    card["text_sha256"] = sha256_file(out / TEXT_FILE)
    atomic_write_text(out / "grace_card.json", json.dumps(card, indent=2) + "\n")
    return {"timm_name": card["timm_name"], "config": out / "config.json", "weights": out / WEIGHTS_FILE}

