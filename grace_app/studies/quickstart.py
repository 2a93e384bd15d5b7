"""The main job on the embedded testbed (``grace quickstart``): synth -> tiny CLIP -> recipes -> reports.

Layout written under ``out``: ``data/<set>/`` (synthetic shards), ``pretrained/`` (the tiny CLIP, valid as
``--init``), ``runs/<method>/`` (each valid as ``--model``, with its ``report.json``), ``summary.json``,
``summary.md`` and ``tradeoff.png``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grace_plugin.config import checked, validate

from ..testbed.configs import merge

__all__ = ["QuickstartConfig", "run_quickstart", "prepare_testbed", "OOD_SETS", "run_wise_ft_sweep"]

log = logging.getLogger(__name__)

# catalogue names (eval_suites/catalogue.yaml) of the testbed's OOD sets under data/: each plays an ImageNet set of
# the paper's Table 6 (v2, sketch, rendition -> OOD Avg; a -> ImageNet-A in Adv Avg under the `paper` definition)
OOD_SETS = ["synth-v2", "synth-sketch", "synth-rendition", "synth-a"]

# Testbed-scale settings (32 px, tiny CLIP, a few hundred steps) are data: configs/testbed/ (read by
# grace_app/testbed/configs.py). Paper-scale settings live in configs/paper/.


@dataclass
class QuickstartConfig:
    out: Path
    seed: int = 0
    recipes: list[str] = field(default_factory=lambda: ["ft", "tecoa", "grace"])
    steps: int = checked(300, flag="--steps", gt=0)
    n_adv: int = checked(200, flag="--n-adv", ge=0)
    eps: float = checked(4 / 255, flag="--eps", ge=0, le=1)
    attack: str = "apgd-ce"
    device: str = "auto"  # CUDA when available
    overrides: list[str] = field(default_factory=list)
    size: str = "default"  # "small": a few hundred images and a 2-layer CLIP (smoke tests)
    pretrain_steps: int | None = checked(None, flag="--pretrain-steps", gt=0)
    pretrain_threads: int | None = checked(None, flag="--pretrain-threads", gt=0)  # default 1 (testbed.PretrainConfig)
    # fine-tuning/attack seeds seed..seed+seeds-1; rows report mean and spread (sample std)
    seeds: int = checked(1, flag="--seeds", ge=1)
    world: str = "v2"  # synthetic world version (grace_app.testbed.world)

    def __post_init__(self):
        validate(self)


def user_overrides(items: list[str], recipes: list[str]) -> dict[str, dict]:
    """``--set`` for a study: ``recipe.X`` goes to every recipe whose config has field X (an error if none has it);
    ``train.*``/``data.*`` go to all."""
    from grace_plugin.config import ConfigError, parse_overrides
    from grace_plugin.recipes import get_recipe_class

    parsed = parse_overrides(items)
    rec = parsed.pop("recipe", {})
    out = {name: dict(parsed) for name in recipes}
    for key, value in rec.items():
        takers = [n for n in recipes if key in get_recipe_class(n).Config.__dataclass_fields__]
        if not takers:
            raise ConfigError(f"unknown config field 'recipe.{key}' for recipes {', '.join(recipes)}")
        for n in takers:
            out[n] = merge(out[n], {"recipe": {key: value}})
    return out


def prepare_testbed(out: Path, seed: int = 0, size: str = "default", pretrain_steps: int | None = None,
                    progress: bool = True, echo=print, steps_label: tuple[str, str] = ("[1/4]", "[2/4]"),
                    world: str = "v2", pretrain_threads: int | None = None,
                    phases: dict | None = None) -> tuple[Path, Path]:
    """The synthetic world ``world`` (grace_app.testbed.world) under ``out/data`` (reused when its version,
    spec and seed match) and the tiny CLIP under ``out/pretrained`` (cached); returns ``(data, pretrained)``.
    Shared by the quickstart and ``grace study``. ``phases`` gets each step's seconds (``world``, ``tiny_clip``)."""
    from grace_app.testbed.world import SyntheticWorldSpec, write_synthetic_world
    from grace_plugin.runfolder import folder_lock
    from grace_app.testbed.tiny_clip import PretrainConfig, tiny_clip

    data, pretrained = out / "data", out / "pretrained"
    world_json = data / "world.json"
    world_spec = SyntheticWorldSpec.small() if size == "small" else SyntheticWorldSpec()
    pre = PretrainConfig(width=64, layers=2, batch_size=64) if size == "small" else PretrainConfig()
    if pretrain_steps is not None:
        pre.steps = pretrain_steps
    if pretrain_threads is not None:
        if pretrain_threads < 1:
            from grace_plugin.errors import UsageError

            raise UsageError(f"--pretrain-threads must be at least 1, got {pretrain_threads}")
        pre.threads = pretrain_threads
    # one process writes the world and the tiny CLIP, a second one on the same --out (two study lanes) waits and
    # reuses them: two writers of one world would rewrite shards under each other's readers
    t_world = time.time()
    with folder_lock(data, what="testbed (synthetic world and tiny CLIP)", wait=echo):
        meta = json.loads(world_json.read_text()) if world_json.is_file() else {}
        if meta.get("spec") == asdict(world_spec) and meta.get("seed") == seed and meta.get("world", "v1") == world:
            echo(f"{steps_label[0]} synthetic world: reusing {data}")
        else:
            runs = out / "runs"
            if meta and runs.is_dir() and any(runs.rglob("checkpoint.json")):
                # regenerating would leave finished runs beside a world (and a tiny CLIP) they were not trained on,
                # and a later invocation would reuse them as if they had been
                from grace_plugin.errors import UsageError

                raise UsageError(f"{data} holds world {meta.get('world', 'v1')} seed {meta.get('seed')} and {runs} "
                                 f"holds runs trained on it; --seed {seed} / --size / --world ask for another world: "
                                 "use another --out (a study's --seeds N already runs seeds seed..seed+N-1 on one "
                                 "world)")
            echo(f"{steps_label[0]} synthetic world -> {data}")
            write_synthetic_world(data, seed=seed, spec=world_spec, progress=progress, world=world)
        t_clip = time.time()
        echo(f"{steps_label[1]} tiny CLIP -> {pretrained} (the default world's ships with the package; others are "
             "pretrained once and cached)")
        tiny_clip(data, pretrained, cfg=pre, progress=progress)
    if phases is not None:
        phases.update(world=round(t_clip - t_world, 1), tiny_clip=round(time.time() - t_clip, 1))
    return data, pretrained


