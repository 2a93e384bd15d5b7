"""``grace quickstart --task vqa``: the VQA world -> its tiny CLIP -> zero-shot, LoRA, FT, DiGraP and GRACE -> one
table of ID / near-OOD / far-OOD / OOD VQA accuracy and pixel-space robustness. ``--backbone coca``: the same rows
with the generative backbone, the world's tiny CoCa (grace_app/testbed/tiny_coca.py).

Layout under ``out``: ``data/`` (the VQA world, grace_app/testbed/vqa_world.py), ``pretrained/`` (its tiny CLIP),
``runs/<method>/`` (VQA run folders, each with its evaluation in ``eval/``), ``zero_shot/`` (the zero-shot
evaluation), ``summary.json`` and ``summary.md``; with ``--backbone coca`` all but ``data/`` under ``coca/``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grace_plugin.config import checked, validate

from ..testbed.configs import merge

__all__ = ["VqaQuickstartConfig", "run_vqa_quickstart", "VQA_METHODS", "OOD_SETS"]

# row label -> testbed method (grace_app/testbed_configs/methods.yaml); None: the zero-shot answer scorer
VQA_METHODS = {"zero-shot": None, "LoRA": "lora-ft", "FT": "ft", "DiGraP": "digrap", "GRACE": "grace"}
OOD_SETS = ["iv-vqa", "cv-vqa", "vqa-rephrasings", "vqa-cp", "vqa-ce", "advqa", "textvqa", "vizwiz", "ok-vqa"]


@dataclass
class VqaQuickstartConfig:
    out: Path
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(VQA_METHODS))
    steps: int = checked(300, flag="--steps", gt=0)
    n_adv: int = checked(100, flag="--n-adv", ge=0)
    eps: float = checked(4 / 255, flag="--eps", ge=0, le=1)
    attack: str = "apgd-ce"
    device: str = "auto"
    size: str = "default"  # "small": a few hundred questions and a 2-layer CLIP (smoke tests)
    pretrain_steps: int | None = checked(None, flag="--pretrain-steps", gt=0)
    # the pre-trained model every row starts from: the tiny CLIP (ClipVQA rows) or the tiny CoCa (generative rows)
    backbone: str = checked("clip", flag="--backbone", choices=("clip", "coca"))

    def __post_init__(self):
        validate(self)


def _pretrained(backbone: str, size: str, pretrain_steps: int | None):
    """``(what, make(data, out, progress))``: the backbone's tiny pre-trained model, cached."""
    if backbone == "coca":
        from grace_app.testbed.tiny_coca import CocaPretrainConfig, tiny_coca

        pre = CocaPretrainConfig(width=64, layers=2, batch_size=32) if size == "small" else CocaPretrainConfig()
        make, what = tiny_coca, "tiny CoCa"
    else:
        from grace_app.testbed.tiny_clip import PretrainConfig, tiny_clip

        pre = PretrainConfig(width=64, layers=2, batch_size=64) if size == "small" else PretrainConfig()
        make, what = tiny_clip, "tiny CLIP"
    if pretrain_steps is not None:
        pre.steps = pretrain_steps
    return what, lambda data, out, progress: make(data, out, cfg=pre, progress=progress)


def backbone_folder(out: Path, backbone: str) -> Path:
    """Where a backbone's pretrained model, runs, evaluations and summary go: ``out`` for the CLIP, ``out/coca``
    for the CoCa (both share ``out/data``, the world)."""
    return out if backbone == "clip" else out / backbone


