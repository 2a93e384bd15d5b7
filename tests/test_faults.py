"""Fault injection: a table of bad inputs, each with the exit code and the counts or message it must give.

Every row builds its fault in tmp_path (tiny hand-made shards, the session's tiny CLIP), runs the ``grace`` CLI
in-process (``grace_app.cli.main``) and checks the exit code plus either the report's counts (computed here
from how the shards were built) or a fragment of the one-line error. Decoder rows run in a subprocess, so a
native crash fails the row instead of killing pytest; lock rows hold the lock from a separate process; the disk
full / read-only rows run a real ``grace train`` in a private mount namespace on a tiny tmpfs (skipped where
``unshare -rm`` is not allowed).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from grace_app.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog"]


# ---------------------------------------------------------------------------------------------------- builders
def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(b, format="PNG")
    return b.getvalue()


def bomb_png(w: int = 30000, h: int = 30000, raw: bytes = b"\0" * 1000) -> bytes:
    """A PNG with valid chunks and CRCs declaring w x h RGB pixels (2.7 GB by default) whose IDAT inflates to
    ``raw`` (far fewer bytes than the header promises)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def sample(key: str, label: int, img: bytes | None = None) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png(hash(key) % 1000) if img is None else img), (f"{key}.cls", str(label).encode())]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def good_shard(prefix: str, n: int) -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in sample(f"{prefix}{i:03d}", i % 2)]