def run_quickstart(cfg: QuickstartConfig, progress: bool = True, echo=print) -> dict:
    from grace_plugin.finetune import fine_tune
    from grace_plugin.runtime import is_main, resolve_device
    from grace_app.testbed.tiny_clip import tiny_clip_identity
    from registry import load_model

    from eval_suites.context import SuiteContext
    from eval_suites.report import summary_markdown, write_report, write_summary
    from eval_suites.engine import run_suites
    from ..testbed.configs import method_config

    t0 = time.time()
    out = Path(cfg.out)
    runs = out / "runs"
    phases: dict = {}  # seconds per step (summary.json "phases"; bench/quickstart_cold.py prints them)
    data, pretrained = prepare_testbed(out, cfg.seed, cfg.size, cfg.pretrain_steps, progress, echo, world=cfg.world,
                                       pretrain_threads=cfg.pretrain_threads, phases=phases)
    names = ["id"] + [f"ood:{n}" for n in OOD_SETS] + [f"adv:{cfg.attack}"]
    device = str(resolve_device(cfg.device))
    seeds = [cfg.seed + i for i in range(max(1, cfg.seeds))]
    echo("[3/4] fine-tuning: " + ", ".join(cfg.recipes) + (f" x seeds {seeds}" if len(seeds) > 1 else ""))
    run_dirs: dict[str, list[Path]] = {}
    user = user_overrides(cfg.overrides, cfg.recipes)
    for name in cfg.recipes:
        for seed in seeds:
            overrides = merge({"train": {"seed": seed, "device": device}}, user[name])
            run_cfg = method_config(name, overrides=overrides, steps=cfg.steps)
            run_dir = runs / name if len(seeds) == 1 else runs / name / f"seed{seed}"
            t1 = time.time()
            run_dirs.setdefault(name, []).append(fine_tune(name, pretrained, data / "id", run_dir, run_cfg,
                                                           progress=progress))
            phases[f"fine-tune {name}"] = round(phases.get(f"fine-tune {name}", 0) + time.time() - t1, 1)
    echo("[4/4] evaluation: ID, OOD (" + ", ".join(OOD_SETS) + f"), {cfg.attack} l_inf eps={cfg.eps:.4f} "
         f"on {cfg.n_adv} ID images")
    rows, t1 = [], time.time()
    for method, specs in [("zero-shot", [pretrained] * len(seeds))] + list(run_dirs.items()):
        per_seed = []
        for seed, spec in zip(seeds, specs):
            ctx = SuiteContext(id_set=("id", data / "id"), data_root=data, eps=cfg.eps, n_adv=cfg.n_adv,
                               device=device, seed=seed, progress=progress)
            report = run_suites(load_model(spec, device=device), names, ctx)
            report["model"] = method
            dest = out / "zero_shot" if method == "zero-shot" else Path(spec)
            if is_main():
                write_report(dest if len(seeds) == 1 or method != "zero-shot" else dest / f"seed{seed}", report)
            per_seed.append(report["definitions"])
        rows.append(dict(_aggregate(method, [d["strict"] for d in per_seed]),
                         paper=_aggregate(method, [d["paper"] for d in per_seed])))
    phases["evaluation"] = round(time.time() - t1, 1)
    counts = json.loads((data / "world.json").read_text())["counts"]
    legend = column_definitions(counts, cfg.attack, cfg.eps, min(cfg.n_adv, counts["id"]["test"]), len(seeds))
    tiny = tiny_clip_identity(pretrained)
    import torch

    origin = tiny_clip_line(tiny, cfg.seed, cfg.world, torch.__version__)
    paths = write_summary(out, rows, extra={"seeds": seeds, "steps": cfg.steps, "world": cfg.world,
                                            "world_seed": cfg.seed, "tiny_clip": tiny, "columns": legend,
                                            # the numbers move with the PyTorch release (its CPU kernels)
                                            "torch": torch.__version__,
                                            "seconds": round(time.time() - t0, 1), "phases": phases},
                          sections=[summary_markdown([r["paper"] for r in rows], definition="paper")])
    with open(paths["md"], "a") as f:
        f.write("\n" + legend + "\n\n" + origin + "\n")
    return {"rows": rows, "paths": paths, "seconds": time.time() - t0, "legend": legend, "origin": origin}


