"""RobustBench interop: ModelInfo JSON, ``robustbench.eval.benchmark`` on a user's ImageNet folder, corruption mCE,
and the reference rows shipped as data (GRACE, arXiv 2603.27139, Tables 6-8;
the RobustBench ImageNet Linf board from its repository's ``model_info/imagenet/Linf/``).

``model_info/<dataset>/<threat>/<Name>.json`` carries RobustBench's ``ModelInfo`` fields (robustbench/utils.py);
accuracies are two-decimal percent strings ("59.68") and eps is RobustBench's "4/255" spelling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from grace_plugin.errors import UsageError

__all__ = ["model_info", "write_model_info", "load_references", "reference_rows",
           "alexnet_errors", "corruption_scores", "run_robustbench", "pct"]

DATA = Path(__file__).parent / "data"


def pct(value: float | None, fraction: bool = False) -> str | None:
    """A percentage (or a fraction with ``fraction=True``) -> RobustBench's two-decimal string."""
    if value is None:
        return None
    return f"{(100.0 * value if fraction else value):.2f}"


def model_info(dataset: str, threat: str, clean_acc: float | None, robust_acc: float | None = None,
               eps: float | None = None, corruptions_acc: float | None = None,
               corruptions_mce: float | None = None, **fields) -> dict:
    """ModelInfo dict from percentages (ours) -> RobustBench's strings. ``fields``: link, name, authors, ..."""
    from registry.naming import model_info_fields

    from .attacks import format_eps

    names = model_info_fields()
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise UsageError(f"unknown ModelInfo fields {unknown}; valid: {', '.join(names)}")
    info = dict.fromkeys(names)
    info.update(fields)
    info.update(dataset=dataset, clean_acc=pct(clean_acc))
    if threat in ("Linf", "L2"):
        info.update(eps=format_eps(eps) if eps is not None else None, autoattack_acc=pct(robust_acc))
    elif threat == "corruptions":
        info.update(corruptions_acc=pct(corruptions_acc), corruptions_mce=pct(corruptions_mce))
    else:
        raise UsageError(f"unknown threat model {threat!r}; valid: Linf, L2, corruptions")
    return info


def write_model_info(root: str | Path, name: str, dataset: str, threat: str, **kwargs) -> Path:
    """Write ``root/model_info/<dataset>/<threat>/<name>.json`` atomically; return its path."""
    from grace_plugin.tensor_io import atomic_write_text

    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"bad RobustBench model name {name!r}: use <FirstAuthor><Year><FirstWord>[_<Arch>]")
    path = Path(root) / "model_info" / dataset / threat / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(model_info(dataset, threat, **kwargs), indent=2) + "\n")
    return path


def load_references() -> dict:
    return json.loads((DATA / "references.json").read_text())


def reference_rows(table: str = "Table 6") -> list[dict]:
    """Paper rows ``{"method", "id", "ood", "adv", "hm", "source"}`` for the report's reference block."""
    ref = load_references()["paper"]
    if table not in ref["tables"]:
        raise UsageError(f"--table: unknown reference table {table!r}; valid: {', '.join(ref['tables'])}")
    return [dict(r, source=f"paper {table}") for r in ref["tables"][table]]


def alexnet_errors() -> dict[str, float]:
    return dict(json.loads((DATA / "alexnet_corruptions.json").read_text())["error"])


def corruption_scores(acc: dict[tuple[str, int], float]) -> tuple[float, float]:
    """``{(corruption, severity): accuracy fraction}`` -> (mean accuracy, mCE), RobustBench's formula:
    mCE = mean_c [ mean_s (1 - acc[c, s]) / err_AlexNet[c] ] with err_AlexNet the mean over severities."""
    ref = alexnet_errors()
    corruptions = sorted({c for c, _ in acc})
    unknown = [c for c in corruptions if c not in ref]
    if unknown:
        raise ValueError(f"no AlexNet reference for corruptions {unknown}; valid: {', '.join(sorted(ref))}")
    mean_acc = sum(acc.values()) / len(acc)
    mce = 0.0
    for c in corruptions:
        errs = [1.0 - a for (cc, _), a in acc.items() if cc == c]
        mce += (sum(errs) / len(errs)) / ref[c] / len(corruptions)
    return mean_acc, mce


@dataclass
class RobustBenchResult:
    clean_acc: float  # percent
    robust_acc: float
    n: int
    eps: float
    threat: str

    def as_dict(self) -> dict:
        return {"clean_acc": self.clean_acc, "robust_acc": self.robust_acc, "n": self.n, "eps": self.eps,
                "threat": self.threat, "runner": "robustbench.eval.benchmark", "precision": "fp32"}


def run_robustbench(model, imagenet_dir: str | Path, preprocessing, eps: float = 4 / 255, threat: str = "Linf",
                    n: int = 5000, batch_size: int = 64, device: str = "cpu") -> RobustBenchResult:
    """``robustbench.eval.benchmark`` on the user's ImageNet val folder (RobustBench's 5000-image subset).

    The folder is checked first (all 1000 classes, the subset files), because RobustBench itself would mislabel
    or crash on an incomplete folder. ``model`` must take [0,1] input (checked by the caller).
    """
    import torch
    from grace_plugin._compat import check_robustbench_install

    check_robustbench_install()
    from robustbench.eval import benchmark

    from .imagenet import check_imagenet_folder

    val = check_imagenet_folder(imagenet_dir, n)
    if val.name != "val":
        raise UsageError(f"{imagenet_dir}: robustbench reads <DIR>/val/<wnid>/...; give the folder that holds val/")
    model = model.float().eval()
    clean, robust = benchmark(model, n_examples=n, dataset="imagenet", threat_model=threat,
                              data_dir=str(val.parent), eps=eps, batch_size=batch_size, preprocessing=preprocessing,
                              device=torch.device(device))
    return RobustBenchResult(100.0 * clean, 100.0 * robust, n, eps, threat)