def prepare_vqa_testbed(out: Path, seed: int, size: str, pretrain_steps: int | None, progress: bool, echo,
                        phases: dict, backbone: str = "clip") -> tuple[Path, Path]:
    """The VQA world under ``out/data`` (reused when its spec and seed match) and its tiny CLIP or CoCa (cached)."""
    from grace_app.testbed.vqa_world import VqaWorldSpec, write_vqa_world
    from grace_plugin.runfolder import folder_lock

    data, pretrained = out / "data", backbone_folder(out, backbone) / "pretrained"
    spec = VqaWorldSpec.small() if size == "small" else VqaWorldSpec()
    what, make = _pretrained(backbone, size, pretrain_steps)
    t0 = time.time()
    with folder_lock(data, what="VQA world", wait=echo):
        meta = json.loads((data / "world.json").read_text()) if (data / "world.json").is_file() else {}
        if meta.get("spec") == asdict(spec) and meta.get("seed") == seed and meta.get("task") == "vqa":
            echo(f"[1/4] VQA world: reusing {data}")
        else:
            echo(f"[1/4] VQA world -> {data}")
            write_vqa_world(data, seed=seed, spec=spec)
    t1 = time.time()
    # a lock per backbone: a CLIP lane does not wait for another lane's CoCa pretraining. The world is complete
    # when its lock is released; a second invocation on this folder with another world seed or size would rewrite
    # it under a running pretraining (the studies refuse that: one protocol per folder)
    with folder_lock(pretrained, what=f"{what} of this VQA testbed", wait=echo):
        echo(f"[2/4] {what} -> {pretrained} (pretrained on the world's captions once, then cached)")
        make(data, pretrained, progress)
    phases.update(world=round(t1 - t0, 1), **{f"tiny_{backbone}": round(time.time() - t1, 1)})
    return data, pretrained


# chance of a uniform guess among the answers a question of the set can have (grace_app/testbed/vqa_world.py):
# textvqa's nine digits, ok-vqa's four corner counts
CHANCE = {"textvqa": 100 / 9, "ok-vqa": 100 / 4}


def calibration(rows: list[dict]) -> list[dict]:
    """The VQA world's calibration checks, on the baselines only (zero-shot, LoRA, FT; never DiGraP or GRACE): each
    ``{"check", "holds", "values"}``. Fine-tuning raises ID well above zero-shot (by 10 points or more); its gain
    shrinks from ID to near OOD to far OOD; zero-shot is above chance (its interval's lower end) on the far sets
    whose skill was pretrained."""
    by = {r["method"]: r for r in rows}
    zs, out = by.get("zero-shot"), []
    if zs is None:
        return out
    for m in ("LoRA", "FT"):
        if m not in by:
            continue
        gain = {g: by[m][g] - zs[g] for g in ("id", "near", "far")}
        out.append({"check": f"{m}: ID gain over zero-shot >= 10", "holds": gain["id"] >= 10,
                    "values": {"gain_id": round(gain["id"], 2)}})
        out.append({"check": f"{m}: gain shrinks ID > near > far", "values": {k: round(v, 2) for k, v in gain.items()},
                    "holds": gain["id"] > gain["near"] > gain["far"]})
    for name, chance in CHANCE.items():
        acc = zs["sets"].get(name)
        lo = (zs.get("set_ci95", {}).get(name) or [None])[0]
        out.append({"check": f"zero-shot above chance on {name} (lower 95% bound > {chance:.1f})",
                    "holds": lo is not None and lo > chance,
                    "values": {"accuracy": None if acc is None else round(acc, 2),
                               "lower": None if lo is None else round(lo, 2)}})
    return out


def summary_markdown(rows: list[dict], legend: str, checks: list[dict] | None = None) -> str:
    from eval_suites.vqa_summary import vqa_table

    lines = vqa_table(rows).splitlines()
    if checks:
        lines += ["", "The world's calibration, on the baselines only:", "", "| check | holds | values |",
                  "|---|---|---|"]
        lines += [f"| {c['check']} | {'yes' if c['holds'] else 'no'} | "
                  + ", ".join(f"{k} {v}" for k, v in c["values"].items()) + " |" for c in checks]
    return "\n".join(lines) + "\n\n" + legend + "\n"


