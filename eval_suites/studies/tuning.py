"""``grace study tune``: one tuning protocol for every method (configs/testbed/tuning.yaml).

Each method gets the same number of trials over its own grid (``grid_points`` / ``draw_trials``); every trial trains
on ID train minus a held-out validation split (``grace_plugin.data.split.holdout_split``: never the test or OOD
sets) and is scored on that split: clean top-1 and robust top-1 under the tuning attack. ``select_trial`` applies one
rule to every method. The selected values are written back as data (configs/testbed/tuned.yaml, one entry per
method, with a comment recording the protocol and the validation scores), where ``method_config`` picks them up.
"""
from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TuneConfig", "grid_points", "draw_trials", "trial_score", "select_trial", "edge_axes", "validation_trial",
           "run_tuning", "write_tuned"]


@dataclass
class TuneConfig:
    methods: list[str]
    out: Path
    trials: int | None = None  # default: tuning.yaml's
    steps: int | None = None  # default: tuning.yaml's
    seed: int = 0
    device: str = "cpu"
    size: str = "default"
    pretrain_steps: int | None = None
    n_val_adv: int | None = None
    overrides: list[str] = field(default_factory=list)
    write: Path | None = None  # tuned.yaml to update (None: do not write)


def grid_points(grid: dict) -> list[dict]:
    """Every point of a grid ``{key: [values]}``; a key ``"a,b"`` is a joint axis whose values are ``[va, vb]``."""
    from grace_plugin.config import ConfigError

    axes = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"tuning.yaml: grid axis {key!r} must be a non-empty list")
        names = [k.strip() for k in str(key).split(",")]
        if len(names) > 1:
            for v in values:
                if not isinstance(v, list) or len(v) != len(names):
                    raise ConfigError(f"tuning.yaml: joint axis {key!r}: each value must be a list of {len(names)}")
            axes.append([dict(zip(names, v)) for v in values])
        else:
            axes.append([{names[0]: v} for v in values])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def draw_trials(grid: dict, trials: int, seed: int = 0) -> list[dict]:
    """``trials`` points of ``grid``: all of them when the grid has exactly that many, else a seeded draw without
    replacement (random search). A grid smaller than ``trials`` is an error: every method gets the same budget."""
    from grace_plugin.config import ConfigError

    points = grid_points(grid)
    if len(points) < trials:
        raise ConfigError(f"tuning.yaml: a grid of {len(points)} points cannot give {trials} trials; widen the grid "
                          "or lower trials (every method gets the same number of trials)")
    if len(points) == trials:
        return points
    return random.Random(seed).sample(points, trials)


def trial_score(clean: float | None, robust: float | None) -> dict:
    """``{"hm", "mean"}`` of validation clean and robust top-1 (percent)."""
    from ..report import harmonic_mean

    if clean is None or robust is None:
        return {"hm": None, "mean": None}
    return {"hm": harmonic_mean([clean, robust]), "mean": (clean + robust) / 2}


def select_trial(scores: list[dict], rule: str = "hm") -> int:
    """Index of the selected trial: the highest ``rule`` score (``hm`` or ``mean``), ties to the higher mean, then
    the earlier trial. Trials without a score are never selected."""
    from grace_plugin.config import ConfigError

    if rule not in ("hm", "mean"):
        raise ConfigError(f"tuning.yaml: rule must be hm|mean, got {rule!r}")
    ok = [i for i, s in enumerate(scores) if s.get(rule) is not None]
    if not ok:
        raise ValueError("no trial produced a validation score")
    return max(ok, key=lambda i: (round(scores[i][rule], 6), round(scores[i]["mean"], 6), -i))


