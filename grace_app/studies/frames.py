"""``grace study frames``: FRAMES-VQA's comparison (Huang et al., CVPR 2025, arXiv 2505.21755) and DiGraP's VQA claims
(ICLR 2025, arXiv 2502.15895 §4) on the embedded VQA world, for each backbone (the tiny CLIP with an answer head, the
tiny CoCa answering in words).

Rows (``FRAMES_ROWS``): zero-shot, LP, LoRA, FT, LP-FT, WiSE-FT, FTP, SPD, DiGraP, TeCoA and GRACE, each the testbed
method of ``configs/testbed/methods.yaml`` under the VQA layer (``vqa.yaml``; ``coca.yaml`` for the CoCa) and its
values tuned on the VQA world's validation split where the protocol has tuned it (``tuned-vqa.yaml``, CLIP only; a
row without is marked untuned). Every trained row runs for each seed; each run is evaluated on vqav2 test and the
nine OOD sets (VQA accuracy), under ``--attack`` on the image of the first ``--n-adv`` test questions, and, for the
first seed, by the ``shift`` suite (shift per modality, modality importance).

Layout under ``out``: ``data/`` (the world), ``pretrained/`` and ``coca/pretrained/`` (the backbones),
``runs/<backbone>/<method>/seed<k>/`` (run folders, ``eval/`` inside), ``zero_shot/<backbone>/``, ``frames.json``
and ``frames.md``. A finished run with the same config and an evaluation with the same inputs are reused, a killed
run is resumed, so the study continues across processes and days; ``--backbones``, ``--methods`` and ``--seeds``
split it into lanes, and an invocation with ``--no-judge`` leaves the page to a later one.

Verdicts (``judge``), with their statistics, on the claims the seeds can test:

* DiGraP at or above each other row on ID and on OOD (per backbone): non-inferiority by the paired 95% t interval
  over seeds of DiGraP - row, with a stated margin: holds when its lower end is above ``-margin``, fails when its
  upper end is below 0 (DiGraP is worse), otherwise inconclusive;
* near-OOD sets closer to ID than far-OOD sets (per backbone and concept, the pre-trained model's shift): the far -
  near difference of the unweighted set means, with a bootstrap over each set's questions;
* larger shift, larger drop (per backbone, row and concept): Spearman's rho across the sets between a set's shift
  (the row's own model, first seed) and its accuracy, with its p-value; the claim holds when rho < 0 at p < 0.05;
* which modality the joint shift follows (per backbone and row): the per-sample Pearson of (image, joint) against
  (question, joint), paired over the OOD sets by a t interval: "image" when its 95% interval is above 0, "question"
  when below, otherwise inconclusive (a question, not a directional claim).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grace_plugin.config import checked, validate

from .frames_page import AXES, frames_markdown
from .frames_page import first_analysis as _first_analysis

__all__ = ["FRAMES_ROWS", "FramesConfig", "run_frames", "frames_status", "judge", "non_inferior", "config_id"]

# row label -> testbed method (None: the pre-trained model, zero-shot)
FRAMES_ROWS = {"zero-shot": None, "LP": "lp", "LoRA": "lora-ft", "FT": "ft", "LP-FT": "lp_ft", "WiSE-FT": "wise_ft",
               "FTP": "ftp", "SPD": "spd", "DiGraP": "digrap", "TeCoA": "tecoa", "GRACE": "grace"}
BACKBONES = ("clip", "coca")
MARGIN = 1.0  # points of VQA accuracy: "at or above" holds when DiGraP is not more than this below (non-inferiority)
NEAR_FAR = ("uni_image", "uni_question", "joint")  # the concepts the near/far claim is judged on (pre-trained model)


@dataclass
class FramesConfig:
    out: Path
    seed: int = 0  # the world's seed
    seeds: list[int] = field(default_factory=lambda: list(range(5)))
    backbones: list[str] = field(default_factory=lambda: list(BACKBONES))
    methods: list[str] = field(default_factory=lambda: list(FRAMES_ROWS))
    steps: int = checked(300, flag="--steps", gt=0)
    n_adv: int = checked(100, flag="--n-adv", ge=0)
    n_shift: int = checked(200, flag="--n-shift", gt=0)
    eps: float = checked(4 / 255, flag="--eps", ge=0, le=1)
    attack: str = "apgd-ce"
    size: str = "default"
    pretrain_steps: int | None = checked(None, flag="--pretrain-steps", gt=0)
    device: str = "auto"
    judge: bool = True

    def __post_init__(self):
        from grace_plugin.errors import UsageError

        validate(self)
        for what, given, known in (("--backbones", self.backbones, BACKBONES), ("--methods", self.methods,
                                                                                 list(FRAMES_ROWS))):
            bad = [g for g in given if g not in known]
            if bad or not given:
                raise UsageError(f"{what} {bad[0] if bad else ''!r}: valid: {', '.join(known)}")


# ------------------------------------------------------------------------------------------ statistics (pure)
def t_interval(values: list[float]) -> dict | None:
    """Mean and two-sided 95% Student-t interval of ``values`` (None with fewer than two)."""
    from scipy import stats

    if len(values) < 2:
        return None
    m, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    h = float(stats.t.ppf(0.975, len(values) - 1)) * se
    return {"mean": m, "ci95": [m - h, m + h], "n": len(values)}


def non_inferior(diffs: list[float], margin: float = MARGIN) -> dict:
    """The verdict on "a at or above b" from per-seed differences a - b: holds when the paired 95% t interval's lower
    end is above ``-margin``, fails when its upper end is below 0, else inconclusive."""
    ci = t_interval(diffs)
    if ci is None:
        return {"verdict": "inconclusive", "why": "fewer than two seeds", "margin": margin}
    if ci["ci95"][0] == ci["ci95"][1]:  # equal differences on every seed: a zero-width interval is no test
        return {"verdict": "inconclusive", "why": f"the same difference on all {ci['n']} seeds: no spread",
                "margin": margin, **ci}
    lo, hi = ci["ci95"]
    verdict = "holds" if lo > -margin else "fails" if hi < 0 else "inconclusive"
    return {"verdict": verdict, **ci, "margin": margin}


def bootstrap_far_minus_near(near: list[list[float]], far: list[list[float]], n_boot: int = 4000, seed: int = 0
                             ) -> dict:
    """Mean over far sets minus mean over near sets of each set's mean per-sample value, with a percentile bootstrap
    95% interval resampling each set's samples (the sets are fixed: they are the claim's populations)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def group(sets, resample):
        return float(np.mean([np.mean(s[rng.integers(0, len(s), len(s))] if resample else s) for s in sets]))

    near_a, far_a = [np.asarray(s, float) for s in near], [np.asarray(s, float) for s in far]
    point = group(far_a, False) - group(near_a, False)
    reps = [group(far_a, True) - group(near_a, True) for _ in range(n_boot)]
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return {"mean": point, "ci95": [float(lo), float(hi)], "kind": "bootstrap over each set's questions"}