def tiny_clip_line(tiny: dict, world_seed: int, world: str, torch_version: str | None = None) -> str:
    """Which tiny CLIP the rows start from (``tiny_clip_identity``'s record): the same sha256 is the same model, so
    two summaries are comparable only when this line matches; and the PyTorch release the rows ran on, where
    recorded (another release's CPU kernels can move the adversarially trained rows by a few images)."""
    pre = tiny["pretrain"]
    threads = pre.get("threads")
    return (f"Tiny CLIP {tiny['sha256'][:12]} (sha256), pretrained {pre.get('steps', '?')} steps on "
            f"{threads or 'unrecorded'} thread(s), world {world} seed {world_seed}."
            + (f" PyTorch {torch_version}." if torch_version else ""))


def column_definitions(counts: dict, attack: str, eps: float, n_adv: int, n_seeds: int) -> str:
    """What each quickstart column is (the `strict` definition; the `paper` one follows in summary.md), and the
    width of one run's 95% sampling interval at 50% accuracy (the widest binomial interval, 1.96 * sqrt(0.25 / n))."""
    import math

    world_sets = [s.removeprefix("synth-") for s in OOD_SETS]  # catalogue name -> the world's folder name
    n_id = counts["id"]["test"]
    n_ood = sum(counts[s]["test"] for s in world_sets)

    def half(n):
        return 1.96 * math.sqrt(0.25 / n) * 100

    spread = f"mean ± sample std over {n_seeds} fine-tuning/attack seeds (one world, one pretrained CLIP); " \
        if n_seeds > 1 else ""
    return (f"Columns (`strict` definition): ID = top-1 (%) on the `id` test set ({n_id} images); OOD = mean top-1 "
            f"over {', '.join(world_sets)} ({n_ood} images in all); Adv = robust top-1 under {attack.upper()} l_inf "
            f"eps {eps * 255:g}/255 on the first {n_adv} ID test images; HM = harmonic mean of ID, OOD and Adv. "
            f"{spread}{'one' if spread else 'One'} run's 95% binomial interval is at most ±{half(n_id):.1f} (ID), "
            f"±{half(n_ood / len(world_sets)) / math.sqrt(len(world_sets)):.1f} (OOD), ±{half(n_adv):.1f} (Adv) "
            "points; the error bars of tradeoff.png are the Wilson intervals (one seed) or ±1 std (several).")


