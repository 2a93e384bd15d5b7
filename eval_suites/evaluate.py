"""Clean and adversarial top-1 over a batch stream, with skipped samples counted (never a shrunken denominator).

Both functions keep one record per batch (its key, per-sample correctness and skip counts), gather the records of
every ``torchrun`` rank (``eval_suites.distributed``) and sum them in batch order, so N processes give the
one-process result exactly.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from grace_plugin.tensor_io import NonFiniteError
from grace_plugin.errors import GraceError

__all__ = ["ClassificationResult", "AdversarialResult", "evaluate_clean", "evaluate_adversarial", "project_logits",
           "model_sha256", "account", "EmptySetError", "StrictSkipError"]

log = logging.getLogger(__name__)


class EmptySetError(GraceError, ValueError):
    """A set where no sample could be scored (a top-1 of nothing is not a number)."""


class StrictSkipError(GraceError, ValueError):
    """``--strict`` and some sample was skipped or unaccounted."""


def account(res: ClassificationResult, where, unlisted: list[str] | None = None, strict: bool = False
            ) -> ClassificationResult:
    """Every sample present in the set's tars is scored or counted with a reason; check it, then refuse n = 0.

    * tars the layout does not list (``nshards.txt`` smaller than the number of tars) and a sample count that
      disagrees with the layout's promise (``_info.json``, ``|N``) become ``unaccounted``, with a warning;
    * ``strict``: any skipped or unaccounted sample is an error;
    * no scored sample at all is an error naming the set and the skip reasons.
    """
    from grace_plugin.data.shards import count_samples

    unaccounted = 0
    if unlisted:
        extra = count_samples(unlisted)
        log.warning("%s: %d tar(s) beside the listed shards are not read (%d samples; first: %s); counted as "
                    "unaccounted", where, len(unlisted), extra, unlisted[0])
        unaccounted += extra
    seen = res.n + res.n_skipped
    if res.expected is not None and seen != res.expected:
        log.warning("%s: read %d samples (%d scored, %d skipped) but the layout promises %d", where, seen, res.n,
                    res.n_skipped, res.expected)
        unaccounted += res.expected - seen
    if unaccounted:
        res.skipped = dict(res.skipped, unaccounted=res.skipped.get("unaccounted", 0) + unaccounted)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(res.skipped.items()))
    if strict and res.n_skipped:
        raise StrictSkipError(f"{where}: {res.n_skipped} samples skipped or unaccounted ({reasons}) and --strict "
                              "is set")
    if res.n == 0:
        raise EmptySetError(f"{where}: no sample could be scored ({reasons or 'the shards hold no samples'})")
    return res


def _check_logits(logits: torch.Tensor, model_name: str) -> None:
    """A NaN logit argmaxes to class 0: a silent chance-level number. Refuse it, naming the model."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(-1).sum())
        raise NonFiniteError(f"{model_name}: non-finite logits for {bad} of {logits.shape[0]} images; refusing to "
                             "report accuracy (are its weights NaN?)")


@dataclass
class ClassificationResult:
    correct: int = 0
    n: int = 0
    skipped: dict = field(default_factory=dict)
    expected: int | None = None
    # mean cosine between the features of different images (grace_plugin.losses.feature_spread); None when the
    # model exposes no ``encode``
    feature_spread: float | None = None
    # one character per scored sample, "1" correct / "0" wrong, in shard order (batch key, then position): the same
    # string on any number of ranks, and what paired comparisons of two models on the same images need
    per_sample: str = ""

    @property
    def top1(self) -> float | None:
        return 100.0 * self.correct / self.n if self.n else None

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {"top1": self.top1, "correct": self.correct, "n": self.n, "skipped": self.n_skipped,
                "skipped_by_reason": dict(self.skipped), "expected": self.expected,
                "feature_spread": self.feature_spread, "per_sample": self.per_sample}