def spearman_test(x: list[float], y: list[float]) -> dict:
    from scipy import stats

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"rho": None, "p": None, "n": len(x)}
    r = stats.spearmanr(x, y)
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n": len(x)}


# ------------------------------------------------------------------------------------------ running
def _layers(backbone: str, method: str) -> dict:
    from ..testbed.configs import _load, merge, nest

    layer = _load("vqa.yaml")
    if backbone == "coca":
        layer = merge(layer, _load("coca.yaml"))
    # the VQA protocol's selections (grace study tune --task vqa --backbones B) for this method, where it ran
    return merge(layer, nest(_tuned(backbone).get(method) or {}))


def _tuned_file(backbone: str) -> Path:
    """The VQA protocol's selections for ``backbone`` (``grace study tune --task vqa --backbones B`` writes it)."""
    from ..testbed.configs import testbed_dir

    return testbed_dir() / ("tuned-vqa.yaml" if backbone == "clip" else f"tuned-vqa-{backbone}.yaml")


def _tuned(backbone: str) -> dict:
    from ..testbed.configs import _load

    f = _tuned_file(backbone)
    return (_load(f.name) or {}) if f.is_file() else {}


def _tuned_methods() -> dict[str, list[str]]:
    return {b: sorted(_tuned(b)) for b in BACKBONES}


def _tuned_worlds() -> dict[str, dict[str, int]]:
    """The world seed each tuned value was selected on, per backbone and method, from the note
    ``grace study tune`` writes above it (``# [method] ... seed N: ...``); a study on another world reuses them."""
    import re

    out: dict[str, dict[str, int]] = {}
    for b in BACKBONES:
        f = _tuned_file(b)
        if f.is_file():
            out[b] = {m.group(1): int(m.group(2)) for m in re.finditer(r"^# \[(\S+)\] .*?, seed (\d+):",
                                                                        f.read_text(), re.M)}
    return out