def edge_axes(grid: dict, point: dict) -> list[str]:
    """The numeric single axes of ``grid`` (three values or more) whose value in ``point`` is the smallest or the
    largest of the axis: a selection at the edge of its grid, where the best value may lie outside it."""
    out = []
    for key, values in grid.items():
        if "," in str(key) or len(values) < 3 or not all(isinstance(v, (int, float)) for v in values):
            continue
        if key in point and point[key] in (min(values), max(values)):
            out.append(key)
    return out


def write_tuned(path: Path, selected: dict[str, dict], notes: dict[str, str]) -> Path:
    """Update ``path`` (tuned.yaml): the given methods' entries replaced, the others kept; one comment per entry."""
    import yaml

    from grace_plugin.tensor_io import atomic_write_text

    current = {}
    if path.is_file():
        current = yaml.safe_load(path.read_text()) or {}
    old_notes = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("# [") and "]" in line:
                old_notes[line[3:line.index("]")]] = line
    current.update(selected)
    lines = ["# Selected values per method, written by `grace study tune` (eval_suites/tuning.py); layered over the",
             "# method's files by eval_suites/testbed_config.py. Protocol and grids: tuning.yaml.", ""]
    for name in sorted(current):
        lines.append(f"# [{name}] {notes[name]}" if name in notes else old_notes.get(name, f"# [{name}]"))
        lines.append(yaml.safe_dump({name: current[name]}, sort_keys=True, default_flow_style=False).rstrip())
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def validation_trial(method, point: dict, run_dir: Path, pretrained: Path, val: Path, steps: int, overrides: dict,
                     ctx_args: dict, attack: str, progress: bool = False) -> dict:
    """Train ``method`` (a methods.yaml ``Method``, untuned) at ``point`` (dotted keys) over ``overrides`` on the
    validation split's train part (``overrides`` win over ``point``), then score it on the held-out part:
    ``{val_clean, val_robust, hm, mean}``."""
    from grace_plugin.finetune import fine_tune
    from registry import load_model

    from ..context import SuiteContext
    from ..suites import run_suites
    from .testbed_config import merge, method_config, nest

    run_cfg = method_config(method, overrides=merge(nest(point), overrides), steps=steps, tuned=False)
    fine_tune(method.recipe, pretrained, val, run_dir, run_cfg, progress=progress)
    rep = run_suites(load_model(run_dir, device=ctx_args.get("device", "cpu")), ["id", f"adv:{attack}"],
                     SuiteContext(**ctx_args))
    clean = rep["datasets"]["val"]["top1"]
    robust = (rep.get("adversarial") or {}).get("robust_acc")
    return {"val_clean": clean, "val_robust": robust, **trial_score(clean, robust)}