def shard_set(root: Path, shards: list, split: str = "test", nshards: int | None = None) -> Path:
    """A CLIP_benchmark set: ``root/<split>/{i}.tar`` (+ nshards.txt when given) and ``classnames.txt``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    for i, members in enumerate(shards):
        p = root / split / f"{i}.tar"
        if isinstance(members, bytes):  # raw file content (0-byte tar, truncated tar)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(members)
        else:
            write_tar(p, members)
    if nshards is not None:
        (root / split / "nshards.txt").write_text(f"{nshards}\n")
    return root


def truncated_inside_last_member(members) -> bytes:
    """A tar of ``members`` cut in the middle of the last member's data (no end-of-archive marker)."""
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = b.getvalue()
    last = len(members[-1][1])
    end = len(raw) - 1024  # end-of-archive blocks
    end -= (512 - last % 512) % 512  # padding of the last member
    return raw[:end - last // 2]


# ---------------------------------------------------------------------------------------------------- shared state
@pytest.fixture(scope="module")
def env(tiny_clip_dir, tmp_path_factory):
    """One tiny CLIP and one good run folder, built once for the module."""
    root = tmp_path_factory.mktemp("faults")
    train_set = shard_set(root / "trainset", [good_shard("a", 8), good_shard("b", 8)], split="train")
    shard_set(train_set, [good_shard("t", 6)], split="test")
    run = root / "run"
    rc = main(["train", "--recipe", "ft", "--init", str(tiny_clip_dir), "--data", str(train_set), "--out", str(run),
               "--steps", "2", "--no-progress", "--set", "train.batch_size=4", "--set", "train.shuffle_buffer=4"])
    assert rc == 0
    return {"clip": str(tiny_clip_dir), "train_set": train_set, "run": run, "root": root}


def cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def eval_argv(env, data: Path, out: Path, *extra) -> list:
    return ["eval", "--model", env["clip"], "--data", data, "--out", out, "--no-progress", "--batch-size", 4, *extra]


def train_argv(env, out: Path, *extra, data=None) -> list:
    return ["train", "--recipe", "ft", "--init", env["clip"], "--data", data or env["train_set"], "--out", out,
            "--no-progress", "--set", "train.batch_size=4", "--set", "train.shuffle_buffer=4", *extra]


# ---------------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    name: str
    build: Callable  # (env, tmp) -> argv
    rc: int
    counts: dict | None = None  # expected report.json counts of set "id": n and skipped_by_reason
    msg: str | None = None  # fragment of the one-line error
    not_in_msg: list = field(default_factory=lambda: ["Traceback", "weights_only"])


def _eval_set(shards, nshards=None, *extra):
    def build(env, tmp):
        return eval_argv(env, shard_set(tmp / "set", shards, nshards=nshards), tmp / "out", *extra)
    return build


BAD = b"not an image at all"
TRUNC_PNG = png(7, 64)[:300]
INTERLEAVED_BAD = [("x.png", BAD), ("y.png", BAD), ("x.cls", b"0"), ("y.cls", b"1")]
INTERLEAVED_GOOD = [("x.png", png(1)), ("y.png", png(2)), ("x.cls", b"0"), ("y.cls", b"1")]
DUPLICATE = good_shard("d", 2) + [("d002.png", png(5)), ("d002.png", png(6)), ("d002.cls", b"0")] + good_shard("e", 3)
# the set: 34 good samples, 6 bad ones, one shard truncated inside a member
MIXED = [good_shard("m", 10) + [m for i in range(3) for m in sample(f"z{i}", 0, BAD)],
         good_shard("n", 10) + [m for i in range(3) for m in sample(f"w{i}", 1, TRUNC_PNG)],
         truncated_inside_last_member(good_shard("k", 14) + [("k999.cls", b"0"), ("k999.png", png(9, 64))])]


def _cfg_row(flag_args, fragment):
    return Case(f"train {' '.join(flag_args)}", lambda env, tmp: train_argv(env, tmp / "run", *flag_args,
                data=tmp / "no_such_folder"), 2, msg=fragment)


CASES = [
    # ---- item 3: every sample scored or counted with a reason
    Case("good set (control)", _eval_set([good_shard("a", 4), good_shard("b", 4)]), 0, counts={"n": 8}),
    Case("0-byte tar only", _eval_set([b""]), 2, msg="no sample could be scored (tar_error=1)"),
    Case("empty tar only", _eval_set([[]]), 2, msg="no sample could be scored (the shards hold no samples)"),
    Case("0-byte tar among good ones", _eval_set([good_shard("a", 4), b"", good_shard("b", 4)]), 0,
         counts={"n": 8, "tar_error": 1}),
    Case("duplicate member keeps the rest of its shard", _eval_set([DUPLICATE]), 0,
         counts={"n": 5, "duplicate_member": 1}),
    Case("nshards.txt smaller than the tars", _eval_set([good_shard("a", 4), good_shard("b", 3)], 1), 0,
         counts={"n": 4, "unaccounted": 3}),
    Case("nshards.txt smaller, --strict", _eval_set([good_shard("a", 4), good_shard("b", 3)], 1, "--strict"), 2,
         msg="unaccounted=3"),
    Case("34 good + 6 bad + truncated inside a member", _eval_set(MIXED), 0,
         counts={"n": 34, "decode_error": 6, "tar_error": 1}),
    Case("interleaved members, both images bad", _eval_set([INTERLEAVED_BAD]), 2, msg="decode_error=2)"),
    Case("interleaved members, good", _eval_set([INTERLEAVED_GOOD]), 0, counts={"n": 2}),
    Case("bomb, truncated and short-IDAT PNGs in a set", _eval_set(
        [good_shard("a", 2) + sample("b", 0, bomb_png()) + sample("c", 1, TRUNC_PNG)
         + sample("d", 0, bomb_png(48, 48, b"\0" * 7))], None, "--decode", "tensor"), 0,
         counts={"n": 2, "decode_error": 3}),
    # ---- items 6, 7 and issue 13: bad config fields and flags, one line, before any data is read
    _cfg_row(["--steps", "0"], "--steps 0: must be > 0"),
    _cfg_row(["--steps", "-5"], "--steps -5: must be > 0"),
    _cfg_row(["--epochs", "0"], "--epochs 0.0: must be > 0"),
    _cfg_row(["--epochs", "-1"], "--epochs -1.0: must be > 0"),
    _cfg_row(["--set", "train.grad_accum=0"], "train.grad_accum=0: must be >= 1"),
    _cfg_row(["--set", "train.batch_size=0"], "train.batch_size=0: must be > 0"),
    _cfg_row(["--set", "train.lr=-1e-4"], "train.lr=-0.0001: must be >= 0"),
    _cfg_row(["--set", "train.opt=nope"], "train.opt='nope': not an optimizer timm"),
    _cfg_row(["--set", "train.sched=nope"], "train.sched='nope': valid: cosine"),
    _cfg_row(["--set", "train.precision=fp8"], "train.precision='fp8': valid: auto, bf16, fp32"),
    Case("eval --eps 300", lambda env, tmp: eval_argv(env, tmp / "none", tmp / "o", "--eps", "300",
                                                      "--attack", "apgd-ce"), 2, msg="--eps 300: an Linf radius"),
    Case("eval --n-adv -5", lambda env, tmp: eval_argv(env, tmp / "none", tmp / "o", "--n-adv", "-5",
                                                       "--attack", "apgd-ce"), 2, msg="--n-adv -5: must be >= 0"),
    Case("training stream where nothing decodes",
         lambda env, tmp: train_argv(env, tmp / "run", "--steps", "2", data=shard_set(
             tmp / "bad", [[m for i in range(4) for m in sample(f"q{i}", 0, BAD)]] * 2, split="train")),
         2, msg="no usable training sample in a full pass over its 2 shard(s) (decode_error="),
    # ---- item 12: one-line errors
    Case("--out is an existing file (train)", lambda env, tmp: train_argv(env, _file(tmp / "f"), "--steps", "1"), 2,
         msg="exists and is not a folder"),
    Case("--out is an existing file (eval)", lambda env, tmp: eval_argv(env, env["train_set"], _file(tmp / "f")), 2,
         msg="exists and is not a folder"),
    Case("--init NAME:pickle-with-code", lambda env, tmp: train_argv(env, tmp / "run", "--steps", "1")[:4]
         + [f"ViT-B-32:{_evil_pickle(tmp / 'evil.pt')}"] + train_argv(env, tmp / "run", "--steps", "1")[5:], 2,
         msg="refused: this CLIP weights file is a pickle that would import or call code"),
    Case("train_state.pt is a pickle with code", lambda env, tmp: _evil_state(env, tmp), 2,
         msg="refused: this resumable state is a pickle that would import or call code"),
]


def _file(p: Path) -> Path:
    p.write_text("x")
    return p


class _Evil:  # any class outside torch's weights_only allow-list stands for "code in a pickle"
    pass


def _evil_pickle(p: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "payload": _Evil()}, p)
    return p