def config_id(recipe: str, resolved: dict) -> str:
    """A short hash of a run's resolved config without its seed and device: the seeds of one row share it, so a
    testbed file edited between two lanes (another learning rate, say) shows as two ids in one row."""
    import hashlib

    d = json.loads(json.dumps(resolved, default=str))
    for k in ("seed", "device"):
        (d.get("train") or {}).pop(k, None)
    return hashlib.sha256(json.dumps([recipe, d], sort_keys=True).encode()).hexdigest()[:12]


def _run_dir(out: Path, backbone: str, method: str, seed: int) -> Path:
    return Path(out) / "runs" / backbone / method / f"seed{seed}"


def _train(cfg: FramesConfig, backbone: str, method: str, seed: int, data: Path, pretrained: Path, device: str,
           echo) -> tuple[Path, str, str]:
    from grace_plugin.config import to_dict
    from grace_plugin.finetune import fine_tune

    from ..testbed.configs import load_methods, merge, method_config
    from .runner import finished_run_matches, killed_run_matches

    m = load_methods()[method]
    run_dir = _run_dir(cfg.out, backbone, method, seed)
    run_cfg = method_config(m, tuned=False, steps=cfg.steps, overrides=merge(
        _layers(backbone, method), {"train": {"seed": seed, "device": device}}))
    cid = config_id(m.recipe, to_dict(run_cfg))
    if finished_run_matches(run_dir, m.recipe, to_dict(run_cfg)):
        return run_dir, "reused", cid
    resume = killed_run_matches(run_dir, m.recipe, to_dict(run_cfg))
    echo(f"      {backbone} {method} seed {seed}: {'resuming' if resume else 'training'}")
    fine_tune(m.recipe, pretrained, data / "vqav2", run_dir, run_cfg, progress=False, resume=resume)
    return run_dir, "resumed" if resume else "trained", cid


def _evaluate(cfg: FramesConfig, model: Path, dest: Path, data: Path, device: str, shift: bool) -> dict:
    """The run's report (reused when ``dest`` holds one made from the same inputs, or from the same with the shift
    suite where none is asked: a lane that analysed a later seed first is not evaluated again)."""
    from eval_suites.context import ShiftOptions, SuiteContext
    from eval_suites.engine import evaluate, expand_shorthands, write_evaluation
    from grace_plugin.tensor_io import atomic_write_text

    from .quickstart_vqa import OOD_SETS

    weights = model / "model.safetensors" if (model / "model.safetensors").is_file() else \
        model / "open_clip_model.safetensors"
    inputs = {"model": str(model), "weights_mtime_ns": weights.stat().st_mtime_ns, "attack": cfg.attack,
              "eps": cfg.eps, "n_adv": cfg.n_adv, "shift": shift, "n_shift": cfg.n_shift, "seed": cfg.seed}
    marker = dest / "frames-inputs.json"
    if (dest / "report.json").is_file() and marker.is_file() and json.loads(marker.read_text()) in (
            inputs, {**inputs, "shift": True}):
        return json.loads((dest / "report.json").read_text())
    names, sets = expand_shorthands(f"vqav2={data / 'vqav2'}", [f"{n}={data / n}" for n in OOD_SETS],
                                    cfg.attack if cfg.n_adv else None)
    if shift:
        names.append("shift")
    ctx = SuiteContext(task="vqa", id_set=f"vqav2={data / 'vqav2'}", sets=sets, device=device, eps=cfg.eps,
                       n_adv=cfg.n_adv, seed=cfg.seed, out_dir=dest, answers_min_count=9,
                       shift=ShiftOptions(n=cfg.n_shift, n_fit=2 * cfg.n_shift))
    write_evaluation(dest, evaluate(str(model), names, ctx), ctx)
    atomic_write_text(marker, json.dumps(inputs, indent=2) + "\n")
    return json.loads((dest / "report.json").read_text())


