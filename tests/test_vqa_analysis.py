"""FRAMES-VQA's analyses (eval_suites/vqa_analysis.py): the Mahalanobis shift against numpy on constructed Gaussians,
the correlations against scipy, modality importance on hand-built models whose reliance is known, and the whole
analysis through grace eval --task vqa --shift."""
import json

import numpy as np
import pytest
import torch
from scipy import stats

from eval_suites.vqa_analysis import importance_summary, modality_importance, relate, shift_scores
from grace_plugin.vqa.model import QuestionContext, current_questions

pytestmark = pytest.mark.usefixtures("one_thread")


def _emb(rng, n, mean, cov):
    return rng.multivariate_normal(mean, cov, size=n)


def test_shift_is_the_mahalanobis_distance_numpy_computes():
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.6, 0.0], [0.6, 1.0, 0.2], [0.0, 0.2, 0.5]])
    train = {c: _emb(rng, 4000, np.zeros(3), cov) for c in ("image", "joint")}
    near = {c: _emb(rng, 300, np.full(3, 0.5), cov) for c in ("image", "joint")}
    far = {c: _emb(rng, 300, np.full(3, 3.0), cov) for c in ("image", "joint")}
    out = shift_scores(train, {"near": near, "far": far}, ridge=1e-9)
    z = train["image"]
    mu, sigma = z.mean(0), np.cov(z, rowvar=False)
    inv = np.linalg.inv(sigma + 1e-9 * np.eye(3))
    ref = np.sqrt(np.einsum("nd,de,ne->n", far["image"] - mu, inv, far["image"] - mu))
    assert np.allclose(out["samples"]["far"]["image"], ref, rtol=1e-8)
    assert out["sets"]["far"]["image"] > out["sets"]["near"]["image"] > 0
    # the closed form: E[distance] of a shifted Gaussian grows with the shift
    assert out["sets"]["near"]["joint"] < out["sets"]["far"]["joint"]


def test_relate_matches_scipy():
    shift = {"sets": {n: {"image": v, "joint": 2 * v} for n, v in zip("abcd", [1.0, 2.0, 3.5, 5.0])},
             "samples": {"a": {"image": [1, 2, 3, 4], "joint": [2, 4, 6, 9], "question": [4, 3, 2, 1]}}}
    acc = dict(zip("abcd", [80.0, 70.0, 72.0, 40.0]))
    r = relate(shift, acc)
    x, y = [1.0, 2.0, 3.5, 5.0], [80.0, 70.0, 72.0, 40.0]
    assert r["shift_vs_accuracy"]["image"]["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert r["shift_vs_accuracy"]["joint"]["spearman"] == pytest.approx(stats.spearmanr(x, y)[0])
    assert r["concept_pairs"]["a"]["image~joint"] == pytest.approx(stats.pearsonr([1, 2, 3, 4], [2, 4, 6, 9])[0])
    assert r["concept_pairs"]["a"]["question~joint"] == pytest.approx(stats.pearsonr([4, 3, 2, 1], [2, 4, 6, 9])[0])


class _Model(torch.nn.Module):
    """Answers from the question only (``uses="question"``) or from the image only (``uses="image"``)."""

    question_fields = ("embedding",)
    answers = ["a", "b", "c"]

    def __init__(self, uses):
        super().__init__()
        self.uses = uses

    def forward(self, x):
        q = current_questions(x.shape[0], "embedding")
        return 5 * (q if self.uses == "question" else x.mean((2, 3)))


class _Encoder:
    def context(self, model, questions):
        emb = torch.stack([torch.eye(3)[len(q) % 3] if q else torch.zeros(3) for q in questions])
        return QuestionContext(embedding=emb)


@pytest.mark.parametrize("uses,share", [("question", 1.0), ("image", 0.0)])
def test_modality_importance_on_models_of_known_reliance(uses, share):
    x = torch.eye(3)[torch.tensor([0, 1, 2, 0])].view(4, 3, 1, 1).expand(4, 3, 2, 2).clone()
    mean_image = x.mean(0, keepdim=True)
    out = modality_importance(_Model(uses), _Encoder(), x, ["abc", "ab", "a", "abcd"], mean_image)
    assert np.allclose(out["question_share"], share)
    unused = "image" if uses == "question" else "question"
    assert np.allclose(out[unused], 0.0) and (out[uses] > 0).all()
    s = importance_summary(out)
    assert s["question_share"]["median"] == pytest.approx(share) and s[uses]["n"] == 4


def test_eval_shift_end_to_end(tiny_clip_dir, tmp_path, capsys):
    from grace_app.cli import main
    from grace_app.testbed.vqa_world import VqaWorldSpec, write_vqa_world

    world = tmp_path / "w"
    write_vqa_world(world, seed=0, spec=VqaWorldSpec.small())
    run = tmp_path / "run"
    assert main(["train", "--task", "vqa", "--recipe", "ft", "--init", str(tiny_clip_dir), "--data",
                 str(world / "vqav2"), "--out", str(run), "--steps", "2", "--no-progress", "--set",
                 "data.answers_min_count=2", "--set", "train.batch_size=16", "--set", "train.val_every=0"]) == 0
    capsys.readouterr()
    ev = tmp_path / "ev"
    assert main(["eval", "--task", "vqa", "--model", str(run), "--data", f"vqav2={world / 'vqav2'}",
                 "--ood", f"iv-vqa={world / 'iv-vqa'},textvqa={world / 'textvqa'},ok-vqa={world / 'ok-vqa'}",
                 "--shift", "--out", str(ev), "--no-progress"]) == 0
    assert "## Shift per modality" in capsys.readouterr().out
    an = json.loads((ev / "report.json").read_text())["analysis"]
    assert set(an["shift"]) == {"vqav2", "iv-vqa", "textvqa", "ok-vqa"}
    assert set(an["shift"]["textvqa"]) == {"uni_image", "uni_question", "image", "joint", "question"}
    assert an["reference"] == str(tiny_clip_dir) and an["shift_vs_accuracy"]["joint"]["sets"] == 4
    per = json.loads((ev / "shift" / "textvqa.json").read_text())
    assert len(per["question_id"]) == len(per["joint"]) == 40
    # the never-asked question templates are farther from ID train than the ID test questions, by the question
    assert an["shift"]["textvqa"]["uni_question"] > an["shift"]["vqav2"]["uni_question"]
