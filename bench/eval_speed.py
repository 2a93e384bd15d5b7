"""Throughput: our `adv:autoattack` suite vs robustbench.eval.benchmark on the same model and images.

Prints the wall-time ratio ours / RobustBench (goal <= 1.0) with both robust accuracies (they must be identical),
and clean-eval images/s of the `id` suite. The model is the 16-px linear template model of the equality tests
(tests/test_suites_robustbench.py) over an ImageNet-layout folder built in a temp dir: half the images are
provably robust, so every AutoAttack component runs to completion on them.

    PYTHONPATH=. python bench/eval_speed.py [--n 8] [--threads 1] [--device cuda]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8, help="images (half robust)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clean-n", type=int, default=5000, help="images for the clean-eval throughput")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (both evaluators run there)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import grace_plugin  # noqa: F401  (autoattack shim)
    from robustbench.eval import benchmark
    from test_suites_robustbench import TemplateModel, _loaded, make_imagenet

    from eval_suites.suites import SuiteContext, run_suites
    from grace_plugin.data.transforms import eval_transform

    eps = 4 / 255
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        templates, _ = make_imagenet(root, [0.1, 0.02] * (a.n // 2))
        model = TemplateModel(templates).eval()
        ctx = SuiteContext(id_set=("imagenet", root), eps=eps, n_adv=a.n, n_imagenet=a.n, batch_size=a.n,
                           device=a.device)
        t0 = time.perf_counter()
        ours = run_suites(_loaded(model), ["adv:autoattack"], ctx)["suites"]["adv:autoattack"]
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        clean, robust = benchmark(model, n_examples=a.n, dataset="imagenet", threat_model="Linf", data_dir=str(root),
                                  eps=eps, batch_size=a.n, preprocessing=eval_transform(model.pretrained_cfg),
                                  device=torch.device(a.device))
        t_rb = time.perf_counter() - t0
        print(f"autoattack Linf 4/255 on {a.n} images ({a.device}, {a.threads} thread(s)): "
              f"ours {t_ours:.1f} s "
              f"(clean {ours['clean_acc']:.2f}, robust {ours['robust_acc']:.2f}) | robustbench.benchmark "
              f"{t_rb:.1f} s (clean {100 * clean:.2f}, robust {100 * robust:.2f}) | ratio ours/robustbench "
              f"{t_ours / t_rb:.2f} | identical: {ours['robust_acc'] == 100 * robust and ours['clean_acc'] == 100 * clean}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = min(a.clean_n, 5000)
        templates, _ = make_imagenet(root, [0.1] * n)
        model = TemplateModel(templates).eval()
        ctx = SuiteContext(id_set=("imagenet", root), n_imagenet=n, batch_size=256, device=a.device)
        t0 = time.perf_counter()
        rep = run_suites(_loaded(model), ["id"], ctx)
        dt = time.perf_counter() - t0
        print(f"clean eval (id suite, {a.device}, RobustBench ImageNet subset, 16 px PNG, linear model): "
              f"{n} images in {dt:.1f} s "
              f"= {n / dt:.0f} images/s (top-1 {rep['axes']['id']:.2f})")


if __name__ == "__main__":
    main()
