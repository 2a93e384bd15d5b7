"""Registry-driven: every recipe that declares the VQA task trains a CLIP VQA model on a VQA batch (the questions
bound around the step, the soft answer target as the label); the binding itself; attacks through the VQA loss."""
import copy

import pytest
import torch
import torch.nn.functional as F

from grace_plugin.recipes import StepContext, create_recipe, get_recipe_class, list_recipes
from grace_plugin.recipes.adversarial import pgd_attack
from grace_plugin.tasks import get_task, list_tasks
from grace_plugin.vqa.data import VqaTarget
from grace_plugin.vqa.model import (QuestionEncoder, UnboundQuestions, bound, rows, vqa_model_from_clip,
                                    zero_shot_vqa_from_clip)

from test_recipes import _recipe_cfg

ANSWERS = ["0", "1", "2", "red", "blue", "yes", "no"]
QUESTIONS = ["how many circles are there?", "what colour is the square?", "is there a red circle?",
             "how many squares are there?", "what colour is the circle?", "is there a blue square?",
             "how many triangles are there?", "what colour is the triangle?"]
GT = [["1"] * 10, ["red"] * 7 + ["blue"] * 3, ["yes"] * 10, ["2"] * 6 + ["1"] * 4, ["blue"] * 10,
      ["no"] * 9 + ["yes"], ["0"] * 10, ["red"] * 4 + ["green"] * 6]
VQA_RECIPES = [n for n in list_recipes() if "vqa" in get_recipe_class(n).tasks]


@pytest.fixture()
def vqa_batch(tiny_batch):
    target = VqaTarget(ANSWERS, train=True)
    fields = [target({"json": {"question_id": i, "question": q, "answers": a}}) for i, (q, a) in
              enumerate(zip(QUESTIONS, GT))]
    return {"image": tiny_batch["image"][:8], "label": torch.stack([f["label"] for f in fields]),
            "question": [f["question"] for f in fields], "record": [f["record"] for f in fields]}


@pytest.fixture(scope="module")
def _vqa_once(tiny_bundle):
    torch.manual_seed(0)
    return vqa_model_from_clip(tiny_bundle, ANSWERS), QuestionEncoder(tiny_bundle)


def test_tasks_are_a_registry():
    assert {"classification", "vqa"} <= set(list_tasks())
    assert VQA_RECIPES and "flyp" not in VQA_RECIPES  # FLYP's loss is over class prompts


def test_soft_target_is_the_normalised_vqa_accuracy(vqa_batch):
    lab = vqa_batch["label"]
    assert torch.allclose(lab.sum(1), torch.ones(8))
    # question 1: red 7x (accuracy 1), blue 3x (0.9) -> 1/1.9 and 0.9/1.9
    assert lab[1, ANSWERS.index("red")] == pytest.approx(1 / 1.9)
    assert lab[1, ANSWERS.index("blue")] == pytest.approx(0.9 / 1.9)
    # no annotator answer in the vocabulary: skipped in training, kept (all zeros) in evaluation
    rec = {"json": {"question_id": 9, "question": "what shape?", "answers": ["hexagon"] * 10}}
    assert VqaTarget(ANSWERS, train=True)(rec) == "answer_not_in_vocabulary"
    assert float(VqaTarget(ANSWERS)(rec)["label"].sum()) == 0.0
    assert VqaTarget(ANSWERS)({"json": b"{not json"}) == "bad_record"