def _record(rep: dict, run: Path | None, dest: Path) -> dict:
    """What the page needs of one evaluated model (the zero-shot model's per-question distances too: the near/far
    claim resamples them)."""
    from eval_suites.vqa_summary import vqa_row

    row = vqa_row("-", rep)
    out = {"axes": {a: row.get(a) for a in AXES}, "sets": row["sets"]}
    an = rep.get("analysis")
    if an:
        out["analysis"] = {k: an[k] for k in ("shift", "concept_pairs", "modality_importance") if k in an}
        if run is None:
            out["analysis"]["samples_by_set"] = {
                f.stem: {c: v for c, v in json.loads(f.read_text()).items() if c != "question_id"}
                for f in sorted((dest / "shift").glob("*.json"))}
    if run is not None:
        meta = json.loads((run / "checkpoint.json").read_text())
        train = (meta.get("metrics") or {}).get("train") or {}
        out["cpu_seconds"] = train.get("total_cpu_seconds") or train.get("cpu_seconds")
    return out


def run_frames(cfg: FramesConfig, progress: bool = True, echo=print) -> dict:
    from grace_plugin.runtime import resolve_device
    from grace_plugin.tensor_io import atomic_write_text

    from .quickstart_vqa import prepare_vqa_testbed

    out, t0 = Path(cfg.out), time.time()
    _check_protocol(cfg)
    device = str(resolve_device(cfg.device))
    store = out / "frames-records.json"  # every evaluated model's record, merged across lanes
    total = {"reused": 0, "resumed": 0, "trained": 0}
    for backbone in cfg.backbones:
        counts = {"reused": 0, "resumed": 0, "trained": 0}
        data, pretrained = prepare_vqa_testbed(out, cfg.seed, cfg.size, cfg.pretrain_steps, progress, echo, {},
                                               backbone)
        for label in cfg.methods:
            method = FRAMES_ROWS[label]
            if method is None:
                t1 = time.process_time()
                rep = _evaluate(cfg, pretrained, out / "zero_shot" / backbone, data, device, shift=True)
                _store(store, backbone, label, None, _record(rep, None, out / "zero_shot" / backbone)
                       | {"eval_cpu_seconds": time.process_time() - t1})
                continue
            for k in cfg.seeds:
                run, how, cid = _train(cfg, backbone, method, k, data, pretrained, device, echo)
                counts[how] += 1
                t1 = time.process_time()
                rep = _evaluate(cfg, run, run / "eval", data, device, shift=_shift_here(store, backbone, label, k))
                _store(store, backbone, label, k, _record(rep, run, run / "eval")
                       | {"eval_cpu_seconds": time.process_time() - t1, "config_id": cid})
        echo(f"      {backbone}: {counts['reused']} runs reused, {counts['resumed']} resumed, "
             f"{counts['trained']} trained")
        total = {k: total[k] + v for k, v in counts.items()}
    doc = None
    if cfg.judge:
        records = _compact(json.loads(store.read_text()))
        doc = {"kind": "frames", "world_seed": cfg.seed, "steps": cfg.steps, "attack": cfg.attack, "eps": cfg.eps,
               "n_adv": cfg.n_adv, "n_shift": cfg.n_shift, "margin": MARGIN, "tuned": _tuned_methods(),
               "tuned_on": _tuned_worlds(),
               "rows": FRAMES_ROWS, "records": records, "verdicts": judge(records), "size": cfg.size,
               # the invocation that judged (its lanes' records are all of ``records``, whatever it ran itself)
               "judged_by": {k: str(v) for k, v in asdict(cfg).items()}, "seconds": round(time.time() - t0, 1),
               "pretrain_seconds": _pretrain_seconds(out, records)}
        atomic_write_text(out / "frames.json", json.dumps(doc, separators=(",", ":")) + "\n")  # per-question data
        atomic_write_text(out / "frames.md", frames_markdown(doc))
    return {"doc": doc, "counts": total, "seconds": round(time.time() - t0, 1)}


def _pretrain_seconds(out: Path, records: dict) -> dict[str, float]:
    """Each backbone's pretraining time as its open_clip_config.json records it (one pinned thread: wall = CPU),
    the study's cost beside its runs' (a cached model was pretrained once, by whichever study came first)."""
    from .quickstart_vqa import backbone_folder

    got = {}
    for b in records:
        f = backbone_folder(out, b) / "pretrained" / "open_clip_config.json"
        seconds = json.loads(f.read_text()).get("seconds") if f.is_file() else None
        if isinstance(seconds, (int, float)):
            got[b] = float(seconds)
    return got


