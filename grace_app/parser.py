"""The ``grace`` command line's arguments: one ``argparse`` parser, its sub-commands and their flags (the commands
themselves are grace_app/cli.py)."""
from __future__ import annotations

import argparse
import os

__all__ = ["build_parser"]


PRETRAIN_THREADS_HELP = ("torch threads the tiny CLIP is pretrained under (default 1; the thread count changes "
                         "the model, so it is pinned and part of the cache key)")
EVAL_DESCRIPTION = """Every evaluation is a list of suites, run in order into one report (--out/report.json).
The shorthands expand into suites, placed before the --suite names (duplicates dropped):

  --data [NAME=]DIR   the ID set, and suite `id`
  --ood SET           suite `ood:SET` (repeatable, or SET,SET,...); SET is NAME=DIR, a folder, or a
                      catalogued name (eval_suites/catalogue.yaml) resolved under --data-root
  --attack NAME       suite `adv:NAME` on the first --n-adv ID samples

so `--data D --ood imagenet-r --attack apgd-ce` is `--data D --suite id --suite ood:imagenet-r --suite
adv:apgd-ce`. A set is scored the same whichever way it is named: the catalogue's scoring (own head, the
ID head restricted to its class subset, or a class mapping), --scoring/--mapping overrides, expected and
unaccounted samples, --strict, --decode. Under `torchrun --nproc_per_node N -m grace_app eval ...` the
batches are split over the ranks, per-sample results gathered, and rank 0 writes the one-process report.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grace", description="Robust fine-tuning of CLIP: GRACE and baselines, "
                                "timm/RobustBench registration, three-axis evaluation.")
    p.add_argument("--verbose", "-v", action="store_true", help="info-level logs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the synthetic testbed (WebDataset shards, CLIP_benchmark layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--world", choices=["v1", "v2"], default="v2",
                   help="world version: v2 (calibrated on the baselines) or v1 (the first design, for comparison)")
    s.add_argument("--size", choices=["default", "small"], default="default",
                   help="small: a few hundred images, for smoke tests")
    s.add_argument("--task", choices=["classification", "vqa"], default="classification",
                   help="vqa: the VQA world, ten sets in FRAMES-VQA's roles (grace_app/testbed/vqa_world.py)")

    t = sub.add_parser("train", help="fine-tune a CLIP with a recipe")
    t.add_argument("--recipe", required=True)
    t.add_argument("--init", required=True, help="CLIP folder (e.g. quickstart's pretrained/) or NAME:PRETRAINED")
    t.add_argument("--data", required=True, help="shard set folder with a train split")
    t.add_argument("--out", required=True, help="run folder to write")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int)
    g.add_argument("--epochs", type=float)
    t.add_argument("--config", help="YAML with train/data/recipe sections (deltas only)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-5 --set recipe.rho=0.1")
    t.add_argument("--resume", nargs="?", const="auto", choices=["auto"],
                   help="auto (also the bare flag): continue a killed or preempted run from its state, extend a "
                        "finished one to more --steps, start afresh on an empty RUN_DIR; a changed config is refused")
    t.add_argument("--requeue", action="store_true",
                   help="when preempted (train.preempt_signals), rank 0 also runs `scontrol requeue $SLURM_JOB_ID`")
    t.add_argument("--device", help="auto (CUDA when available, the default of train.device), cuda, cuda:1, cpu")
    t.add_argument("--task", choices=["classification", "vqa"], help="data.task (default classification): vqa "
                   "trains a CLIP VQA model on a VQA set (grace shards convert --format frames|coco-vqa)")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="evaluate a model: a list of suites (ID, OOD, adversarial, ...)",
                       description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", help="run folder, weights file, CLIP folder or timm model name (required, except with "
                   "--task vqa --predictions)")
    e.add_argument("--data", metavar="[NAME=]DIR",
                   help="ID set: a shard set or an ImageNet val folder (named 'id' unless NAME=); adds suite id")
    e.add_argument("--ood", action="append", default=[], metavar="SET[,SET...]",
                   help="adds suite ood:SET per set: NAME=DIR, a folder, or a catalogued name under --data-root")
    e.add_argument("--attack", help="adds suite adv:ATTACK (see `grace list attacks`)")
    e.add_argument("--eps", default="4/255", help="l_inf radius, e.g. 4/255 or 0.0157")
    e.add_argument("--norm", default="Linf")
    e.add_argument("--n-adv", type=int, default=500)
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--num-workers", type=int, default=0)
    e.add_argument("--decode", choices=["pil", "tensor"], default="pil",
                   help="shard image decoding: pil (timm's/RobustBench's preprocessing exactly) or tensor "
                        "(torchvision decode + tensor resize, about 2x faster, within 2 grey levels of PIL)")
    e.add_argument("--device", default="auto", help="auto (CUDA when available; each torchrun rank its GPU), cuda, cpu")
    e.add_argument("--strict", action="store_true", help="any skipped or unaccounted sample is an error")
    e.add_argument("--scoring", choices=["own", "subset", "mapping"],
                   help="override the catalogue's scoring of OOD sets (own head / ID head restricted / mapped)")
    e.add_argument("--mapping", action="append", default=[], metavar="NAME=FILE",
                   help="class mapping JSON for a set scored by 'mapping' "
                        "(e.g. objectnet=objectnet_to_imagenet_1k.json)")
    e.add_argument("--out", required=True)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--task", choices=["classification", "vqa"], default="classification",
                   help="vqa: VQA accuracy per set (--data NAME=DIR the ID set, --ood NAME=DIR each OOD set), "
                        "ID / near / far / OOD means, predictions/<set>.json in the VQA result format")
    e.add_argument("--predictions", action="append", default=[], metavar="[SET=]FILE",
                   help="vqa: score this result file ([{question_id, answer}]) instead of running --model")
    e.add_argument("--answers-min-count", type=int, default=9, help="vqa, zero-shot (a CLIP --model): answers")
    e.add_argument("--suite", action="append", default=[], metavar="NAME",
                   help="run registered suites after the shorthands' (repeatable; see `grace list suites`): id, "
                        "ood:<set>, adv:<attack>, transfer:<set>, corruptions, geometry, shift, robustbench")
    e.add_argument("--data-root", default=os.environ.get("GRACE_DATA"),
                   help="root of the data sets: `--ood imagenet-r` and ood:<name>/transfer:<name> resolve to its "
                        "catalogued folder (eval_suites/catalogue.yaml) or <root>/<name> (default $GRACE_DATA)")
    e.add_argument("--imagenet-dir", help="ImageNet folder holding val/<wnid>/ (suite robustbench)")
    e.add_argument("--corruptions-dir", help="folder holding ImageNet-C/<corruption>/<severity>/ (suite corruptions)")
    e.add_argument("--n-imagenet", type=int, default=5000, help="images of RobustBench's ImageNet subset")
    e.add_argument("--unit-input", action="store_true", default=None,
                   help="assert the model takes [0,1] input when it does not declare it")
    e.add_argument("--reference", help="pretrained model for the parameter drift (suite geometry); vqa --shift: "
                   "the pre-trained CLIP of the uni-modal embeddings (default: the run's --init)")
    e.add_argument("--shift", action="store_true", help="the suite shift (= --suite shift): the Mahalanobis shift of "
                   "each OOD set from ID; vqa: per modality, with the modality importance of every set (docs/vqa.md)")
    e.add_argument("--n-shift", type=int, default=1000, help="suite shift: images (vqa: questions) scored per set")
    e.add_argument("--model-info-name", help="write RobustBench model_info/<dataset>/<threat>/<NAME>.json")
    e.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("report", help="aggregate run folders' report.json into one table and plot")
    r.add_argument("runs", nargs="+", metavar="RUN", help="folders holding report.json (or the files)")
    r.add_argument("--out", required=True, help="folder for summary.json, summary.md, tradeoff.png")
    r.add_argument("--table", default="Table 6", help="paper reference table beside the runs ('none' to omit)")

    q = sub.add_parser("quickstart", help="the whole flow on the embedded testbed in minutes on a CPU")
    q.add_argument("--out", default="quickstart")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--task", choices=["classification", "vqa"], default="classification",
                   help="vqa: the VQA world; rows zero-shot, LoRA, FT, DiGraP, GRACE (--recipes picks among them)")
    q.add_argument("--recipes", help="comma-separated recipe names, or 'all' (default ft,tecoa,grace; vqa: all rows)")
    q.add_argument("--steps", type=int, default=300, help="fine-tuning steps per recipe")
    q.add_argument("--n-adv", type=int, help="ID images (vqa: questions) attacked per model (default 200; vqa 100)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every recipe run, e.g. --set train.batch_size=32")
    q.add_argument("--size", choices=["default", "small"], default="default", help="small: a smoke run")
    q.add_argument("--seeds", type=int, default=1, help="fine-tune and attack with this many seeds; mean and spread")
    q.add_argument("--pretrain-steps", type=int, help="tiny-CLIP pretraining steps (default 1500)")
    q.add_argument("--pretrain-threads", type=int, help=PRETRAIN_THREADS_HELP)
    q.add_argument("--world", choices=["v1", "v2"], default="v2", help="synthetic world version (see grace synth)")
    q.add_argument("--backbone", choices=["clip", "coca"], default="clip",
                   help="vqa: clip (the world's tiny CLIP, an answer head) or coca (its tiny CoCa, answers in words; "
                        "written under OUT/coca)")
    q.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cpu")
    q.add_argument("--no-progress", action="store_true")

    st = sub.add_parser("study", help="a named study on the testbed (configs/testbed/studies.yaml: table6, table7, "
                        "table8, core, geometry, shift, cost) with verdicts on the paper's claims; or `study tune`: "
                        "the tuning protocol (its own command path and flags)")
    st.add_argument("name", help="study name (table6, table7, table8, core, geometry, shift, cost), 'tune', "
                    "'controls' (positive controls: grace_app/studies/controls.py) or 'frames' (FRAMES-VQA and "
                    "DiGraP's VQA claims on the VQA world: grace_app/studies/frames.py)")
    st.add_argument("--out", help="output folder (default studies/NAME)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--steps", type=int, help="fine-tuning steps per run (study default 300; tune: tuning.yaml)")
    st.add_argument("--size", choices=["default", "small"], default="default", help="small: a smoke run")
    st.add_argument("--pretrain-steps", type=int, help="tiny-CLIP pretraining steps")
    st.add_argument("--pretrain-threads", type=int, help=PRETRAIN_THREADS_HELP)
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field of every run, e.g. --set train.batch_size=32")
    st.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cpu")
    st.add_argument("--methods", help="tune: comma-separated methods of configs/testbed/methods.yaml; a study: only "
                    "these of its rows (e.g. to add seeds to two rows; finished runs are reused)")
    st.add_argument("--no-progress", action="store_true")
    sg = st.add_argument_group("a named study only")
    sg.add_argument("--seeds", help="seeds per row: N (seeds seed..seed+N-1; default 1), or a list/range of run "
                    "seeds on --seed's world, e.g. 4-7 or 0,2,5 (to split a study over processes on one --out)")
    sg.add_argument("--n-adv", type=int, help="ID images attacked per model (default 600: the whole ID test split "
                    "of the default world)")
    cg = st.add_argument_group("study controls only")
    cg.add_argument("--control", help="comma-separated controls (default all: awp-dose, overfit, ranks, volume)")
    cg.add_argument("--arms", help="only these arms of the control (a lane; the control is judged by an "
                    "invocation that runs every arm, reusing the finished runs)")
    fg = st.add_argument_group("study frames only")
    fg.add_argument("--backbones", help="comma-separated: clip, coca (default both; study tune --task vqa: one, "
                    "default clip)")
    fg.add_argument("--n-shift", type=int, help="questions per set scored by the shift suite (default 200)")
    fg.add_argument("--no-judge", action="store_true", default=None,
                    help="train and evaluate this lane only; a later invocation writes the page")
    fg.add_argument("--status", action="store_true", default=None,
                    help="say what --out holds for these rows and seeds (stored, trained but not recorded, staged: "
                    "running or killed and resumable, missing) and run nothing")
    tg = st.add_argument_group("study tune only")
    tg.add_argument("--trials", type=int, help="trials per method (default: tuning.yaml's)")
    tg.add_argument("--n-val-adv", type=int, help="validation images attacked per trial")
    tg.add_argument("--rescore-seeds", type=int, help="seeds the top trials are scored on (default: tuning.yaml's; "
                    "1: no re-scoring)")
    tg.add_argument("--write", help="tuned.yaml to update (default configs/testbed/tuned.yaml; --task vqa: "
                    "tuned-vqa.yaml)")
    tg.add_argument("--no-write", action="store_true", default=None, help="do not write the selected values")
    tg.add_argument("--task", choices=["classification", "vqa"], help="vqa: tune on the VQA world (trials train on "
                    "vqav2 train and are scored by VQA accuracy on its val split)")

    sh = sub.add_parser("shards", help="shard utilities")
    shs = sh.add_subparsers(dest="shards_command", required=True)
    cv = shs.add_parser("convert", help="ImageFolder tree or VQA records -> WebDataset shards (verified)")
    cv.add_argument("--format", default="imagefolder", help="imagefolder (--imagefolder), classification "
                    "(--source-set) or a VQA record format: "
                    "frames (--records), coco-vqa (--questions, --annotations, --image-pattern); VQA sets need "
                    "--images and are written in the vqa layout (grace_plugin.vqa.records.list_formats)")
    cv.add_argument("--imagefolder")
    cv.add_argument("--source-set", help="--format classification: a classification shard set to recast as VQA "
                    "(\"what is in the image?\", its class name the answer; docs/vqa.md)")
    cv.add_argument("--records", help="frames: the record list (question_id, question, image, answer)")
    cv.add_argument("--questions", help="coco-vqa: the questions JSON")
    cv.add_argument("--annotations", help="coco-vqa: the annotations JSON")
    cv.add_argument("--images", help="VQA formats: the folder image paths are relative to")
    cv.add_argument("--image-pattern", help="coco-vqa: image file name from image_id, e.g. "
                    "COCO_val2014_{image_id:012d}.jpg")
    cv.add_argument("--name", help="VQA formats: the set's name (default: the --out folder's name)")
    cv.add_argument("--group", choices=["id", "near", "far"], help="VQA formats: the set's FRAMES-VQA group")
    cv.add_argument("--strict", action="store_true", help="VQA formats: refuse the set on a missing or unreadable "
                    "image instead of skipping and counting the question")
    cv.add_argument("--out", required=True)
    cv.add_argument("--layout", default="clip_benchmark", help="a registered shard layout: clip_benchmark, timm "
                    "(grace_plugin.data.shards.list_layouts)")
    cv.add_argument("--split", help="split name (default: test for clip_benchmark, validation for timm)")
    cv.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    cv.add_argument("--workers", type=int, default=2)
    cv.add_argument("--prefix", default="imagenet1k", help="timm layout shard name prefix")

    w = sub.add_parser("wise-ft-sweep", help="WiSE-FT: evaluate (1-a) zero-shot + a fine-tuned for a list of alphas")
    w.add_argument("--zero-shot", required=True, help="the CLIP folder the run started from (its --init)")
    w.add_argument("--finetuned", required=True, help="run folder at alpha = 1 (e.g. an ft run)")
    w.add_argument("--data", required=True, metavar="[NAME=]DIR", help="ID shard set")
    w.add_argument("--ood", action="append", default=[], metavar="NAME=DIR")
    w.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated mixing coefficients in [0, 1]")
    w.add_argument("--attack", help="optional: also measure Adv (registered attack name)")
    w.add_argument("--eps", default="4/255")
    w.add_argument("--n-adv", type=int, default=500)
    w.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cpu")
    w.add_argument("--out", required=True)

    ls = sub.add_parser("list", help="list registered names")
    ls.add_argument("kind", choices=["recipes", "attacks", "models", "suites", "layouts"])
    ls.add_argument("--task", choices=["classification", "vqa"], default="classification",
                    help="suites, models: those of this task")

    r = sub.add_parser("register", help="publish a run under its timm and RobustBench names (a VQA run: under NAME, "
                       "loaded by grace eval --task vqa --model NAME)")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--name", required=True, help="RobustBench name, e.g. Grace2026Gram_ViT-B-32 (a VQA run: its name)")
    r.add_argument("--report", help="VQA run: a `grace eval --task vqa` report.json whose numbers the model card "
                   "carries")
    r.add_argument("--dataset", default="imagenet", help="RobustBench dataset whose head is built (imagenet)")
    r.add_argument("--threat-model", default="Linf", help="Linf, L2, corruptions")
    r.add_argument("--weights-dir",
                   help="registry folder (default $GRACE_WEIGHTS_DIR or ~/.cache/grace_plugin/weights)")
    r.add_argument("--templates", default="openai", help="prompt set for the head: openai (80) or simple (7)")
    r.add_argument("--hub-id", help="Hugging Face repo id recorded in the card (weights fallback when not local)")
    r.add_argument("--info", action="append", default=[], metavar="FIELD=VALUE",
                   help="RobustBench ModelInfo field for the card, e.g. --info authors='A. B' --info venue=CVPR")

    x = sub.add_parser("export", help="export a run as an open_clip model or a timm hub folder")
    x.add_argument("run_dir", metavar="RUN_DIR")
    x.add_argument("--format", required=True, choices=["open_clip", "timm-hub"])
    x.add_argument("--out", required=True)
    x.add_argument("--name", help="open_clip: the model config name; timm-hub: the RobustBench name (required)")
    x.add_argument("--dataset", default="imagenet")
    x.add_argument("--threat-model", default="Linf")
    x.add_argument("--templates", default="openai")

    rs = sub.add_parser("results", help="regenerate docs/results/ from study and bench outputs (docs/results/data/)")
    rs.add_argument("--add", action="append", default=[], metavar="PATH",
                    help="first copy this output into --data: a quickstart or study folder, or a bench JSON")
    rs.add_argument("--data", default="docs/results/data", help="the sources (default docs/results/data)")
    rs.add_argument("--out", default="docs/results", help="where the pages go (default docs/results)")
    rs.add_argument("--mkdocs", default="mkdocs.yml", help="its Results nav block is rewritten ('' to leave it)")
    return p
