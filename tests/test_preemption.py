"""Preemption and resume: a SIGTERM (or SIGUSR1) stops `grace train` after the current step with its state saved
and exit status 75, on 1 and 2 processes (the ranks agree on the step); `--resume auto` then finishes with the weights
of an uninterrupted run; a second signal during the save changes nothing; a finished run is extended from its kept
state, and asking it for no more steps is refused in one line."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grace_plugin.config import TrainConfig
from grace_plugin.preemption import PREEMPTED_EXIT, Preempted, PreemptionGuard
from grace_plugin.recipes import create_recipe
from grace_plugin.runfolder import partial_dir
from grace_plugin.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(lr=1e-3, warmup_steps=2, log_every=1, seed=0, device="cpu")


def _batches(tiny_batch, n):
    """n batches of 4 images: the two halves of the 8-image tiny batch in turn."""
    return [{k: tiny_batch[k][i % 2 * 4:(i % 2 + 1) * 4] for k in ("image", "label")} for i in range(n)]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_signal_saves_after_the_step_and_a_second_one_during_the_save_changes_nothing(
        tiny_classifier, tiny_batch, tmp_path, monkeypatch):
    import copy

    data = _batches(tiny_batch, 8)
    ref = create_recipe("ft", copy.deepcopy(tiny_classifier))
    train(ref, data, TrainConfig(**CFG), 8, tmp_path / "ref", progress=False)

    rec = create_recipe("ft", copy.deepcopy(tiny_classifier))
    step_fn = rec.training_step

    def signalled(batch, ctx):
        if ctx.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 3: the loop finishes it, then stops
        return step_fn(batch, ctx)

    rec.training_step = signalled
    real_save = torch.save

    def save_with_a_second_signal(obj, f, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal, in the middle of writing the state
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_with_a_second_signal)
    with PreemptionGuard("SIGTERM") as guard, pytest.raises(Preempted) as info:
        train(rec, data, TrainConfig(**CFG), 8, tmp_path / "run", progress=False, preempt=guard)
    monkeypatch.setattr(torch, "save", real_save)
    assert info.value.step == 4 and info.value.signal_name == "SIGTERM"
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    assert state["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard put the default handler back

    resumed = create_recipe("ft", copy.deepcopy(tiny_classifier))
    train(resumed, data, TrainConfig(**CFG), 8, tmp_path / "run", progress=False, resume=True)
    a, b = _weights(ref.model), _weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _argv(clip, data, out, steps, *extra):
    return [sys.executable, "-m", "grace_app", "train", "--recipe", "grace", "--init", str(clip), "--data",
            str(data), "--out", str(out), "--steps", str(steps), "--no-progress", "--set", "train.batch_size=8",
            "--set", "train.log_every=1", "--set", "recipe.pgd_steps=2", "--set", "recipe.lora_rank=4",
            "--set", "recipe.curvature_interval=2", "--set", "train.device=cpu", *extra]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GRACE_PROGRESS="off", **extra)
    return env


def _logged_steps(out: Path) -> int:
    log = partial_dir(out) / "log.jsonl"
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.strip().startswith('{"step"'))


def _wait_for_steps(procs, out: Path, k: int, timeout: float = 240) -> int:
    t0 = time.time()
    while _logged_steps(out) < k:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.time() - t0 < timeout
        time.sleep(0.05)
    return _logged_steps(out)


def _run_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _in_process(capsys, argv) -> tuple[int, str]:
    """The same command in this process (no interpreter start-up); one torch thread, as in the subprocesses."""
    from grace_app.cli import main

    capsys.readouterr()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(argv[3:])
    finally:
        torch.set_num_threads(n)
    return rc, capsys.readouterr().err


def test_sigterm_exits_75_within_a_step_and_resume_auto_is_bit_identical(tiny_clip_dir, tiny_world, tmp_path,
                                                                          capsys, monkeypatch):
    monkeypatch.setenv("GRACE_PROGRESS", "off")
    data, steps = tiny_world / "id", 8
    k = random.Random().randint(2, 4)  # a random step, 3 or more before the last: a signal during the last step
    # lets the run finish with exit 0, and on an unloaded machine the 50 ms poll can return with more than k logged
    p = subprocess.Popen(_argv(tiny_clip_dir, data, tmp_path / "run", steps), env=_env(), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = _wait_for_steps([p], tmp_path / "run", k)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == PREEMPTED_EXIT, err
    state = torch.load(partial_dir(tmp_path / "run") / "train_state.pt", weights_only=False)
    assert seen <= state["step"] <= seen + 1, (seen, state["step"])  # the step under way when the signal came
    assert "continue with --resume" in err and not (tmp_path / "run").exists()

    # a resume with a changed lr: one line naming the field, exit 2, and the state left as it was
    rc, err = _in_process(capsys, _argv(tiny_clip_dir, data, tmp_path / "run", steps, "--resume", "--set",
                                        "train.lr=0.5"))
    assert rc == 2 and "train.lr (" in err and len(err.strip().splitlines()) == 1, err
    rc, err = _in_process(capsys, _argv(tiny_clip_dir, data, tmp_path / "run", steps, "--resume", "auto"))
    assert rc == 0, err
    rc, err = _in_process(capsys, _argv(tiny_clip_dir, data, tmp_path / "plain", steps))
    assert rc == 0, err
    a, b = _run_weights(tmp_path / "run"), _run_weights(tmp_path / "plain")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    # the finished run keeps its state: asking it for no more steps is refused in one line; more steps extend it
    rc, err = _in_process(capsys, _argv(tiny_clip_dir, data, tmp_path / "run", steps, "--resume"))
    assert rc == 2 and err.strip().endswith(f"(N > {steps})") and len(err.strip().splitlines()) == 1, err
    rc, err = _in_process(capsys, _argv(tiny_clip_dir, data, tmp_path / "run", steps + 1, "--resume"))
    assert rc == 0, err
    logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"val_' not in x]
    assert logged == list(range(steps + 1))  # steps 0..7 from the first run, then only step 8
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["metrics"]["train"]["steps"] == steps + 1 and meta["metrics"]["train"]["resumed_at"] == steps
    # the whole run's compute counts every invocation that kept its steps, this one's alone is less
    t = meta["metrics"]["train"]
    assert t["total_cpu_seconds"] > t["cpu_seconds"] > 0 and t["total_seconds"] > t["seconds"] > 0
    plain = json.loads((tmp_path / "plain" / "checkpoint.json").read_text())["metrics"]["train"]
    assert plain["total_cpu_seconds"] >= plain["cpu_seconds"] and plain["total_cpu_seconds"] < 2 * plain[
        "cpu_seconds"] + 1
    assert json.loads((tmp_path / "plain" / "checkpoint.json").read_text())["metrics"]["train"]["resumed_at"] is None


def test_two_ranks_agree_on_the_step_when_one_is_signalled(tiny_clip_dir, tiny_world, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs = [subprocess.Popen(_argv(tiny_clip_dir, tiny_world / "id", out, 12, "--set", "train.batch_size=4"),
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(r),
                                       LOCAL_RANK=str(r)), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    seen = _wait_for_steps(procs, out, 3)
    procs[1].send_signal(signal.SIGUSR1)  # only rank 1 is told (sbatch --signal=USR1@120 reaches every task)
    logged = _logged_steps(out)  # rank 0 logged at most this many steps when the signal was sent
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT] * 2, errs
    state = torch.load(partial_dir(out) / "train_state.pt", weights_only=False)
    # rank 1 may already have sent its flag for the step rank 0 is computing (one step ahead of rank 0's log), so
    # the agreed stop comes after that step or the next one
    assert seen <= state["step"] <= logged + 2 and set(state["cursors"]) == {0, 1}, (seen, logged, state["step"])


def test_a_preempted_study_exits_75_in_one_line(monkeypatch, capsys, tmp_path):
    """A preemption inside a study's (or the quickstart's) training run is a saved state, not a crash: one line,
    exit 75; the same command then resumes it (tests/test_study.py)."""
    import grace_app.studies.runner as runner
    from grace_app.cli import main

    def preempted(*a, **k):
        raise Preempted(7, tmp_path / "train_state.pt", "SIGTERM")

    monkeypatch.setattr(runner, "run_study", preempted)
    assert main(["study", "table6", "--out", str(tmp_path / "s")]) == PREEMPTED_EXIT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "preempted by SIGTERM" in err and "run the same command again" in err
