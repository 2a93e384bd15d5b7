"""Step cost of every recipe relative to ``ft``, measured side by side on one model and batch, with a floor.

The floor is the recipe's declared number of passes (``Recipe.pass_counts``: forwards, backwards to the trainable
parameters, and backwards to the input only, as an attack step does) times the measured cost of one such pass of
*that recipe's own parameterisation* (e.g. GRACE's LoRA model, whose backward computes no frozen-weight gradients)
on the same batch: the time the recipe must spend if it wastes nothing, in units of one ``ft`` step. Each timing
is the median of ``--reps`` runs. Then the recipes whose step exceeds ``--max-over-floor`` (1.15) times their floor,
and last ``grace/ft ratio R floor F``.

Per recipe it also prints images/s, and on CUDA the peak memory of one step and the model FLOP utilisation (MFU):
the step's declared passes counted in model FLOPs (a forward = F, measured by ``torch.utils.flop_counter`` on one
forward of the batch; a backward to the parameters = 2F, activation and weight gradients; a backward to the input
only = F, activation gradients) per second over the GPU's dense bf16 peak (``--peak-tflops``, or a table of known
GPUs), as in Chowdhery et al., PaLM, https://arxiv.org/abs/2204.02311, Appendix B.

    python bench/step_cost.py                     # tiny testbed tower on CPU (32 px, 3 layers)
    python bench/step_cost.py --arch vit_b32 --batch 128 --device cuda   # ViT-B/32, bf16 autocast (GPU)
    python bench/step_cost.py --recipes "ft,grace_lite,grace_lite[attack_grad=clean;awp_fraction=0.5]"  # variants
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(arch: str):
    from grace_plugin.models.classifier import ClipClassifier, ZeroShotHead
    from grace_plugin.models.clip import build_tower, tiny_clip_config, tower_spec

    if arch == "tiny":
        spec, size, dim = tower_spec("GRACE-Tiny-32", tiny_clip_config()), 32, 64
    else:
        name = {"vit_b32": "ViT-B-32-quickgelu", "vit_b16": "ViT-B-16-quickgelu"}[arch]
        spec, size, dim = tower_spec(name, {"embed_dim": 512}), 224, 512
    tower = build_tower(spec)
    head = ZeroShotHead(torch.nn.functional.normalize(torch.randn(1000, dim), dim=-1), 100.0)
    cfg = {"input_size": (3, size, size), "mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28)}
    return ClipClassifier(tower, head, cfg), size


def text_side(arch: str, classes: int = 1000):
    """A randomly initialised open_clip text side of the same CLIP (for recipes that train it, e.g. ``flyp``)."""
    import open_clip

    from grace_plugin.models.clip import ClipBundle, register_open_clip_config, tiny_clip_config
    from grace_plugin.recipes import TextSide

    if arch == "tiny":
        name, cfg = "GRACE-Tiny-32", tiny_clip_config()
        register_open_clip_config(name, cfg)
    else:
        name = {"vit_b32": "ViT-B-32-quickgelu", "vit_b16": "ViT-B-16-quickgelu"}[arch]
        cfg = open_clip.get_model_config(name)
    bundle = ClipBundle(name, cfg, open_clip.create_model(name, pretrained=None).eval())
    return TextSide(bundle, [f"class {i}" for i in range(classes)], ["a photo of a {c}."])


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def forward_flops(model, x, autocast) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), autocast(), FlopCounterMode(display=False) as fc:
        model(x)
    return float(fc.get_total_flops())


def interleaved(fns: dict, reps: int, sync) -> dict:
    """Median seconds per call of each function, timed in ``reps`` interleaved rounds (after one warm-up round), so
    that drift on a busy or throttled machine hits every recipe alike and the ratios stay side by side."""
    times: dict = {k: [] for k in fns}
    for r in range(reps + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _pass_fns(rec, batch: dict, ctx) -> dict:
    """The recipe's step, and one forward / forward+backward / forward+input-backward of its own model."""
    x, y = batch["image"], batch["label"]
    params, model = rec.trainable_parameters(), rec.model

    def step():
        for p in params:
            p.grad = None
        rec.training_step(batch, ctx).loss.backward()

    def fwd():
        with torch.no_grad(), ctx.autocast():
            model(x)

    def fwd_bwd():
        for p in params:
            p.grad = None
        with ctx.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()

    def fwd_input_bwd():  # an attack step's pass: gradient to the input only
        xi = x.detach().requires_grad_(True)
        with ctx.autocast():
            loss = torch.nn.functional.cross_entropy(model(xi).float(), y)
        torch.autograd.grad(loss, xi)

    fns = {"step": step, "fwd": fwd, "fwd_bwd": fwd_bwd}
    if (rec.pass_counts() or {}).get("input_backward"):
        fns["fwd_input_bwd"] = fwd_input_bwd
    return fns