def run_vqa_quickstart(cfg: VqaQuickstartConfig, progress: bool = True, echo=print) -> dict:
    from eval_suites.context import SuiteContext
    from eval_suites.engine import evaluate, expand_shorthands, write_evaluation
    from eval_suites.vqa_summary import vqa_row
    from grace_plugin.finetune import fine_tune
    from grace_plugin.runtime import resolve_device
    from grace_plugin.tensor_io import atomic_write_text

    from ..testbed.configs import _load, method_config

    unknown = [m for m in cfg.methods if m not in VQA_METHODS]
    if unknown:
        from grace_plugin.errors import UsageError

        raise UsageError(f"--recipes {unknown[0]}: not a VQA quick-start row; rows: {', '.join(VQA_METHODS)}")
    t0, out, phases = time.time(), Path(cfg.out), {}
    data, pretrained = prepare_vqa_testbed(out, cfg.seed, cfg.size, cfg.pretrain_steps, progress, echo, phases,
                                           cfg.backbone)
    base = backbone_folder(out, cfg.backbone)
    device = str(resolve_device(cfg.device))
    vqa_layer = _load("vqa.yaml") if cfg.backbone == "clip" else merge(_load("vqa.yaml"), _load("coca.yaml"))
    ood = [f"{n}={data / n}" for n in OOD_SETS]
    trained = {}
    echo("[3/4] fine-tuning on vqav2 train: " + ", ".join(m for m in cfg.methods if VQA_METHODS[m]))
    for label in cfg.methods:
        if VQA_METHODS[label] is None:
            continue
        t1 = time.time()
        run_cfg = method_config(VQA_METHODS[label], tuned=False, steps=cfg.steps,
                                overrides=merge(vqa_layer, {"train": {"seed": cfg.seed, "device": device}}))
        trained[label] = fine_tune(_recipe_of(VQA_METHODS[label]), pretrained, data / "vqav2",
                                   base / "runs" / label.lower(), run_cfg, progress=progress)
        phases[f"fine-tune {label}"] = round(time.time() - t1, 1)
    echo(f"[4/4] evaluation: vqav2 test and {len(OOD_SETS)} OOD sets; {cfg.attack} l_inf eps={cfg.eps:.4f} on "
         f"the first {cfg.n_adv} vqav2 test questions")
    rows, t1 = [], time.time()
    for label in cfg.methods:
        model = str(pretrained) if VQA_METHODS[label] is None else str(trained[label])
        dest = base / "zero_shot" if VQA_METHODS[label] is None else trained[label] / "eval"
        names, sets = expand_shorthands(f"vqav2={data / 'vqav2'}", ood, cfg.attack if cfg.n_adv else None)
        ctx = SuiteContext(task="vqa", id_set=f"vqav2={data / 'vqav2'}", sets=sets, device=device, eps=cfg.eps,
                           n_adv=cfg.n_adv, seed=cfg.seed, out_dir=dest,
                           answers_min_count=int(vqa_layer["data"]["answers_min_count"]))
        write_evaluation(dest, evaluate(model, names, ctx), ctx)
        rows.append(vqa_row(label, json.loads((dest / "report.json").read_text())))  # the row is what was written
    phases["evaluation"] = round(time.time() - t1, 1)
    legend = (f"VQA accuracy (the official evaluator's), percent, [95% interval]: ID = vqav2 test; near OOD = the "
              f"mean of {', '.join(OOD_SETS[:6])}; far OOD = the mean of {', '.join(OOD_SETS[6:])}; OOD = the mean "
              f"of all nine; Adv = {cfg.attack} (l_inf {cfg.eps:.4f}) on the image, first {cfg.n_adv} vqav2 test "
              f"questions. {cfg.steps} steps per run, world seed {cfg.seed}; " + (
                  "the zero-shot row scores each answer's prompt with the tiny CLIP (no new parameter)."
                  if cfg.backbone == "clip" else "generative backbone: every row is the tiny CoCa answering in words "
                  "(greedy), the zero-shot row the pre-trained CoCa itself; fine-tuning trains the answer tokens."))
    checks = calibration(rows)
    summary = {"task": "vqa", "backbone": cfg.backbone, "rows": rows, "calibration": checks, "steps": cfg.steps,
               "seed": cfg.seed,
               "legend": legend, "phases": phases,
               "seconds": round(time.time() - t0, 1), "config": {k: str(v) for k, v in asdict(cfg).items()}}
    atomic_write_text(base / "summary.json", json.dumps(summary, indent=2) + "\n")
    md = summary_markdown(rows, legend, checks)
    atomic_write_text(base / "summary.md", md)
    return {"rows": rows, "md": md, "seconds": summary["seconds"], "paths": {"md": base / "summary.md"}}


def _recipe_of(method: str) -> str:
    from ..testbed.configs import load_methods

    return load_methods()[method].recipe
