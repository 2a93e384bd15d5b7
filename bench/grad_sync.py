"""Step time at 2 CPU processes (gloo): gradients all-reduced during backward (``OverlappedGradSync``, bucketed)
vs one all-reduce after it (``grad_sync = "oneshot"``). Prints both medians and the ratio overlapped/one-shot.

    python bench/grad_sync.py [--arch tiny] [--steps 12] [--bucket-mb 0.25] [--recipe ft]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(rank, world, port, a, out):
    import torch.distributed as dist

    import grace_plugin.trainer as T
    from grace_plugin.config import TrainConfig
    from grace_plugin.recipes import create_recipe
    from step_cost import build

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    base, size = build(a.arch)
    g = torch.Generator().manual_seed(rank)
    data = [{"image": torch.rand(a.batch, 3, size, size, generator=g),
             "label": torch.randint(0, 1000, (a.batch,), generator=g)} for _ in range(4)]
    orig_init = T.OverlappedGradSync.__init__

    def init(self, params, world, bucket_bytes=0):
        orig_init(self, params, world, int(a.bucket_mb * 2**20))

    T.OverlappedGradSync.__init__ = init
    times = {}
    for mode in ("oneshot", "overlap") * 2:
        torch.manual_seed(0)
        rec = create_recipe(a.recipe, base)
        rec.grad_sync = mode
        stamps = []
        orig_after = rec.after_step

        def after(batch, ctx, stamps=stamps, orig_after=orig_after):
            stamps.append(time.perf_counter())
            return orig_after(batch, ctx)

        rec.after_step = after
        T.train(rec, data, TrainConfig(device="cpu", lr=1e-5, log_every=10**6), a.steps,
                os.path.join(out, f"{mode}{rank}"), progress=False)
        dts = [b - a_ for a_, b in zip(stamps[2:], stamps[3:])]  # steady state: skip the first steps
        times.setdefault(mode, []).extend(dts)
    if rank == 0:
        torch.save({k: statistics.median(v) for k, v in times.items()}, os.path.join(out, "times.pt"))
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny", choices=["tiny", "vit_b32"])
    ap.add_argument("--recipe", default="ft")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--bucket-mb", type=float, default=0.25, help="bucket size (DDP's default is 25 MB)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(worker, args=(2, port, a, out), nprocs=2, join=True)
        t = torch.load(os.path.join(out, "times.pt"))
    print(f"{a.recipe} on {a.arch}, batch {a.batch} per process, 2 CPU processes (gloo), buckets {a.bucket_mb} MB")
    print(f"one-shot {1e3 * t['oneshot']:.1f} ms/step, overlapped {1e3 * t['overlap']:.1f} ms/step, "
          f"ratio overlapped/one-shot {t['overlap'] / t['oneshot']:.3f}")


if __name__ == "__main__":
    main()
