"""FRAMES-VQA's analyses on a CLIP VQA model (arXiv 2505.21755 §4-5): the shift of each set per modality, measured by
Mahalanobis distances to ID train, how it relates to accuracy, and how much each answer relies on the image and on
the question.

Embeddings per sample (``embeddings``), the CLIP analogues of FRAMES' concepts (github.com/chengyuehuang511/
vlm_robustness, ``ood_test/contextual_ood/measure.py``; its ViT / BERT / PaliGemma embeddings):

* ``uni_image``: the frozen pre-trained image tower's embedding (FRAMES: a ViT);
* ``uni_question``: the frozen pre-trained text tower's embedding of the question (FRAMES: BERT);
* ``image``: the model's own image embedding;
* ``joint``: the model's fused image-question representation (``ClipVQA``: the answer head's penultimate
  activation; the zero-shot scorer: its image embedding beside the predicted answer's prompt embedding);
* ``question``: the same with the image removed (``ClipVQA``: the head on a zero image feature; the zero-shot
  scorer: the question's text embedding), FRAMES' ``ques_ft``.

``shift_scores`` fits one Gaussian per concept on ID train (``eval_suites.shift.fit_gaussian``: float64, a
scale-aware ridge) and scores every sample; ``relate`` correlates per-set shift with per-set accuracy (Pearson and
Spearman across sets) and, per sample, pairs of concepts (which modality the joint shift follows).

Modality importance (``modality_importance``): FRAMES measures text-over-image attention in PaliGemma; a CLIP VQA
model has no cross-modal attention, so here it is an ablation per sample: the drop in the predicted answer's
probability when the image is replaced by the ID mean image (``image``) and when the question is emptied
(``question``), and the question's share ``|dq| / (|di| + |dq|)`` (0.5 when neither matters).
"""
from __future__ import annotations

import numpy as np
import torch

from grace_plugin.errors import GraceError

__all__ = ["CONCEPTS", "PAIRS", "embeddings", "shift_scores", "relate", "modality_importance",
           "importance_summary", "analyse"]

CONCEPTS = ("uni_image", "uni_question", "image", "joint", "question")
# per-sample concept pairs (FRAMES: (image, joint), (ques_ft, joint), pre-trained against fine-tuned)
PAIRS = (("image", "joint"), ("question", "joint"), ("uni_image", "image"), ("uni_question", "question"))


@torch.no_grad()
def _batch_concepts(model, reference, encoder, ref_encoder, x: torch.Tensor, questions: list[str]) -> dict:
    """``{concept: [B, d] float64}`` of one batch."""
    from grace_plugin.vqa.model import bound

    if getattr(model, "generative", False):
        return _coca_concepts(model, reference, ref_encoder, x, questions)
    f = model.encode(x).float()
    out = {"uni_image": reference.encode(x).float(), "uni_question": ref_encoder.encode(questions).float(),
           "image": f}
    ctx = encoder.context(model, questions)
    if ctx.embedding is not None:  # ClipVQA
        q = ctx.embedding.to(f)
        out["joint"] = model.head.hidden(f, q)
        out["question"] = model.head.hidden(torch.zeros_like(f), q)
    else:  # the zero-shot scorer: the predicted answer's prompt embedding
        with bound(ctx):
            pred = model(x).argmax(1)
        t = ctx.prompts.to(f)[torch.arange(f.shape[0]), pred]
        out["joint"] = torch.cat([f, t], dim=1)
        out["question"] = ref_encoder.encode(questions).float()
    return {k: v.cpu().numpy().astype(np.float64) for k, v in out.items()}