def split_variants(spec: str) -> list[str]:
    """``"ft,grace_lite[attack_grad=clean;awp_fraction=0.5]"`` -> the two names (commas inside brackets kept)."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [n.strip() for n in [*out, cur] if n.strip()]


def parse_variant(name: str) -> tuple[str, list[str]]:
    """``grace_lite[attack_grad=clean;awp_fraction=0.5]`` -> ("grace_lite", ["recipe.attack_grad=clean", ...]): one
    recipe measured under several settings side by side in one run."""
    if "[" not in name:
        return name, []
    recipe, _, rest = name.partition("[")
    items = [i.strip() for i in rest.rstrip("]").replace(",", ";").split(";") if i.strip()]
    return recipe, [i if i.startswith(("recipe.", "train.")) else f"recipe.{i}" for i in items]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny", choices=["tiny", "vit_b32", "vit_b16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: table)")
    ap.add_argument("--recipes", default="all",
                    help="comma-separated; a variant is NAME[key=value;key=value], e.g. grace_lite[attack_grad=clean]")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="recipe overrides, e.g. recipe.pgd_steps=3")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here (docs/results pages read it)")
    ap.add_argument("--max-over-floor", type=float, default=1.15,
                    help="a recipe whose step takes more than this times its floor is listed as wasting passes")
    a = ap.parse_args()

    from grace_plugin.finetune import build_config
    from grace_plugin.recipes import StepContext, create_recipe, get_recipe_class, list_recipes
    from grace_plugin.runtime import autocast_factory

    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base, size = build(a.arch)
    x = torch.rand(a.batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (a.batch,), device=device)
    batch = {"image": x, "label": y}
    ctx = StepContext(device=device, autocast=autocast_factory(device, "auto"))
    names = list_recipes() if a.recipes == "all" else split_variants(a.recipes)
    names = ["ft"] + [n for n in names if n != "ft"]

    fns, recipes = {}, {}
    for name in names:
        torch.manual_seed(0)
        recipe, own = parse_variant(name)
        given = [o for o in a.overrides if o.startswith(("recipe.", "train."))] if name != "ft" else []
        cfg = build_config(recipe, overrides=given + own or None).recipe
        try:
            text = text_side(a.arch) if getattr(get_recipe_class(recipe), "uses_text", False) else None
            rec = create_recipe(recipe, copy.deepcopy(base).to(device), cfg, text=text).to(device)  # text towers too
        except Exception as e:  # a recipe that needs extra inputs (e.g. a text tower) is reported, not hidden
            print(f"{name:10s} skipped: {e}")
            continue
        if hasattr(rec, "awp"):  # GRACE: measure with the LAR-AWP branch active (top-curvature layers)
            rec.after_step(batch, StepContext(device=device, autocast=ctx.autocast, step=0))
        recipes[name] = rec
        fns.update({(name, k): fn for k, fn in _pass_fns(rec, batch, ctx).items()})

    peak = {}
    if device.type == "cuda":  # peak memory of one step, measured alone
        for name in recipes:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fns[name, "step"]()
            sync()
            peak[name] = torch.cuda.max_memory_allocated() / 2**30
    flops = {name: forward_flops(rec.model, x, ctx.autocast) for name, rec in recipes.items()}
    peak_tf = peak_tflops(device, a.peak_tflops)
    med = interleaved(fns, a.reps, sync)
    results = {}
    for name, rec in recipes.items():
        t, t_f = med[name, "step"], med[name, "fwd"]
        t_b = max(med[name, "fwd_bwd"] - t_f, 0.0)
        passes = rec.pass_counts()
        t_ib = max(med[name, "fwd_input_bwd"] - t_f, 0.0) if (name, "fwd_input_bwd") in med else 0.0
        floor = (passes["forward"] * t_f + passes["backward"] * t_b + passes.get("input_backward", 0) * t_ib
                 if passes else None)
        step_flops = (flops[name] * (passes["forward"] + 2 * passes["backward"] + passes.get("input_backward", 0))
                      if passes else None)
        mfu = step_flops / t / (peak_tf * 1e12) if (step_flops and peak_tf) else None
        results[name] = (t, floor, peak.get(name, float("nan")), t_f, t_b, t_ib, mfu)

    t_ft = results["ft"][0]
    width = max(10, *(len(n) for n in results))
    print(f"arch {a.arch}, batch {a.batch}, device {a.device}, overrides {a.overrides or 'none'}")
    for name, (t, floor, mem, t_f, t_b, t_ib, mfu) in results.items():
        fl = f"floor {floor / t_ft:6.2f}  R/floor {t / floor:5.2f}" if floor else "floor   n/a          "
        fl += f"  (fwd {t_f * 1e3:.1f} ms, bwd {t_b * 1e3:.1f} ms"
        fl += f", input bwd {t_ib * 1e3:.1f} ms)" if t_ib else ")"
        extra = f"  {a.batch / t:8.1f} img/s" + (f"  peak {mem:.2f} GiB" if a.device != "cpu" else "")
        extra += f"  MFU {100 * mfu:.1f}%" if mfu is not None else ""
        print(f"{name:{width}s} {t * 1e3:9.1f} ms/step  ratio {t / t_ft:6.2f}  {fl}{extra}")
    over = [f"{n} ({r[0] / r[1]:.2f})" for n, r in results.items() if r[1] and r[0] / r[1] > a.max_over_floor]
    print(f"R/floor above {a.max_over_floor:g}: {', '.join(over) if over else 'none'}")
    if "grace" in results:
        t, floor = results["grace"][:2]
        print(f"grace/ft ratio {t / t_ft:.2f} floor {floor / t_ft:.2f}")
    if a.json:
        import json

        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        rows = {n: {"ms_per_step": 1e3 * t, "ratio_to_ft": t / t_ft, "floor": floor / t_ft if floor else None,
                    "images_per_s": a.batch / t, "peak_gib": None if mem != mem else mem, "mfu": mfu}
                for n, (t, floor, mem, _tf, _tb, _tib, mfu) in results.items()}
        with open(a.json, "w") as f:
            json.dump({"bench": "step_cost", "arch": a.arch, "batch": a.batch, "device": dev, "reps": a.reps,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
