"""Can a LoRA learn robustness on the testbed? LoRA-TeCoA against full-tower TeCoA, scored on validation data.

The LoRA that every LoRA method of the testbed uses (GRACE, lora-ft, lora-tecoa, lora-spd; ``configs/testbed/
common.yaml``) is chosen here on a *baseline*, never on GRACE: for each placement (attention, MLP, both), rank and
lr, LoRA-TeCoA is trained with the tuning protocol of ``grace study tune`` (configs/testbed/tuning.yaml: ID train
minus the held-out validation split, the testbed's training attack) and scored on the validation split: clean top-1
and robust top-1 under APGD-CE at 4/255. The reference is full-tower TeCoA, best over its lrs. A placement passes
when its best validation Adv reaches ``--target`` (0.8) of full TeCoA's. Prints the table and writes a JSON that
``grace results --add`` turns into a docs page.

    PYTHONPATH=. python bench/lora_capacity.py --out studies/lora_capacity \
        --json docs/results/data/bench-lora_capacity.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PLACEMENTS = {
    "attn": ["blocks.*.attn.qkv", "blocks.*.attn.proj"],
    "mlp": ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"],
    "attn+mlp": ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"],
    # ... and the tower's output projection (CLIP's visual proj, timm's ``head``), which full fine-tuning trains too
    "attn+mlp+proj": ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2", "head"],
}
# placements that also train some tower parameters in full (recipe.lora_modules_to_save, PEFT's modules_to_save):
# the patch embedding, where an input perturbation enters the tower
SAVED = {"attn+mlp+pe": ("attn+mlp", ["patch_embed.*"]), "attn+mlp+pe+norms": ("attn+mlp", ["patch_embed.*", "*norm*"])}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="studies/lora_capacity")
    ap.add_argument("--placements", default="attn,mlp,attn+mlp,attn+mlp+proj")
    ap.add_argument("--ranks", default="8,32")
    ap.add_argument("--lrs", default="1e-3,3e-3", help="LoRA-TeCoA's lrs")
    ap.add_argument("--full-lrs", default="1e-3,3e-3", help="full-tower TeCoA's lrs")
    ap.add_argument("--steps", type=int, default=None, help="default: tuning.yaml's")
    ap.add_argument("--n-val-adv", type=int, default=None, help="default: tuning.yaml's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--no-full", action="store_true", help="reuse full TeCoA's rows from --merge instead")
    ap.add_argument("--merge", default=None, help="a JSON written by an earlier run: its rows come first")
    ap.add_argument("--json", default=None, help="write the table here (for `grace results --add`)")
    args = ap.parse_args()

    from grace_app.studies.quickstart import prepare_testbed
    from grace_app.testbed.configs import load_methods, load_tuning
    from grace_app.studies.tuning import validation_trial
    from grace_plugin.data.split import holdout_split

    proto, methods = load_tuning(), load_methods()
    steps = int(args.steps or proto["steps"])
    n_val_adv = int(args.n_val_adv if args.n_val_adv is not None else proto["n_val_adv"])
    out = Path(args.out)
    data, pretrained = prepare_testbed(out, args.seed, progress=False, echo=lambda *a: None)
    val = out / "val_split"
    if not (val / "test" / "nshards.txt").is_file():
        holdout_split(data / "id", val, float(proto["val_fraction"]), int(proto.get("seed", 0)))
    ctx_args = dict(id_set=("val", val), eps=float(proto.get("eps", 4 / 255)), n_adv=n_val_adv, device="cpu",
                    seed=args.seed)
    base = {"train": {"seed": args.seed, "device": "cpu"}}
    attack = proto.get("attack", "apgd-ce")
    rows: list[dict] = []

    def trial(label: str, method: str, point: dict) -> dict:
        t0 = time.time()
        run = out / "runs" / f"{label}-lr{point['train.lr']:g}"
        s = validation_trial(methods[method], point, run, pretrained, val, steps, base, ctx_args, attack)
        row = {"model": label, "lr": point["train.lr"], "val_clean": s["val_clean"], "val_adv": s["val_robust"],
               "hm": s["hm"], "seconds": round(time.time() - t0, 1)}
        print(f"{label:<24} lr {row['lr']:<8g} val clean {row['val_clean']:6.2f}  adv {row['val_adv']:6.2f}  "
              f"({row['seconds']:.0f} s)", flush=True)
        rows.append(row)
        return row

    earlier = json.loads(Path(args.merge).read_text())["rows"] if args.merge else []
    rows.extend(earlier)
    done = {(r["model"], r["lr"]) for r in earlier}
    full = [r for r in earlier if r["model"] == "full TeCoA"]
    if not args.no_full:
        full += [trial("full TeCoA", "tecoa", {"train.lr": lr}) for lr in _floats(args.full_lrs)
                 if ("full TeCoA", lr) not in done]
    ref = max(r["val_adv"] for r in full)
    rows.sort(key=lambda r: r["model"] != "full TeCoA")  # the reference rows first
    for place in args.placements.split(","):
        for rank in (int(r) for r in args.ranks.split(",")):
            for lr in _floats(args.lrs):
                if (f"LoRA-TeCoA {place} r{rank}", lr) in done:
                    continue
                targets, saved = SAVED.get(place, (place, []))
                trial(f"LoRA-TeCoA {place} r{rank}", "lora-tecoa",
                      {"train.lr": lr, "recipe.lora_targets": PLACEMENTS[targets], "recipe.lora_rank": rank,
                       "recipe.lora_alpha": 2.0 * rank, "recipe.lora_modules_to_save": saved})
    print(f"\nreference: full TeCoA's best validation Adv {ref:.2f}; target {args.target:.0%} of it = "
          f"{args.target * ref:.2f}")
    best: dict[str, dict] = {}
    for r in (r for r in rows if r["model"] != "full TeCoA"):
        r["adv_ratio"] = r["val_adv"] / ref if ref else None
        if r["model"] not in best or r["val_adv"] > best[r["model"]]["val_adv"]:
            best[r["model"]] = r
    print("| LoRA | best lr | val clean | val Adv | Adv / full TeCoA's | passes |")
    for name, r in best.items():
        ratio = r["adv_ratio"]
        print(f"| {name} | {r['lr']:g} | {r['val_clean']:.2f} | {r['val_adv']:.2f} | "
              f"{'n/a' if ratio is None else f'{ratio:.2f}'} | "
              f"{'yes' if ratio is not None and ratio >= args.target else 'no'} |")
    if args.json:
        doc = {"bench": "table", "name": "lora_capacity",
               "title": "LoRA capacity: LoRA-TeCoA against full-tower TeCoA (validation split)",
               "command": "PYTHONPATH=. python bench/lora_capacity.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                   if v not in (None, False) and k not in ("json", "out", "merge", "no_full")),
               "notes": [f"{steps} steps, seed {args.seed}, the testbed's training attack; validation split held out "
                         f"of ID train; Adv = APGD-CE 4/255 on {n_val_adv} validation images. Reference: full "
                         f"TeCoA's best validation Adv, {ref:.2f}; a LoRA passes at {args.target:.0%} of it."
                         + (" Rows of an earlier run of the same protocol merged in (--merge)." if earlier else "")],
               "columns": ["model", "lr", "val_clean", "val_adv", "adv_ratio", "hm", "seconds"], "rows": rows,
               "date": time.strftime("%Y-%m-%d")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