def _aggregate(method: str, summaries: list[dict]) -> dict:
    """One row from per-seed summaries (``{"id", "ood", "adv", "hm", "ci95"?}``): the mean over seeds, plus with
    several seeds the sample standard deviation (``*_std``); ``*_ci`` is the run's 95% interval, or with several
    seeds the mean of the runs' bounds (the per-run interval, beside the spread over seeds)."""
    import statistics

    from .verdicts import seed_mean

    row: dict = {"method": method}
    for k in ("id", "ood", "adv", "hm"):
        row[k], std = seed_mean([a[k] for a in summaries])
        if len(summaries) > 1:
            row[f"{k}_std"] = std
        cis = [(a.get("ci95") or {}).get(k) for a in summaries]
        if all(cis):
            row[f"{k}_ci"] = [statistics.fmean(c[0] for c in cis), statistics.fmean(c[1] for c in cis)]
    if len(summaries) > 1:
        row["n_seeds"] = len(summaries)
    return row


def run_wise_ft_sweep(zero_shot: str | Path, finetuned: str | Path, names: list[str], ctx, alphas: list[float],
                      out: str | Path | None = None) -> dict:
    """WiSE-FT alpha sweep (arXiv 2109.01903): interpolate a fine-tuned run (alpha = 1, e.g. an ``ft`` run or
    ``wise_ft`` with ``recipe.alpha=1``) with the zero-shot CLIP it started from, run the suites ``names`` with
    ``ctx`` (a ``SuiteContext``) on each alpha and return ``{"points": [{alpha, id, ood, adv, hm}], "frontier":
    [...]}`` (the ID/OOD Pareto front, `strict` definition); written to ``out/wise_ft_sweep.json`` when ``out`` is
    given."""
    from grace_plugin.tensor_io import atomic_write_text
    from grace_plugin.errors import UsageError
    from grace_plugin.weightspace import wise_ft_sweep
    from registry import LoadedModel, load_model

    from eval_suites.engine import run_suites

    ft = load_model(finetuned)
    if ft.model is None:
        raise UsageError(f"--finetuned {finetuned}: not a fine-tuned run folder")
    zs = load_model(zero_shot).for_classes(ft.classnames, ft.meta.get("templates") or [])

    def evaluate(model):
        loaded = LoadedModel(model, f"{ft.name}@alpha", ft.classnames, ft.text, ft.meta, text_loader=ft.text_tower)
        return run_suites(loaded, names, _fresh(ctx))["axes"]

    res = wise_ft_sweep(zs, ft.model, alphas, evaluate)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "wise_ft_sweep.json", json.dumps(res, indent=2) + "\n")
    return res


def _fresh(ctx):
    """A copy of ``ctx`` with an empty cache (each alpha is another model)."""
    import dataclasses

    return dataclasses.replace(ctx, cache={})