def frames_status(cfg: FramesConfig) -> str:
    """What ``cfg.out`` holds for ``cfg``'s backbones, rows and seeds, one line per row: seeds stored (evaluated and
    recorded), trained but not recorded, a staged state (a run in progress, or a killed one that a lane resumes),
    missing."""
    from grace_plugin.runfolder import partial_dir

    out = Path(cfg.out)
    store = out / "frames-records.json"
    records = json.loads(store.read_text()) if store.is_file() else {}
    lines = [f"{out}: frames study, VQA world seed {cfg.seed}"]
    for backbone in cfg.backbones:
        for label in cfg.methods:
            recs = (records.get(backbone) or {}).get(label) or {}
            if FRAMES_ROWS[label] is None:
                lines.append(f"  {backbone} {label}: {'stored' if 'zero' in recs else 'missing'}")
                continue
            state: dict[str, list[str]] = {}
            for k in cfg.seeds:
                run = _run_dir(out, backbone, FRAMES_ROWS[label], k)
                what = "stored" if str(k) in recs else "trained, not recorded" if (run / "checkpoint.json").is_file() \
                    else "staged (running, or killed: a lane resumes it)" if (partial_dir(run) / "train_state.pt"
                                                                              ).is_file() else "missing"
                state.setdefault(what, []).append(str(k))
            lines.append(f"  {backbone} {label}: " + "; ".join(f"{w} {','.join(v)}" for w, v in state.items()))
    return "\n".join(lines)


def _check_protocol(cfg: FramesConfig) -> None:
    """One study folder, one protocol: its records are pooled across invocations, so an invocation whose run length,
    attack, shift size, world or size differ from the folder's first is refused (use another --out)."""
    from grace_plugin.errors import UsageError
    from grace_plugin.tensor_io import atomic_write_text

    protocol = {"steps": cfg.steps, "attack": cfg.attack, "eps": cfg.eps, "n_adv": cfg.n_adv, "n_shift": cfg.n_shift,
                "world_seed": cfg.seed, "size": cfg.size, "pretrain_steps": cfg.pretrain_steps}
    f = Path(cfg.out) / "frames-protocol.json"
    if f.is_file():
        before = json.loads(f.read_text())
        changed = [k for k in protocol if before.get(k) != protocol[k]]
        if changed:
            raise UsageError(f"--out {cfg.out}: a frames study with {changed[0]}={before.get(changed[0])!r}, not "
                             f"{protocol[changed[0]]!r}; its records would mix two protocols (use another --out)")
        return
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(f, json.dumps(protocol, indent=2) + "\n")


def _compact(records: dict) -> dict:
    """The per-question distances kept for the near/far claim, to 3 decimals (the page's JSON stays small; the claim
    is judged on exactly what the page's JSON holds)."""
    for rows in records.values():
        for recs in rows.values():
            for r in recs.values():
                per = (r.get("analysis") or {}).get("samples_by_set") or {}
                for name, concepts in per.items():
                    per[name] = {c: [round(float(x), 3) for x in v] for c, v in concepts.items() if c in NEAR_FAR}
    return records


def _shift_here(store: Path, backbone: str, label: str, seed: int) -> bool:
    """Whether run ``seed`` of a row gets the shift suite: unless a lower seed of the row already has it (the page
    reads a row's lowest analysed seed), so a lane of later seeds does not repeat it once seed 0's lane has run."""
    recs = ((json.loads(store.read_text()) if store.is_file() else {}).get(backbone) or {}).get(label) or {}
    return not any(k.isdigit() and int(k) < seed and r.get("analysis") for k, r in recs.items())