def one_step_checked(name, rec, model, batch, bind, head_ids: set) -> None:
    """One training step of recipe ``rec`` (named ``name``) on ``batch`` bound by ``bind``: a finite loss, a gradient
    on every trainable weight (lp_ft's first steps probe: there only the head, ``head_ids``, learns), none on a frozen
    weight, and no frozen weight moved by the step's after_step."""
    trainable = {id(p) for p in rec.trainable_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ctx = StepContext(device=torch.device("cpu"), step=0, total_steps=10)
    with bind(batch):
        out = rec.training_step(batch, ctx)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        rec.after_step(batch, ctx)
    for n, p in model.named_parameters():
        if id(p) in trainable and p.grad is None:
            assert name == "lp_ft" and id(p) not in head_ids, f"{name}: trainable {n} got no gradient"
        if id(p) not in trainable:
            assert p.grad is None, f"{name}: frozen {n} got a gradient"
            assert torch.equal(p, frozen_before[n]), f"{name}: frozen {n} changed"


@pytest.mark.parametrize("name", VQA_RECIPES)
def test_one_vqa_step(name, _vqa_once, vqa_batch):
    torch.manual_seed(0)
    model, encoder = copy.deepcopy(_vqa_once[0]), _vqa_once[1]
    rec = create_recipe(name, model, _recipe_cfg(name))
    head_ids = {id(p) for p in model.head.parameters()}
    trainable = rec.trainable_parameters()
    assert head_ids <= {id(p) for p in trainable}, "the new answer head trains in every recipe"
    bind = get_task("vqa").binder(model, encoder)
    one_step_checked(name, rec, model, vqa_batch, bind, head_ids)
    exported = rec.export_model()
    assert not any("lora_" in k for k in exported.state_dict())
    with bind(vqa_batch):
        assert exported(vqa_batch["image"]).shape == (8, len(ANSWERS))


def test_unbound_model_says_how_to_bind(_vqa_once, vqa_batch):
    model, encoder = _vqa_once
    with pytest.raises(UnboundQuestions, match="bound"):
        model(vqa_batch["image"])
    with bound(encoder.context(model, vqa_batch["question"])):
        with pytest.raises(UnboundQuestions, match="rows"):
            model(vqa_batch["image"][:3])
        idx = torch.tensor([4, 1])
        with rows(idx):
            sub = model(vqa_batch["image"][idx])
        full = model(vqa_batch["image"])
    assert torch.allclose(sub, full[idx], atol=1e-5)


def test_the_question_changes_the_answer(_vqa_once, vqa_batch):
    """Same image, different questions: different logits (the question reaches the head)."""
    model, encoder = _vqa_once
    x = vqa_batch["image"][:1].repeat(2, 1, 1, 1)
    with torch.no_grad(), bound(encoder.context(model, QUESTIONS[:2])):
        out = model(x)
    assert not torch.allclose(out[0], out[1])


def test_attack_raises_the_vqa_loss(_vqa_once, vqa_batch):
    model, encoder = _vqa_once
    x, y = vqa_batch["image"], vqa_batch["label"]
    with bound(encoder.context(model, vqa_batch["question"])):
        x_adv = pgd_attack(model, x, y, 8 / 255, 2 / 255, 5)
        with torch.no_grad():
            clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert adv > clean


def test_zero_shot_scores_answer_prompts(tiny_bundle, vqa_batch):
    zs = zero_shot_vqa_from_clip(tiny_bundle, ANSWERS)
    enc = QuestionEncoder(tiny_bundle)
    ctx = enc.context(zs, vqa_batch["question"][:2])
    assert ctx.prompts.shape[:2] == (2, len(ANSWERS)) and ctx.embedding is None
    with torch.no_grad(), bound(ctx):
        logits = zs(vqa_batch["image"][:2])
    # independent computation: CLIP's image-text score of each prompt
    with torch.no_grad():
        img = tiny_bundle.clip.encode_image(zs.normalize(vqa_batch["image"][:2]), normalize=True)
        tok = tiny_bundle.tokenizer()([f"question: {vqa_batch['question'][0]} answer: {a}" for a in ANSWERS])
        txt = tiny_bundle.clip.encode_text(tok, normalize=True)
        ref = tiny_bundle.clip.logit_scale.exp() * img[0] @ txt.t()
    assert torch.allclose(logits[0], ref, atol=1e-4)
    assert not list(zs.parameters()) or all(not n.startswith("head") for n, _ in zs.named_parameters())