def _prompt_states(model, questions: list[str], *image_embs: torch.Tensor) -> list[torch.Tensor]:
    """The CoCa decoder's final states (the input of its last norm) averaged over each prompt's positions (``<sot>``
    and ``question: ... answer:``), once per image-token tensor of ``image_embs``: ``[B, W]`` each. The prompts are
    tokenised and text-encoded once. The decoder is causal, so the padding after a prompt does not reach its
    positions."""
    prompts = [model.prompt_ids(q) for q in questions]
    device = image_embs[0].device
    text = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long, device=device)
    mask = torch.zeros_like(text, dtype=torch.bool)
    for i, ids in enumerate(prompts):
        text[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = True
    _, token_embs = model.coca._encode_text(text)
    got = {}
    handle = model.coca.text_decoder.ln_final.register_forward_pre_hook(lambda _m, args: got.__setitem__("h", args[0]))
    out = []
    try:
        for embs in image_embs:
            model.coca.text_decoder(embs, token_embs)
            m = mask[..., None].to(got["h"].dtype)
            out.append((got["h"] * m).sum(1) / m.sum(1))
    finally:
        handle.remove()
    return out


def _coca_concepts(model, reference, ref_encoder, x: torch.Tensor, questions: list[str]) -> dict:
    """FRAMES-VQA's concepts for the generative backbone (its PaliGemma ones, arXiv 2505.21755 §4, on a CoCa):
    ``image`` = the mean of the image tokens the decoder reads; ``joint`` = the average of that and the decoder's
    states over the prompt positions (PaliGemma's joint averages the image and the text positions of one sequence);
    ``question`` = the decoder's prompt states with the image tokens zeroed (the image removed)."""
    from grace_plugin.errors import UsageError

    _, embs = model.coca._encode_image(model.normalize(x))
    img = embs.float().mean(1)
    states, no_image = (t.float() for t in _prompt_states(model, questions, embs, torch.zeros_like(embs)))
    if states.shape[1] != img.shape[1]:
        raise UsageError(f"--shift: this CoCa's image tokens ({img.shape[1]}) and decoder ({states.shape[1]}) differ "
                         "in width; the joint concept averages the two")
    out = {"uni_image": reference.encode(x).float(), "uni_question": ref_encoder.encode(questions).float(),
           "image": img, "joint": (img + states) / 2,
           "question": no_image}
    return {k: v.cpu().numpy().astype(np.float64) for k, v in out.items()}


def embeddings(model, reference, encoder, ref_encoder, urls: list[str], batch_size: int, device,
               limit: int | None = None) -> dict:
    """``{"question_id": [...], <concept>: [n, d]}`` for the questions of a set in shard order
    (the first ``limit``). ``reference``: the pre-trained image side (``encode``); ``ref_encoder``: the pre-trained
    question encoder."""
    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.transforms import eval_transform
    from grace_plugin.vqa.data import VqaTarget

    parts: dict[str, list] = {c: [] for c in CONCEPTS}
    ids = []
    loader = make_eval_loader(urls, eval_transform(model.pretrained_cfg), batch_size,
                              target=VqaTarget(model.answers), limit=limit, ranks=(0, 1))
    for b in loader:
        if not b["image"].numel():
            continue
        concepts = _batch_concepts(model, reference, encoder, ref_encoder, b["image"].to(device), b["question"])
        for c in CONCEPTS:
            parts[c].append(concepts[c])
        ids += [r["question_id"] for r in b["record"]]
    return {"question_id": ids, **{c: np.concatenate(v) for c, v in parts.items() if v}}


def shift_scores(id_train: dict, sets: dict[str, dict], ridge: float | None = None) -> dict:
    """Per concept, a Gaussian fitted on ``id_train``'s embeddings; per set, every sample's Mahalanobis distance
    and their mean (``{"sets": {set: {concept: mean}}, "samples": {set: {concept: [..]}}, "ridge": {concept: r}}``).
    FRAMES reports the negative distance (higher = more in-distribution); these are distances (higher = farther)."""
    from .shift import fit_gaussian, mahalanobis

    out: dict = {"sets": {}, "samples": {}, "ridge": {}}
    for c in CONCEPTS:
        if c not in id_train:
            continue
        fit = fit_gaussian(id_train[c], ridge)
        out["ridge"][c] = fit.ridge
        for name, emb in sets.items():
            d = mahalanobis(emb[c], fit)
            out["samples"].setdefault(name, {})[c] = d.tolist()
            out["sets"].setdefault(name, {})[c] = float(d.mean())
    return out


def relate(shift: dict, accuracy: dict[str, float]) -> dict:
    """Per concept: Pearson and Spearman of per-set mean shift against per-set accuracy across the sets; per set and
    concept pair: the per-sample Pearson of the two distances."""
    from .shift import pearson, spearman

    names = [n for n in shift["sets"] if n in accuracy]
    across = {}
    for c in CONCEPTS:
        x = [shift["sets"][n][c] for n in names if c in shift["sets"][n]]
        if len(x) == len(names) and len(names) >= 3:
            y = [accuracy[n] for n in names]
            across[c] = {"pearson": pearson(x, y), "spearman": spearman(x, y), "sets": len(names)}
    pairs = {}
    for n, per in shift["samples"].items():
        pairs[n] = {f"{a}~{b}": pearson(per[a], per[b]) for a, b in PAIRS if a in per and b in per}
    return {"shift_vs_accuracy": across, "concept_pairs": pairs}


@torch.no_grad()
def modality_importance(model, encoder, x: torch.Tensor, questions: list[str], mean_image: torch.Tensor
                        ) -> dict[str, np.ndarray]:
    """Per sample: the predicted answer's probability drop when the image is the ID mean image (``image``) and when
    the question is empty (``question``), and the question's share of the two (absolute) drops. For a generative
    model the probability is the whole answer's (teacher-forced), and ``self_over_cross`` is the decoder's
    attention-output ratio (``attention_ratio.residual_ratio``, the counterpart of FRAMES-VQA's text-over-image
    attention: larger = the question contributes more than the image). The generative model's answer is its greedy
    tokens (``answer_ids``), teacher-forced as generated: their text need not tokenise back to them."""
    from grace_plugin.vqa.model import bound

    if getattr(model, "generative", False):
        return _coca_importance(model, x, questions, mean_image)
    ctx, empty = encoder.context(model, questions), encoder.context(model, [""] * len(questions))
    with bound(ctx):
        p = model(x).float().softmax(1)
        pred = p.argmax(1, keepdim=True)
        p_img = model(mean_image.expand_as(x)).float().softmax(1)
    with bound(empty):
        p_q = model(x).float().softmax(1)
    base = p.gather(1, pred)
    return _drops(base.squeeze(1), p_img.gather(1, pred).squeeze(1), p_q.gather(1, pred).squeeze(1))


def _drops(base: torch.Tensor, no_image: torch.Tensor, no_question: torch.Tensor) -> dict[str, np.ndarray]:
    di, dq = base - no_image, base - no_question
    tot = di.abs() + dq.abs()
    share = torch.where(tot > 0, dq.abs() / tot.clamp_min(1e-12), torch.full_like(tot, 0.5))
    return {"image": di.cpu().numpy(), "question": dq.cpu().numpy(), "question_share": share.cpu().numpy()}


def _coca_importance(model, x: torch.Tensor, questions: list[str], mean_image: torch.Tensor) -> dict[str, np.ndarray]:
    from grace_plugin.vqa.model import QuestionContext, bound

    from .attention_ratio import residual_ratio

    answers = model.answer_ids(x, questions)

    def p_answer(images, qs):  # p(the predicted answer | images, qs), the whole sequence
        text, labels, positions = model.lm_batch(qs, answers, images.device)
        with bound(QuestionContext(questions=list(qs), text=text, labels=labels, positions=positions,
                                   sequence=True)):
            return model(images)[:, 0].double().exp()

    out = _drops(p_answer(x, questions), p_answer(mean_image.expand_as(x), questions), p_answer(x, [""] * len(x)))
    self_out, cross_out, prompt = model.attention_outputs(x, questions, answers)
    out["self_over_cross"] = residual_ratio(self_out, cross_out, prompt).cpu().numpy()
    return out


def importance_summary(values: dict[str, np.ndarray]) -> dict:
    """Mean, median and quartiles of each per-sample importance."""
    return {k: {"mean": float(np.mean(v)), "median": float(np.median(v)),
                "q25": float(np.quantile(v, 0.25)), "q75": float(np.quantile(v, 0.75)), "n": int(len(v))}
            for k, v in values.items()}


def _mean_image(model, urls: list[str], n: int) -> torch.Tensor:
    """The mean [0,1] image of the first ``n`` questions' images (the ablation's uninformative image)."""
    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.transforms import eval_transform
    from grace_plugin.vqa.data import VqaTarget

    total, count = None, 0
    for b in make_eval_loader(urls, eval_transform(model.pretrained_cfg), 256, target=VqaTarget(model.answers),
                              limit=n, ranks=(0, 1)):
        if b["image"].numel():
            s = b["image"].sum(0, keepdim=True)
            total, count = (s if total is None else total + s), count + b["image"].shape[0]
    return total / max(count, 1)


def _importance(model, encoder, urls: list[str], mean_image: torch.Tensor, n: int, batch_size: int, device) -> dict:
    """Per-sample modality importance of a set's first ``n`` questions."""
    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.transforms import eval_transform
    from grace_plugin.vqa.data import VqaTarget

    parts: dict[str, list] = {}
    for b in make_eval_loader(urls, eval_transform(model.pretrained_cfg), batch_size,
                              target=VqaTarget(model.answers), limit=n, ranks=(0, 1)):
        if b["image"].numel():
            for k, v in modality_importance(model, encoder, b["image"].to(device), b["question"],
                                            mean_image.to(device)).items():
                parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


class _OpenClipImage(torch.nn.Module):
    """The frozen pre-trained image embedding of an open_clip model that has no timm tower (a CoCa): [0, 1] pixels
    normalised inside, ``encode_image(normalize=True)``."""

    def __init__(self, bundle):
        from grace_plugin.models.classifier import ImageNormalizer
        from grace_plugin.models.clip import pretrained_cfg_from_clip

        super().__init__()
        cfg = pretrained_cfg_from_clip(bundle)
        self.clip, self.normalize = bundle.clip.eval(), ImageNormalizer(cfg["mean"], cfg["std"])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(self.normalize(x), normalize=True)


def _reference(bundle):
    """The uni-modal image concept's model: the pre-trained CLIP's timm image tower, or a CoCa's own encoder."""
    from grace_plugin.vqa.backbones import backbone_for
    from grace_plugin.vqa.model import zero_shot_vqa_from_clip

    return zero_shot_vqa_from_clip(bundle, ["-"]) if backbone_for(bundle).uses_vocabulary else _OpenClipImage(bundle)


def analyse(model, encoder, reference: str, shards: dict, accuracy: dict, opts, device,
            batch_size: int = 128) -> tuple[dict, dict]:
    """The shift per modality and the modality importance of every set in ``shards`` (``name -> (ShardSet,
    group)``), related to each set's ``accuracy``; ``(analysis, per-sample scores per set)``. ``opts``
    (``context.ShiftOptions``): the Gaussians are fitted on the ID train split's first ``n_fit`` questions, each set's
    first ``n`` questions are scored. Every rank computes the whole analysis."""
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.errors import UsageError
    from grace_plugin.models.clip import load_clip
    from grace_plugin.vqa.model import QuestionEncoder

    if not reference:
        raise UsageError("--shift needs the pre-trained CLIP (--reference CLIP), which this model does not record")
    bundle = load_clip(reference)
    ref, ref_enc = _reference(bundle).to(device), QuestionEncoder(bundle, device)
    id_set = next(s for s, g in shards.values() if g == "id")
    try:
        train = open_shard_set(id_set.root, split="train")
    except GraceError as e:
        raise UsageError(f"--shift fits the ID Gaussians on the ID set's train split: {e}") from None
    fit = embeddings(model, ref, encoder, ref_enc, train.urls, batch_size, device, opts.n_fit)
    per_set = {n: embeddings(model, ref, encoder, ref_enc, s.urls, batch_size, device, opts.n)
               for n, (s, _) in shards.items()}
    scores = shift_scores(fit, per_set, opts.ridge)
    related = relate(scores, accuracy)
    mean_image = _mean_image(model, train.urls, opts.n_fit)
    importance = {n: importance_summary(_importance(model, encoder, s.urls, mean_image, opts.n, batch_size,
                                                    device)) for n, (s, _) in shards.items()}
    analysis = {"reference": str(reference), "n_fit": len(fit["question_id"]), "ridge": scores["ridge"],
                "shift": scores["sets"], **related, "modality_importance": importance,
                "definitions": "shift: mean Mahalanobis distance to ID train per concept (higher = farther); "
                               "modality importance: drop of the predicted answer's probability when the image is "
                               "the ID mean image / the question is empty, and the question's share"}
    samples = {n: {"question_id": per_set[n]["question_id"], **scores["samples"][n]} for n in per_set}
    return analysis, samples
