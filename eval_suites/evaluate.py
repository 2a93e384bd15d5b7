"""Clean top-1 accuracy over a shard stream, with skipped samples counted (never a shrunken denominator)."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from grace_plugin.checkpoint import NonFiniteError
from grace_plugin.errors import GraceError

__all__ = ["ClassificationResult", "AdversarialResult", "evaluate_clean", "evaluate_adversarial", "project_logits",
           "account", "EmptySetError", "StrictSkipError"]

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


@dataclass
class ClassificationResult:
    correct: int = 0
    n: int = 0
    skipped: dict = field(default_factory=dict)
    expected: int | None = None

    @property
    def top1(self) -> float | None:
        return 100.0 * self.correct / self.n if self.n else None

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {"top1": self.top1, "n": self.n, "skipped": self.n_skipped, "skipped_by_reason": dict(self.skipped),
                "expected": self.expected}


def project_logits(logits: torch.Tensor, class_subset: list[int] | None) -> torch.Tensor:
    """Restrict a head's logits to a label subset (e.g. ImageNet-R's 200 of 1000 classes)."""
    return logits if class_subset is None else logits[:, class_subset]


def _check_logits(logits: torch.Tensor, model_name: str) -> None:
    """A NaN logit argmaxes to class 0: a silent chance-level number. Refuse it, naming the model."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(-1).sum())
        raise NonFiniteError(f"{model_name}: non-finite logits for {bad} of {logits.shape[0]} images; refusing to "
                             "report accuracy (are its weights NaN?)")


@torch.no_grad()
def evaluate_clean(model, loader, device: str | torch.device = "cpu", class_subset: list[int] | None = None,
                   autocast=None, progress: bool = False, desc: str = "eval",
                   label_targets: dict[int, list[int]] | None = None, model_name: str = "the model"
                   ) -> ClassificationResult:
    """Top-1 of ``model`` (taking [0,1] images) over every batch of ``loader``.

    ``class_subset``: score with ``logits[:, class_subset]`` (labels index the subset). ``label_targets``: a
    prediction over the union of the targets counts as correct when it is one of ``label_targets[label]``
    (ObjectNet-style class mappings).
    """
    import contextlib

    res = ClassificationResult()
    skipped: Counter = Counter()
    model.eval()
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    for batch in it:
        for k, v in batch.get("skipped", {}).items():
            skipped[k] += v
        x = batch["image"]
        if x.numel() == 0:
            continue
        x, y = x.to(device), batch["label"].to(device)
        with (autocast or contextlib.nullcontext)():
            logits = model(x)
        _check_logits(logits, model_name)
        if label_targets is not None:
            union = sorted({i for t in label_targets.values() for i in t})
            pred = torch.tensor(union, device=logits.device)[logits.float()[:, union].argmax(-1)]
            ok = [int(p) in label_targets.get(int(t), ()) for p, t in zip(pred.tolist(), y.tolist())]
            res.correct += sum(ok)
        else:
            pred = project_logits(logits.float(), class_subset).argmax(-1)
            res.correct += int((pred == y).sum())
        res.n += int(y.numel())
    res.skipped = dict(skipped)
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

    @property
    def robust_acc(self) -> float | None:
        return 100.0 * self.robust_correct / self.n if self.n else None

    @property
    def clean_acc(self) -> float | None:
        return 100.0 * self.clean_correct / self.n if self.n else None

    def as_dict(self) -> dict:
        return {"attack": self.attack, "eps": self.eps, "norm": self.norm, "n": self.n,
                "clean_acc": self.clean_acc, "robust_acc": self.robust_acc, "precision": "fp32",
                "skipped": sum(self.skipped.values())}


def _load_state(path, signature: dict) -> dict:
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        return {"signature": signature, "batches": {}}
    state = json.loads(p.read_text())
    if state.get("signature") != signature:
        raise ValueError(f"{p}: resume state was written for a different run ({state.get('signature')}); "
                         "delete it or choose another --out")
    return state


def evaluate_adversarial(model, loader, attack_name: str, eps: float, n_max: int | None = None,
                         norm: str = "Linf", device: str | torch.device = "cpu", seed: int = 0,
                         progress: bool = False, state_path=None, unit_input: bool | None = None,
                         model_name: str = "model") -> AdversarialResult:
    """Robust accuracy of ``model`` under a registered attack on the first ``n_max`` samples, in fp32.

    ``state_path``: a JSON file recording each finished batch (clean and robust counts); a rerun with the same
    settings skips those batches, so a long run (AutoAttack on 5000 ImageNet images) resumes where it stopped.
    The model must take [0,1] input (``attacks.check_unit_input``).
    """
    import json

    from .attacks import check_unit_input, create_attack

    check_unit_input(model, unit_input, name=model_name)
    model = model.float().eval()  # fp32: low precision weakens gradient attacks
    attack = create_attack(attack_name, model, eps=eps, norm=norm, seed=seed)
    res = AdversarialResult(attack_name, eps, norm)
    skipped: Counter = Counter()
    state = None
    if state_path is not None:
        sig = {"attack": attack_name, "eps": eps, "norm": norm, "seed": seed, "n_max": n_max, "model": model_name}
        state = _load_state(state_path, sig)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_max, desc=f"attack {attack_name}", unit="img", leave=False, dynamic_ncols=True)
    for idx, batch in enumerate(loader):
        for k, v in batch.get("skipped", {}).items():
            skipped[k] += v
        x, y = batch["image"], batch["label"]
        if x.numel() == 0:
            continue
        if n_max is not None:
            take = n_max - res.n
            if take <= 0:
                break
            x, y = x[:take], y[:take]
        done = state["batches"].get(str(idx)) if state is not None else None
        if done is not None and done["n"] == int(y.numel()):
            clean_c, robust_c = done["clean"], done["robust"]
        else:
            x, y = x.to(device).float(), y.to(device)
            with torch.no_grad():
                logits = model(x)
                _check_logits(logits, model_name)
                clean_c = int((logits.argmax(-1) == y).sum())
            x_adv = attack(x, y)
            with torch.no_grad():
                logits = model(x_adv)
                _check_logits(logits, model_name)
                robust_c = int((logits.argmax(-1) == y).sum())
            if state is not None:
                from grace_plugin.checkpoint import atomic_write_text

                state["batches"][str(idx)] = {"n": int(y.numel()), "clean": clean_c, "robust": robust_c}
                atomic_write_text(state_path, json.dumps(state) + "\n")
        res.clean_correct += clean_c
        res.robust_correct += robust_c
        res.n += int(y.numel())
        if bar is not None:
            bar.update(int(y.numel()))
    if bar is not None:
        bar.close()
    res.skipped = dict(skipped)
    return res
