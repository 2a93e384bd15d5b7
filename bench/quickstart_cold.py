"""The cold quick start, phase by phase: ``grace quickstart`` from an empty cache, as a newcomer's first run.

For each world seed, ``python -m grace_app quickstart --seed S`` runs in a fresh folder with ``GRACE_CACHE_DIR``
pointing at an empty one, so nothing is reused: the synthetic world is written, the tiny CLIP copied (the default
world's ships with the package) or pretrained (any other world), ft/tecoa/grace fine-tuned and every model
evaluated. Prints the seconds of each phase (the quick start's ``summary.json`` ``phases``), the process's wall time
and its ratio to the 600 s budget; tox's own set-up (creating its environment) is not included. ``--json`` writes
the table for ``grace results --add``.

    PYTHONPATH=. python bench/quickstart_cold.py --seeds 0,7 --json docs/results/data/bench-quickstart_cold.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 600.0


def cold_run(seed: int, root: Path, extra: list[str]) -> dict:
    env = dict(os.environ, GRACE_CACHE_DIR=str(root / "cache"))
    out = root / "quickstart"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "grace_app", "quickstart", "--seed", str(seed), "--out", str(out),
                    "--no-progress", *extra], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    tiny = summary.get("tiny_clip", {})
    return {"world_seed": seed, "phases": summary.get("phases", {}), "wall_s": round(wall, 1),
            "tiny_clip": tiny.get("sha256", "")[:12]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,7", help="world seeds, each run cold (0: the shipped tiny CLIP)")
    ap.add_argument("--json", help="write the table as a results document (grace results --add)")
    ap.add_argument("extra", nargs="*", help="more grace quickstart flags (after --)")
    a = ap.parse_args()
    results = []
    for seed in (int(s) for s in a.seeds.split(",") if s.strip()):
        with tempfile.TemporaryDirectory() as tmp:
            r = cold_run(seed, Path(tmp), a.extra)
        results.append(r)
        phases = "  ".join(f"{k} {v:.0f} s" for k, v in r["phases"].items())
        print(f"world seed {seed}: {phases}  | wall {r['wall_s']:.0f} s = {r['wall_s'] / BUDGET_S:.2f}x the "
              f"{BUDGET_S:.0f} s budget (tiny CLIP {r['tiny_clip']})")
    if a.json:
        names = list(dict.fromkeys(k for r in results for k in r["phases"]))
        cols = ["world_seed", *[f"{n} (s)" for n in names], "wall (s)", "x budget", "tiny CLIP"]
        rows = [dict(zip(cols, [r["world_seed"], *[r["phases"].get(n) for n in names], r["wall_s"],
                                round(r["wall_s"] / BUDGET_S, 2), r["tiny_clip"]])) for r in results]
        doc = {"bench": "table", "name": "quickstart_cold", "title": "Cold quick start, phase by phase",
               "command": "PYTHONPATH=. python bench/quickstart_cold.py --seeds " + a.seeds,
               "notes": [f"{os.cpu_count()} CPU cores; an empty GRACE_CACHE_DIR per run; tox's environment set-up "
                         "not included; world seed 0 copies the shipped tiny CLIP, other seeds pretrain it "
                         f"(1 pinned thread); budget {BUDGET_S:.0f} s"],
               "columns": cols, "rows": rows, "date": time.strftime("%Y-%m-%d")}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