def _evil_state(env, tmp):
    from grace_plugin.runfolder import partial_dir

    out = tmp / "run"
    partial_dir(out).mkdir(parents=True)
    _evil_pickle(partial_dir(out) / "train_state.pt")
    return train_argv(env, out, "--steps", "2", "--resume")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case, env, tmp_path, capsys):
    rc, err = cli(capsys, case.build(env, tmp_path))
    assert rc == case.rc, err
    if case.msg is not None:
        assert case.msg in err, err
    if rc == 2:
        assert len(err.strip().splitlines()) == 1, err  # one line
        for bad in case.not_in_msg:
            assert bad not in err
    if case.counts is not None:
        res = json.loads((tmp_path / "out" / "report.json").read_text())["datasets"]["id"]
        want = dict(case.counts)
        assert res["n"] == want.pop("n")
        assert res["skipped_by_reason"] == want
        assert res["top1"] is not None


# ---------------------------------------------------------------------------------------------------- item 2: NaN
def _tamper(run: Path, dest: Path, edit: Callable[[dict], None], meta_edit=None) -> Path:
    """A copy of ``run`` whose weights went through ``edit`` (sha256 in checkpoint.json updated to match)."""
    from safetensors.torch import load_file, save_file

    from grace_plugin.tensor_io import sha256_file

    shutil.copytree(run, dest)
    sd = load_file(str(dest / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dest / "model.safetensors"))
    meta = json.loads((dest / "checkpoint.json").read_text())
    meta["weights_sha256"] = sha256_file(dest / "model.safetensors")
    if meta_edit:
        meta_edit(meta)
    (dest / "checkpoint.json").write_text(json.dumps(meta))
    return dest


def _nan(sd):
    sd["visual.blocks.0.attn.qkv.weight"][0, 0] = float("nan")


def _wrong_shape(sd):
    sd["visual.pos_embed"] = torch.zeros(1, 3, 7)


def _no_tower(meta):
    del meta["architecture"]["tower"]


def _no_input_size(meta):
    del meta["pretrained_cfg"]["input_size"]


NAN_ROWS = [
    ("eval", _nan, None, "tensor 'visual.blocks.0.attn.qkv.weight' holds non-finite values (1 NaN, 0 Inf"),
    ("register", _nan, None, "holds non-finite values"),
    ("export", _nan, None, "holds non-finite values"),
    ("eval", _wrong_shape, None, "tensor 'visual.pos_embed' has shape (1, 3, 7) but the architecture expects"),
    ("eval", None, _no_tower, "field 'architecture.tower' is missing"),
    ("eval", None, _no_input_size, "field 'pretrained_cfg.input_size' is missing"),
]