def project_logits(logits: torch.Tensor, class_subset: list[int] | None) -> torch.Tensor:
    """Restrict a head's logits to a label subset (e.g. ImageNet-R's 200 of 1000 classes)."""
    return logits if class_subset is None else logits[:, class_subset]


def _key(batch: dict, idx: int) -> list:
    return list(batch.get("key") or (0, idx))


def _bar(progress: bool, total, desc: str, unit: str):
    from grace_plugin.runtime import is_main

    if not progress or not is_main():
        return None
    from grace_plugin.progress import progress as progress_bar

    return progress_bar(total=total, desc=desc, unit=unit, leave=False)


@torch.no_grad()
def evaluate_clean(model, loader, device: str | torch.device = "cpu", class_subset: list[int] | None = None,
                   autocast=None, progress: bool = False, desc: str = "eval",
                   label_targets: dict[int, list[int]] | None = None, model_name: str = "the model"
                   ) -> ClassificationResult:
    """Top-1 of ``model`` (taking [0,1] images) over every batch of ``loader`` (of every rank).

    ``class_subset``: score with ``logits[:, class_subset]`` (labels index the subset). ``label_targets``: a
    prediction over the union of the targets counts as correct when it is one of ``label_targets[label]``
    (ObjectNet-style class mappings).
    """
    import contextlib

    from .distributed import merge_records

    from grace_plugin.losses import feature_sums, spread_from_sums

    model.eval()
    records = []
    spread = hasattr(model, "encode") and hasattr(model, "head")
    bar = _bar(progress, None, desc, "batch")
    union = sorted({i for t in label_targets.values() for i in t}) if label_targets is not None else None
    for idx, batch in enumerate(loader):
        rec = {"key": _key(batch, idx), "correct": [], "skipped": dict(batch.get("skipped", {}))}
        records.append(rec)
        x = batch["image"]
        if x.numel() == 0:
            continue
        x, y = x.to(device), batch["label"].to(device)
        with (autocast or contextlib.nullcontext)():
            if spread:  # the same computation as model(x), keeping the features
                feats = model.encode(x)
                logits = model.head(feats)
                total, _ = feature_sums(feats)
                rec["feature_sum"] = total.cpu().tolist()
            else:
                logits = model(x)
        _check_logits(logits, model_name)
        if union is not None:
            pred = torch.tensor(union, device=logits.device)[logits.float()[:, union].argmax(-1)]
            rec["correct"] = [int(int(p) in label_targets.get(int(t), ())) for p, t in zip(pred.tolist(), y.tolist())]
        else:
            rec["correct"] = (project_logits(logits.float(), class_subset).argmax(-1) == y).int().tolist()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    res, skipped, bits = ClassificationResult(), Counter(), []
    feat_total, feat_n = None, 0
    for rec in merge_records(records):
        bits += map(str, rec["correct"])
        res.correct += sum(rec["correct"])
        res.n += len(rec["correct"])
        skipped.update(rec["skipped"])
        if "feature_sum" in rec:  # summed over batches in key order: the same number on any number of ranks
            t = torch.tensor(rec["feature_sum"], dtype=torch.float64)
            feat_total, feat_n = (t if feat_total is None else feat_total + t), feat_n + len(rec["correct"])
    res.skipped, res.per_sample = dict(skipped), "".join(bits)
    if feat_total is not None:
        res.feature_spread = spread_from_sums(feat_total, feat_n)
    return res