def _store(store: Path, backbone: str, label: str, seed: int | None, record: dict) -> None:
    """Add one record to the study's store under a lock (lanes write it concurrently)."""
    from grace_plugin.runfolder import folder_lock
    from grace_plugin.tensor_io import atomic_write_text

    with folder_lock(store.parent / ".frames-store", what="frames records", wait=lambda _msg: None):
        doc = json.loads(store.read_text()) if store.is_file() else {}
        doc.setdefault(backbone, {}).setdefault(label, {})["zero" if seed is None else str(seed)] = record
        atomic_write_text(store, json.dumps(doc, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ verdicts
def _by_seed(rows: dict, label: str, axis: str) -> dict[str, float]:
    """``{seed: value}`` of a row's axis; the zero-shot row (no seeds) is the same model under every seed."""
    recs = rows.get(label) or {}
    if "zero" in recs:
        v = recs["zero"]["axes"].get(axis)
        return {} if v is None else {"*": v}
    return {k: r["axes"][axis] for k, r in recs.items() if r["axes"].get(axis) is not None}


def _diffs(rows: dict, a: str, b: str, axis: str) -> list[float]:
    va, vb = _by_seed(rows, a, axis), _by_seed(rows, b, axis)
    if "*" in vb:
        vb = {k: vb["*"] for k in va}
    if "*" in va:
        va = {k: va["*"] for k in vb}
    return [va[k] - vb[k] for k in sorted(set(va) & set(vb))]


def _check_one_config(records: dict) -> None:
    """Refuse to pool a row whose seeds ran under two configs (a testbed file changed between lanes)."""
    from grace_plugin.errors import UsageError

    for backbone, rows in records.items():
        for label, recs in rows.items():
            ids: dict[str, list[str]] = {}
            for k, r in recs.items():
                if r.get("config_id"):
                    ids.setdefault(r["config_id"], []).append(k)
            if len(ids) > 1:
                raise UsageError(f"frames records: {backbone} {label}: seeds ran under {len(ids)} configs ("
                                 + "; ".join(f"{c}: seeds {', '.join(sorted(v))}" for c, v in ids.items())
                                 + "); rerun the row's seeds under today's testbed files, or use another --out")


def judge(records: dict, margin: float = MARGIN) -> list[dict]:
    """Every claim's verdict with its statistics, per backbone (see the module docstring)."""
    from .quickstart_vqa import OOD_SETS

    near, far = OOD_SETS[:6], OOD_SETS[6:]
    out = []
    _check_one_config(records)
    for backbone, rows in records.items():
        if "DiGraP" in rows:
            for label in rows:
                if label == "DiGraP":
                    continue
                for axis in ("id", "ood"):
                    out.append({"backbone": backbone, "claim": f"DiGraP at or above {label} on {axis.upper()}",
                                "test": f"non-inferiority, margin {margin:g} points, paired t over seeds",
                                **non_inferior(_diffs(rows, "DiGraP", label, axis), margin)})
        zs = _first_analysis(rows, "zero-shot")
        if zs and zs.get("samples_by_set"):
            for concept in NEAR_FAR:
                per = zs["samples_by_set"]
                if all(n in per and concept in per[n] for n in near + far):
                    d = bootstrap_far_minus_near([per[n][concept] for n in near], [per[n][concept] for n in far])
                    verdict = "holds" if d["ci95"][0] > 0 else "fails" if d["ci95"][1] < 0 else "inconclusive"
                    out.append({"backbone": backbone, "claim": f"near-OOD sets closer to ID than far-OOD ({concept}, "
                                "pre-trained)", "test": "far - near mean distance, bootstrap 95%", "verdict": verdict,
                                **d})
        for label in rows:
            an = _first_analysis(rows, label)
            recs = rows[label]
            first = recs.get("zero") or recs.get(str(min((int(k) for k in recs if k.isdigit()), default=0)))
            if not an or not first:
                continue
            for concept in ("image", "question", "joint"):
                names = [n for n in an["shift"] if concept in an["shift"][n] and n in first["sets"]]
                t = spearman_test([an["shift"][n][concept] for n in names], [first["sets"][n] for n in names])
                verdict = "inconclusive" if t["rho"] is None or t["p"] >= 0.05 else \
                    ("holds" if t["rho"] < 0 else "fails")
                out.append({"backbone": backbone, "claim": f"larger shift, lower accuracy ({label}, {concept})",
                            "test": "Spearman across the sets (the row's first seed), p < 0.05", "verdict": verdict,
                            **t})
            pairs = an.get("concept_pairs") or {}
            diffs = [pairs[n]["image~joint"] - pairs[n]["question~joint"] for n in OOD_SETS
                     if n in pairs and pairs[n].get("image~joint") is not None
                     and pairs[n].get("question~joint") is not None]
            ci = t_interval(diffs)
            follows = "inconclusive" if ci is None else "image" if ci["ci95"][0] > 0 else \
                "question" if ci["ci95"][1] < 0 else "inconclusive"
            out.append({"backbone": backbone, "claim": f"which modality the joint shift follows ({label})",
                        "test": "r(image, joint) - r(question, joint) over the OOD sets, t 95%: image when above 0, "
                        "question when below", "verdict": follows, **(ci or {})})
    return out