@pytest.mark.parametrize("cmd,edit,meta_edit,fragment", NAN_ROWS,
                         ids=[f"{r[0]}-{(r[1] or r[2]).__name__}" for r in NAN_ROWS])
def test_bad_weights_are_refused(cmd, edit, meta_edit, fragment, env, tmp_path, capsys):
    run = _tamper(env["run"], tmp_path / "bad", edit or (lambda sd: None), meta_edit)
    argv = {"eval": ["eval", "--model", run, "--data", env["train_set"], "--out", tmp_path / "o", "--no-progress"],
            "register": ["register", run, "--name", "Bad2026Nan", "--weights-dir", tmp_path / "w"],
            "export": ["export", run, "--format", "open_clip", "--out", tmp_path / "x"]}[cmd]
    rc, err = cli(capsys, argv)
    assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.safetensors"))


def test_card_missing_fields_is_one_line():
    from registry.grace_models import BUILTIN_CARDS, RegistryError, register_card

    for section, key in (("pretrained_cfg", "input_size"), ("architecture", "tower")):
        card = json.loads(json.dumps(BUILTIN_CARDS[0]))
        del card[section][key]
        with pytest.raises(RegistryError, match=f"field '{section}.{key}' is missing"):
            register_card(card)


def test_eval_refuses_nan_logits():
    """Finite weights, NaN logits (a model that returns NaN): refused, naming the model."""
    from eval_suites.evaluate import evaluate_clean
    from grace_plugin.tensor_io import NonFiniteError

    class NanModel(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    batches = [{"image": torch.rand(2, 3, 8, 8), "label": torch.tensor([0, 1]), "skipped": {}}]
    with pytest.raises(NonFiniteError, match="my-model: non-finite logits for 2 of 2 images"):
        evaluate_clean(NanModel(), batches, model_name="my-model")


def test_training_refuses_to_save_a_model_with_nan_logits(env, tmp_path, capsys, monkeypatch):
    """Finite weights whose logits are NaN on a batch: the run is not saved; the previous run stays."""
    from grace_plugin.models import classifier

    out = tmp_path / "run"
    shutil.copytree(env["run"], out)
    before = (out / "checkpoint.json").read_bytes()
    orig = classifier.ClipClassifier.forward
    monkeypatch.setattr(classifier.ClipClassifier, "forward",
                        lambda self, x: orig(self, x) * (float("nan") if not self.training else 1.0))
    rc, err = cli(capsys, train_argv(env, out, "--steps", "1"))
    assert rc == 2 and "gives non-finite logits on" in err and "not saved" in err, err
    assert (out / "checkpoint.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------------- items 9, 10
HOLD = textwrap.dedent("""
    import sys, time
    from grace_plugin.runfolder import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("cmd", ["train", "eval"])
def test_second_writer_fails_at_once(cmd, env, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = train_argv(env, out, "--steps", "1") if cmd == "train" else eval_argv(env, env["train_set"], out)
        rc, err = cli(capsys, argv)
        assert rc == 2 and f"pid {holder.pid}" in err and "another grace process" in err, err
    finally:
        holder.kill()
        holder.wait()
    rc, err = cli(capsys, argv)  # the kernel dropped the killed holder's lock
    assert rc == 0, err


def test_a_waiting_writer_waits_for_the_holder_then_enters(tmp_path):
    """folder_lock(wait=echo): held by another process, it says once who holds it and blocks (no error) until the
    holder exits, however it exits; then it holds the lock itself."""
    import threading

    from grace_plugin.runfolder import RunLockedError, folder_lock

    out = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    said, entered = [], threading.Event()

    def waiter():
        with folder_lock(out, what="testbed", wait=said.append):
            entered.set()

    try:
        assert holder.stdout.readline().strip() == "locked"
        t = threading.Thread(target=waiter, daemon=True)
        t.start()
        for _ in range(200):  # until the waiter has said it waits (it blocks right after)
            if said:
                break
            threading.Event().wait(0.05)
        assert len(said) == 1 and f"waiting for pid {holder.pid}" in said[0] and not entered.is_set()
    finally:
        holder.kill()
        holder.wait()
    assert entered.wait(30) and len(said) == 1
    t.join(30)
    with folder_lock(out):  # released again when the waiter's block ended
        pass
    with folder_lock(out), pytest.raises(RunLockedError):  # without wait, a second holder is still refused
        with folder_lock(out):
            pass


def test_testbed_preparation_holds_the_lock_while_writing_the_world(tmp_path, monkeypatch):
    """prepare_testbed writes the world and the tiny CLIP under the testbed lock (a second study lane on the same
    --out waits there, then reuses the world), and a second call reuses the world it finds."""
    import grace_app.testbed.world as synthetic
    import grace_app.testbed.tiny_clip as testbed
    from dataclasses import asdict

    from grace_app.studies.quickstart import prepare_testbed
    from grace_plugin.runfolder import RunLockedError, folder_lock

    out, calls = tmp_path / "study", []

    def fake_world(data, seed, spec, progress, world):
        with pytest.raises(RunLockedError):  # held by prepare_testbed itself (another descriptor: refused)
            with folder_lock(data):
                pass
        calls.append("world")
        Path(data).mkdir(parents=True, exist_ok=True)
        (Path(data) / "world.json").write_text(json.dumps({"spec": asdict(spec), "seed": seed, "world": world}))

    def fake_clip(data, pretrained, cfg, progress):
        with pytest.raises(RunLockedError):
            with folder_lock(data):
                pass
        calls.append("clip")

    monkeypatch.setattr(synthetic, "write_synthetic_world", fake_world)
    monkeypatch.setattr(testbed, "tiny_clip", fake_clip)
    said = []
    prepare_testbed(out, size="small", echo=said.append)
    prepare_testbed(out, size="small", echo=said.append)
    assert calls == ["world", "clip", "clip"] and any("synthetic world: reusing" in m for m in said)
    with folder_lock(out / "data"):  # released after each call
        pass


def _run_files(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def test_run_folder_is_replaced_as_one_unit(env, tmp_path, capsys, monkeypatch):
    """A retrain that dies (here: disk full while writing the weights) leaves the old complete run; a retrain that
    finishes replaces every file at once. Files respect the umask."""
    import safetensors.torch

    from grace_plugin.checkpoint import load_run
    from grace_plugin.tensor_io import sha256_file
    from grace_plugin.runfolder import partial_dir

    out = tmp_path / "run"
    shutil.copytree(env["run"], out)
    old = _run_files(out)
    real_save = safetensors.torch.save_file

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    rc, err = cli(capsys, train_argv(env, out, "--steps", "2", "--set", "train.seed=1"))
    assert rc == 2 and "no space left on the device" in err and len(err.strip().splitlines()) == 1, err
    assert _run_files(out) == old  # untouched: the new run was staged beside it
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    rc, err = cli(capsys, train_argv(env, out, "--steps", "2", "--set", "train.seed=1"))
    assert rc == 0, err
    new = _run_files(out)
    assert new["model.safetensors"] != old["model.safetensors"] and "train_state.pt" in new  # train.keep_state
    meta = json.loads(new["checkpoint.json"])
    assert meta["weights_sha256"] == sha256_file(out / "model.safetensors") and meta["config"]["train"]["seed"] == 1
    load_run(out)
    assert not partial_dir(out).exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert {oct((out / n).stat().st_mode & 0o777) for n in new} == {oct(0o666 & ~umask)}


def test_killed_run_resumes_from_its_staging_folder(env, tmp_path, capsys, killed_trainer):
    """Killed mid-run: --out keeps nothing half-written, the state waits in the staging folder, --resume ends it."""
    from grace_plugin.runfolder import partial_dir

    out = tmp_path / "run"
    with killed_trainer(2), pytest.raises(KeyboardInterrupt):
        main([str(a) for a in train_argv(env, out, "--steps", "3", "--set", "train.ckpt_every=1")])
    assert not out.exists() and (partial_dir(out) / "train_state.pt").is_file()
    rc, err = cli(capsys, train_argv(env, out, "--steps", "3", "--set", "train.ckpt_every=1", "--resume"))
    assert rc == 0, err
    assert (out / "checkpoint.json").is_file() and not partial_dir(out).exists()


def _unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=1m tmpfs /tmp"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, check=False)
    return r.returncode == 0


@pytest.mark.slow  # a real `grace train` process per row (about 40 s each on 2 cores)
@pytest.mark.skipif(not _unshare_ok(), reason="needs unshare -rm (user + mount namespaces) to mount a tiny tmpfs")
@pytest.mark.parametrize("mount_opts,fragment", [("size=600k", "no space left on the device"),
                                                 ("size=4m,ro", "is not writable")],
                         ids=["disk-full", "read-only"])
def test_real_disk_full_and_read_only(mount_opts, fragment, env, tmp_path):
    """A real ``grace train`` process writing onto a tmpfs that fills up (or is read-only): one line, exit 2."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = " ".join(f"'{a}'" for a in train_argv(env, mnt / "run", "--steps", "1"))
    script = (f"mount -t tmpfs -o {mount_opts} tmpfs '{mnt}' && exec '{sys.executable}' -m grace_app {argv}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("grace ")]
    assert r.returncode == 2 and len(err) == 1 and fragment in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------- item 5
DECODER_CHILD = textwrap.dedent("""
    import json, resource, sys
    from grace_plugin.data.decode import decode_sample
    from grace_plugin.data.transforms import as_tensor_transform, eval_transform
    cases = json.loads(sys.stdin.read())
    t = eval_transform({"input_size": (3, 16, 16), "interpolation": "bicubic", "crop_pct": 1.0,
                        "mean": (0.5,) * 3, "std": (0.5,) * 3})
    out = {}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # peak after the imports
    for decode in ("pil", "tensor"):
        tt = as_tensor_transform(t) if decode == "tensor" else None
        for name, hexdata in cases.items():
            s = decode_sample({"png": bytes.fromhex(hexdata), "cls": b"0", "__key__": name}, t, 2, None, tt)
            out[f"{decode}/{name}"] = s.get("__skip__", "ok")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 - base  # growth while decoding
    print(json.dumps(out))
""")


def _png_cuts() -> dict:
    data = png(3, 64)
    # (a cut inside the final IEND chunk's CRC leaves every pixel intact: PIL and libpng decode it, so not listed)
    return {f"png cut at {c}": data[:c] for c in (0, 8, 16, 33, 40, 60, len(data) // 2, len(data) - 12)}


def test_decoder_survives_hostile_images():
    """Truncated PNGs at every structural point, PNGs whose image data is shorter than their header promises
    (valid chunks and CRCs: torchvision 0.29's decoder dies with SIGSEGV on them), a 30000x30000 bomb header,
    garbage, a PDF, an ICO: each is a decode_error on both decode paths; the subprocess must exit 0 (no native
    crash) and stay far below the 2.7 GB a decoded bomb would take."""
    ico = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(ico, format="ICO")
    cases = {**_png_cuts(), "bomb 30000x30000": bomb_png(), "garbage": BAD, "pdf": b"%PDF-1.4\n%%EOF\n",
             "ico": ico.getvalue(), "bomb 9000x9000 (1-2x PIL limit)": bomb_png(9000, 11000),
             "short IDAT 48x48 (7 of 6960 bytes)": bomb_png(48, 48, b"\0" * 7),
             "short IDAT 48x48 (6959 of 6960 bytes)": bomb_png(48, 48, b"\0" * 6959)}
    payload = json.dumps({k: v.hex() for k, v in cases.items()})
    r = subprocess.run([sys.executable, "-c", DECODER_CHILD], input=payload, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert r.returncode == 0, f"decoder process died with {r.returncode}: {r.stderr[-2000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res.pop("peak_rss_mb") < 1000  # the peak grew by less than a decoded bomb's 2.7 GB
    assert res == {f"{d}/{k}": "decode_error" for d in ("pil", "tensor") for k in cases}


def test_training_set_with_hostile_pngs_counts_them(env, tmp_path, capsys):
    """A tensor-decoded training stream (the training default) holding a short-IDAT, a bomb and a truncated PNG:
    the run finishes and its checkpoint.json counts them as decode errors."""
    bad = sample("s", 0, bomb_png(48, 48, b"\0" * 7)) + sample("t", 1, bomb_png()) + sample("u", 0, TRUNC_PNG)
    data = shard_set(tmp_path / "set", [good_shard("g", 6) + bad, good_shard("h", 6)], split="train")
    rc, err = cli(capsys, train_argv(env, tmp_path / "run", "--steps", "8", "--set", "data.decode=tensor",
                                     data=data))
    assert rc == 0, err
    skipped = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["metrics"]["train"]["data_skipped"]
    assert set(skipped) == {"decode_error"} and skipped["decode_error"] >= 3, skipped