@dataclass
class AdversarialResult:
    attack: str
    eps: float
    norm: str
    n: int = 0
    clean_correct: int = 0
    robust_correct: int = 0
    skipped: dict = field(default_factory=dict)
    resumed_batches: int = 0
    clean_per_sample: str = ""  # "1"/"0" per attacked sample in shard order (as ClassificationResult.per_sample)
    robust_per_sample: str = ""

    @property
    def robust_acc(self) -> float | None:
        return 100.0 * self.robust_correct / self.n if self.n else None

    @property
    def clean_acc(self) -> float | None:
        return 100.0 * self.clean_correct / self.n if self.n else None

    def as_dict(self) -> dict:
        return {"attack": self.attack, "eps": self.eps, "norm": self.norm, "n": self.n,
                "clean_correct": self.clean_correct, "robust_correct": self.robust_correct,
                "clean_acc": self.clean_acc, "robust_acc": self.robust_acc, "precision": "fp32",
                "skipped": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped),
                "resumed_batches": self.resumed_batches, "clean_per_sample": self.clean_per_sample,
                "robust_per_sample": self.robust_per_sample}


def worst_case(results: list[dict]) -> dict:
    """The per-sample worst case of several attacks' results (``AdversarialResult.as_dict()``) on the same samples: a
    sample is robust only if it is robust under every attack (AutoAttack's rule, computed from the per-sample
    strings, so no attack is run again). Results on different samples (n, clean per-sample string) are a bug of the
    caller: ValueError."""
    first = results[0]
    for r in results[1:]:
        if r["n"] != first["n"] or r["clean_per_sample"] != first["clean_per_sample"] or r["eps"] != first["eps"] \
                or r["norm"] != first["norm"]:
            raise ValueError(f"worst case of {r['attack']} and {first['attack']}: not the same samples or threat")
    robust = "".join("1" if all(r["robust_per_sample"][i] == "1" for r in results) else "0"
                     for i in range(len(first["robust_per_sample"])))
    n, correct = first["n"], robust.count("1")
    return {**{k: first[k] for k in ("eps", "norm", "n", "clean_correct", "clean_acc", "precision", "skipped",
                                     "skipped_by_reason", "clean_per_sample")},
            "attack": "worst(" + ",".join(r["attack"] for r in results) + ")",
            "attacks": [r["attack"] for r in results],
            "robust_correct": correct, "robust_acc": 100.0 * correct / n if n else None, "robust_per_sample": robust,
            "per_attack_robust_acc": {r["attack"]: r["robust_acc"] for r in results},
            "resumed_batches": sum(r.get("resumed_batches", 0) for r in results)}


def model_sha256(model: torch.nn.Module) -> str:
    """sha256 over the names and bytes of every tensor in ``model.state_dict()`` (what the attack ran on)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(v.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _state_files(state_path: Path) -> list[Path]:
    return sorted(state_path.parent.glob(f"{state_path.stem}.rank*.json"))


def _load_state(state_path: Path, signature: dict) -> dict:
    """Finished batches of every rank's state file written for exactly ``signature``; others are discarded with a
    one-line notice naming the fields that differ: a stale state must never give old numbers."""
    batches = {}
    for f in _state_files(state_path):
        try:
            st = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s: unreadable resume state, discarded", f)
            continue
        old = st.get("signature") or {}
        if old != signature:
            diff = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
            log.warning("%s: resume state was computed from a different %s; discarded, recomputing", f,
                        ", ".join(diff))
            continue
        batches.update(st.get("batches", {}))
    return batches


class BatchState:
    """The resume state of a batched attack: ``DIR/NAME.json`` names it, each rank rewrites ``DIR/NAME.rank<r>.json``
    after every finished batch with the ``signature`` it was computed from; a rerun with the same signature reads the
    finished batches of every rank's file (so it resumes on any number of ranks). ``state_path`` None: no state."""

    def __init__(self, state_path: str | Path | None, signature: dict):
        from grace_plugin.runtime import world_info

        self.signature, self.own, self.file, self.done = signature, {}, None, {}
        if state_path is not None:
            state_path = Path(state_path)
            state_path.parent.mkdir(parents=True, exist_ok=True)
            self.done = _load_state(state_path, signature)
            self.file = state_path.parent / f"{state_path.stem}.rank{world_info()[0]}.json"

    def get(self, name: str) -> dict | None:
        """A finished batch's record, or None."""
        return self.done.get(name)

    def put(self, name: str, rec: dict) -> None:
        """Record a finished batch (written at once: a kill loses at most the batch under way)."""
        from grace_plugin.tensor_io import atomic_write_text

        if self.file is not None:
            self.own[name] = {k: v for k, v in rec.items() if k != "resumed"}
            atomic_write_text(self.file, json.dumps({"signature": self.signature, "batches": self.own}) + "\n")