def run_tuning(cfg: TuneConfig, progress: bool = False, echo=print) -> dict:
    from grace_plugin.tensor_io import atomic_write_text
    from grace_plugin.config import ConfigError
    from grace_plugin.data.split import holdout_split
    from grace_plugin.runtime import resolve_device

    from .quickstart import _user_overrides, prepare_testbed
    from .testbed_config import load_methods, load_tuning, merge

    proto, methods = load_tuning(), load_methods()
    grids = proto.get("grids") or {}
    trials = int(cfg.trials or proto["trials"])
    steps = int(cfg.steps or proto["steps"])
    n_val_adv = int(cfg.n_val_adv if cfg.n_val_adv is not None else proto["n_val_adv"])
    rule = proto.get("rule", "hm")
    for name in cfg.methods:
        if name not in methods or methods[name].recipe is None:
            raise ConfigError(f"unknown trainable method {name!r}; valid: "
                              f"{', '.join(n for n, m in methods.items() if m.recipe)}")
        if name not in grids:
            raise ConfigError(f"tuning.yaml: no grid for method {name!r}; grids: {', '.join(grids)}")
    plans = {name: draw_trials(grids[name], trials, cfg.seed) for name in cfg.methods}  # every grid checked first
    t0 = time.time()
    out = Path(cfg.out)
    data, pretrained = prepare_testbed(out, cfg.seed, cfg.size, cfg.pretrain_steps, progress, echo,
                                       ("[1/3]", "[2/3]"))
    val = out / "val_split"
    if not (val / "test" / "nshards.txt").is_file():
        counts = holdout_split(data / "id", val, float(proto["val_fraction"]), int(proto.get("seed", 0)))
        echo(f"      validation split held out of ID train: {counts['val']} samples (training on {counts['train']})")
    recipes = sorted({methods[n].recipe for n in cfg.methods})
    user = _user_overrides(cfg.overrides, recipes)
    attack = proto.get("attack", "apgd-ce")
    device = str(resolve_device(cfg.device))
    ctx_args = dict(id_set=("val", val), eps=float(proto.get("eps", 4 / 255)), n_adv=n_val_adv, device=device,
                    seed=cfg.seed)
    echo(f"[3/3] tuning {', '.join(cfg.methods)}: {trials} trials each, {steps} steps, rule {rule}")
    results, selected, notes = {}, {}, {}
    for name in cfg.methods:
        m = methods[name]
        rows = []
        for i, point in enumerate(plans[name]):
            over = merge({"train": {"seed": cfg.seed, "device": device}}, user.get(m.recipe, {}))
            scores = validation_trial(m, point, out / "trials" / name / f"trial{i}", pretrained, val, steps,
                                      over, ctx_args, attack, progress)
            clean, robust = scores["val_clean"], scores["val_robust"]
            rows.append({"trial": i, "point": point, **scores})
            echo(f"      {name} trial {i} {point}: val clean {clean:.2f} robust {robust:.2f}")
        best = select_trial(rows, rule)
        selected[name] = dict(rows[best]["point"])
        edges = edge_axes(grids[name], selected[name])
        notes[name] = (f"{trials} trials, {steps} steps, rule {rule}, world {cfg.size}, seed {cfg.seed}: trial {best} "
                       f"val clean {rows[best]['val_clean']:.2f} robust {rows[best]['val_robust']:.2f} "
                       f"({time.strftime('%Y-%m-%d')})")
        if edges:
            notes[name] += f"; at the grid's edge: {', '.join(edges)}"
            echo(f"      note: {name}'s selected {', '.join(edges)} is at the edge of its grid (the best value may lie "
                 "outside it)")
        results[name] = {"trials": rows, "selected": best, "values": selected[name], "at_grid_edge": edges}
    doc = {"protocol": {k: v for k, v in proto.items() if k != "grids"}, "trials": trials, "steps": steps,
           "size": cfg.size, "seed": cfg.seed, "methods": results, "seconds": round(time.time() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tuning.json", json.dumps(doc, indent=2, default=str) + "\n")
    lines = [f"# Tuning ({trials} trials per method, {steps} steps, rule {rule}, scored on a validation split held "
             "out of ID train)", "", "| method | trial | values | val clean | val robust | HM | selected |",
             "|---|---:|---|---:|---:|---:|---|"]
    for name, res in results.items():
        for r in res["trials"]:
            vals = ", ".join(f"{k}={v}" for k, v in r["point"].items())
            lines.append(f"| {name} | {r['trial']} | {vals} | {r['val_clean']:.2f} | {r['val_robust']:.2f} | "
                         f"{(r['hm'] or 0):.2f} | {'yes' if r['trial'] == res['selected'] else ''} |")
    edge_notes = [f"- {name}: selected {', '.join(res['at_grid_edge'])} at the edge of its grid (the best value may "
                  "lie outside it)" for name, res in results.items() if res["at_grid_edge"]]
    if edge_notes:
        lines += ["", *edge_notes]
    atomic_write_text(out / "tuning.md", "\n".join(lines) + "\n")
    paths = {"json": out / "tuning.json", "md": out / "tuning.md"}
    if cfg.write is not None:
        paths["tuned"] = write_tuned(Path(cfg.write), selected, notes)
    return {"doc": doc, "paths": paths}