def evaluate_adversarial(model, loader, attack_name: str, eps: float, n_max: int | None = None,
                         norm: str = "Linf", device: str | torch.device = "cpu", seed: int = 0,
                         progress: bool = False, state_path=None, unit_input: bool | None = None,
                         model_name: str = "model", signature: dict | None = None) -> AdversarialResult:
    """Robust accuracy of ``model`` under a registered attack, in fp32, on the batches of ``loader`` (the caller
    limits it to the attacked subset; every rank attacks its own batches and the records are gathered).

    ``state_path``: ``DIR/NAME.json`` names the resume state: each rank writes ``DIR/NAME.rank<r>.json`` after every
    finished batch (per-sample clean and robust results, keyed by batch); a rerun whose ``signature`` (model
    weights, data files, attack, eps, norm, n, seed, batch size: built by the caller) equals the saved one reuses
    those batches (``resumed_batches``), on any number of ranks. The attack is re-created per batch with the same
    seed, so a batch's result depends only on its samples. The model must take [0,1] input
    (``attacks.check_unit_input``).
    """
    from .attacks import check_unit_input, create_attack
    from .distributed import merge_records

    check_unit_input(model, unit_input, name=model_name)
    model = model.float().eval()  # fp32: low precision weakens gradient attacks
    attack = create_attack(attack_name, model, eps=eps, norm=norm, seed=seed)
    state = BatchState(state_path, dict(signature or {}, attack=attack_name, eps=eps, norm=norm, seed=seed, n=n_max))
    records = []
    bar = _bar(progress, n_max, f"attack {attack_name}", "img")
    for idx, batch in enumerate(loader):
        key = _key(batch, idx)
        name = ":".join(str(k) for k in key)
        x, y = batch["image"], batch["label"]
        rec = state.get(name)
        if rec is not None and len(rec["clean"]) == int(y.numel()) and rec["skipped"] == batch.get("skipped", {}):
            rec = dict(rec, key=key, resumed=True)
        elif x.numel() == 0:
            rec = {"key": key, "clean": [], "robust": [], "skipped": dict(batch.get("skipped", {}))}
        else:
            x, y = x.to(device).float(), y.to(device)
            with torch.no_grad():
                logits = model(x)
                _check_logits(logits, model_name)
                clean = (logits.argmax(-1) == y).int().tolist()
            x_adv = attack(x, y)
            with torch.no_grad():
                logits = model(x_adv)
                _check_logits(logits, model_name)
                robust = (logits.argmax(-1) == y).int().tolist()
            rec = {"key": key, "clean": clean, "robust": robust, "skipped": dict(batch.get("skipped", {}))}
        records.append(rec)
        state.put(name, rec)
        if bar is not None:
            bar.update(len(rec["clean"]))
    if bar is not None:
        bar.close()
    res = AdversarialResult(attack_name, eps, norm)
    skipped = Counter()
    clean_bits, robust_bits = [], []
    for rec in merge_records(records):
        res.resumed_batches += int(rec.get("resumed", False))
        res.clean_correct += sum(rec["clean"])
        res.robust_correct += sum(rec["robust"])
        res.n += len(rec["clean"])
        clean_bits += map(str, rec["clean"])
        robust_bits += map(str, rec["robust"])
        skipped.update(rec["skipped"])
    res.skipped = dict(skipped)
    res.clean_per_sample, res.robust_per_sample = "".join(clean_bits), "".join(robust_bits)
    return res
