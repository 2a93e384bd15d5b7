"""The generative backbone as a VQA task model: every VQA recipe trains a CoCa on a batch of answer tokens (the
questions and teacher-forcing tokens bound), the attack output is the answer's log-likelihood, and a CoCa run goes
through ``grace train --task vqa`` / ``grace eval --task vqa`` (model, zero-shot, attacks) like a CLIP one."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from grace_plugin.recipes import create_recipe, get_recipe_class, list_recipes
from grace_plugin.vqa.generative import IGNORE, CocaTarget, CocaVQA, tiny_coca_config
from grace_plugin.vqa.model import QuestionContext, bound, rows

from test_recipes import _recipe_cfg
from test_vqa_recipes import one_step_checked

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "GRACE-Tiny-CoCa-task-test"
QUESTIONS = ["how many circles are there?", "what colour is the square?", "is there a red circle?",
             "how many squares are there?"]
GT = [["1"] * 10, ["red"] * 7 + ["blue"] * 3, ["yes"] * 10, ["2"] * 6 + ["1"] * 4]
VQA_RECIPES = [n for n in list_recipes() if "vqa" in get_recipe_class(n).tasks]


def _coca():
    import open_clip

    from grace_plugin.models.clip import register_open_clip_config

    register_open_clip_config(NAME, tiny_coca_config())
    torch.manual_seed(0)
    coca = open_clip.create_model(NAME, pretrained=None).eval()
    # open_clip initialises the decoder's output projection to zero (every logit a tie): give it weights
    torch.nn.init.normal_(coca.text_decoder.text_projection, std=0.1)
    return coca


@pytest.fixture(scope="module")
def coca_dir(tmp_path_factory):
    from grace_plugin.models.clip import ClipBundle, save_clip

    return save_clip(ClipBundle(NAME, tiny_coca_config(), _coca()), tmp_path_factory.mktemp("coca") / "coca")


@pytest.fixture(scope="module")
def _model_once(coca_dir):
    from grace_plugin.models.clip import load_clip
    from grace_plugin.vqa.generative import coca_vqa_from_clip

    return coca_vqa_from_clip(load_clip(coca_dir))


@pytest.fixture()
def coca_batch(_model_once):
    target = CocaTarget(_model_once.tokens)
    fields = [target({"json": {"question_id": i, "question": q, "answers": a}}) for i, (q, a) in
              enumerate(zip(QUESTIONS, GT))]
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(4, 3, 32, 32, generator=g), "label": torch.stack([f["label"] for f in fields]),
            "text": torch.stack([f["text"] for f in fields]),
            "positions": torch.stack([f["positions"] for f in fields]),
            "question": [f["question"] for f in fields],
            "record": [f["record"] for f in fields]}


def _bind(batch):
    return bound(QuestionContext(questions=list(batch["question"]), text=batch["text"], labels=batch["label"],
                                 positions=batch["positions"]))


def test_target_labels_the_training_answer_only(_model_once):
    model = _model_once
    f = CocaTarget(model.tokens)({"json": {"question_id": 1, "question": QUESTIONS[1], "answers": GT[1]}})
    text, labels, positions = model.lm_batch([QUESTIONS[1]], ["red"])  # the most frequent answer
    assert torch.equal(f["text"], text[0]) and torch.equal(f["label"], labels[0])
    assert torch.equal(f["positions"], positions[0])
    answer = model.tokens.ids("question: what colour is the square? answer: red")[len(model.prompt_ids(QUESTIONS[1])):]
    assert f["label"][f["label"] != IGNORE].tolist() == answer  # "red" and <eot>
    assert CocaTarget(model.tokens)({"json": b"{no"}) == "bad_record"
    long_q = "how many " + "very " * 30 + "circles?"  # does not fit the context: skipped, never truncated
    assert CocaTarget(model.tokens)({"json": {"question_id": 2, "question": long_q, "answers": ["1"]}}) == "bad_record"
    long_a = ["a very long answer of very many words"] * 10  # more tokens than the answer positions: skipped, never cut
    target = CocaTarget(model.tokens)
    assert target({"json": {"question_id": 3, "question": "what?", "answers": long_a}}) == "bad_record"


def test_an_answer_whose_text_tokenises_otherwise_is_attacked_as_generated(_model_once, coca_batch, monkeypatch):
    """Greedy decoding can write tokens whose decoded text tokenises back into more tokens than the answer positions
    (found in a test run: 6 tokens -> 10). The attack target and the importance teacher-force the generated tokens
    themselves, so such an answer is evaluated, not refused."""
    from grace_plugin.errors import GraceError

    model, x = _model_once, coca_batch["image"][:2]
    odd = [41971, 13401, 36211, 31262, 29013, 34168]  # no <eot> within max_new_tokens
    monkeypatch.setattr(model, "greedy_ids", lambda images, prompts, n=None: torch.cat(
        [prompts, torch.tensor([odd] * prompts.shape[0])], dim=1))
    qs = QUESTIONS[:2]
    text = model.answer(x, qs)[0]
    with pytest.raises(GraceError, match="more than the 8 answer positions"):
        model.lm_batch(qs[:1], [text])  # its words do not fit: why the tokens are kept
    with bound(QuestionContext(questions=qs)):
        clean, _, actx = model.attack_target(x)
    assert clean == [text, text] and actx.labels[0, :6].tolist() == odd and (actx.labels[:, 6:] == IGNORE).all()
    with torch.no_grad(), bound(actx):
        z = model(x)
    assert torch.isfinite(z).all()


def test_forward_is_the_answer_token_cross_entropy(_model_once, coca_batch):
    model, b = _model_once, coca_batch
    with torch.no_grad(), _bind(b):
        logits = model(b["image"])
    assert logits.shape == (4, 49408, model.tokens.answer_tokens)
    with torch.no_grad():
        expect = torch.stack([model.answer_loss(b["image"][i:i + 1], [q], [a[0] if i != 3 else "2"])
                              for i, (q, a) in enumerate(zip(QUESTIONS, GT))])
        ours = F.cross_entropy(logits, b["label"], reduction="none").sum(1) / (b["label"] != IGNORE).sum(1)
    assert torch.allclose(ours, expect, atol=1e-5)
    # rows(idx) narrows questions, tokens and labels together
    with torch.no_grad(), _bind(b), rows(torch.tensor([2, 0])):
        sub = model(b["image"][[2, 0]])
    assert torch.allclose(sub, logits[[2, 0]], atol=1e-5)


def test_attack_output_is_the_answer_log_likelihood(_model_once, coca_batch):
    model, x = _model_once, coca_batch["image"]
    with bound(QuestionContext(questions=QUESTIONS)):
        clean, labels, actx = model.attack_target(x)
        assert clean == model.predict_answers(x) and torch.equal(labels, torch.zeros(4, dtype=torch.long))
    with torch.no_grad(), bound(actx):
        z = model(x)
    assert z.shape == (4, 2)
    with torch.no_grad():  # independent: the generated answers' summed token log-probabilities, teacher-forced
        text, lab, pos = model.lm_batch(QUESTIONS, model.answer_ids(x, QUESTIONS))
        logp = torch.log_softmax(model.coca(model.normalize(x), text[:, :-1], output_labels=False)["logits"], -1)
        logp = logp[torch.arange(4)[:, None], pos]
        keep = lab != IGNORE
        expect = (logp.gather(-1, lab.clamp_min(0)[..., None])[..., 0] * keep).sum(1)
    assert torch.allclose(z[:, 0], expect, atol=1e-4)
    assert torch.allclose(F.cross_entropy(z, labels, reduction="none"), -expect, atol=1e-4)  # CE = the answer's NLL
    assert torch.allclose(z.exp().sum(1), torch.ones(4), atol=1e-4)


def test_pgd_raises_the_answer_loss(_model_once, coca_batch):
    from grace_plugin.recipes.adversarial import pgd_attack

    model, b = _model_once, coca_batch
    with _bind(b):
        x_adv = pgd_attack(model, b["image"], b["label"], 8 / 255, 2 / 255, 5)
        with torch.no_grad():
            clean, adv = F.cross_entropy(model(b["image"]), b["label"]), F.cross_entropy(model(x_adv), b["label"])
    assert (x_adv - b["image"]).abs().max() <= 8 / 255 + 1e-6 and adv > clean


@pytest.mark.parametrize("name", VQA_RECIPES)
def test_one_vqa_step_on_coca(name, _model_once, coca_batch):
    torch.manual_seed(0)
    model = copy.deepcopy(_model_once)
    cfg = _recipe_cfg(name)
    if cfg.lora:
        cfg.lora_targets, cfg.lora_modules_to_save = list(model.lora_targets_hint), []
    rec = create_recipe(name, model, cfg)
    trainable = rec.trainable_parameters()
    assert trainable
    head = {id(p) for p in model.head.parameters()}
    assert (head <= {id(p) for p in trainable}) == bool(cfg.train_head), "the output layer trains iff train_head"
    one_step_checked(name, rec, model, coca_batch, _bind, head)
    exported = rec.export_model()
    assert not any("lora_" in k for k in exported.state_dict())
    with torch.no_grad(), _bind(coca_batch):
        assert exported(coca_batch["image"]).shape[:2] == (4, 49408)


def test_lora_targets_of_another_architecture_are_refused_naming_this_ones(_model_once):
    from grace_plugin.config import ConfigError

    cfg = _recipe_cfg("ft")
    cfg.lora, cfg.lora_targets = True, ["blocks.*.attn.qkv"]
    with pytest.raises(ConfigError, match=r"recipe.lora_targets: .*this model's: \['\*.mlp.c_fc'"):
        create_recipe("ft", copy.deepcopy(_model_once), cfg)


def test_train_eval_and_zero_shot_through_the_cli(coca_dir, tmp_path, monkeypatch):
    """A CoCa run: trained by `grace train --task vqa`, reloaded from its folder to the same weights, evaluated with
    its answers decoded and two attacks; the pre-trained CoCa evaluated zero-shot; the predictions file scored
    elsewhere gives the same number; the shift suite's concepts and importance on a CoCa."""
    from grace_app.cli import main
    from grace_plugin.checkpoint import load_run

    data = _toy_set(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--task", "vqa", "--recipe", "ft", "--init", str(coca_dir), "--data", str(data), "--out",
                 str(run), "--steps", "3", "--no-progress", "--set", "train.batch_size=8",
                 "--set", "train.val_every=0"]) == 0
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["architecture"]["head"]["kind"] == "coca" and meta["classnames"] == []
    model, _ = load_run(run)
    assert isinstance(model, CocaVQA) and meta["architecture"]["tower"]["arch"] == "open_clip"
    ev = tmp_path / "ev"
    assert main(["eval", "--task", "vqa", "--model", str(run), "--data", f"vqav2={data}", "--attack", "apgd-ce",
                 "--suite", "adv:pgd", "--n-adv", "4", "--out", str(ev), "--no-progress"]) == 0
    rep = json.loads((ev / "report.json").read_text())
    assert rep["sets"]["vqav2"]["n"] == 8 and rep["adversarial"]["n"] == 4
    assert set(rep["suites"]) >= {"adv:apgd-ce", "adv:pgd"}
    preds = json.loads((ev / "predictions" / "vqav2.json").read_text())
    assert len(preds) == 8 and all(isinstance(p["answer"], str) for p in preds)
    ev2 = tmp_path / "ev2"
    assert main(["eval", "--task", "vqa", "--data", f"vqav2={data}", "--predictions",
                 str(ev / "predictions" / "vqav2.json"), "--out", str(ev2)]) == 0
    assert json.loads((ev2 / "report.json").read_text())["sets"]["vqav2"]["accuracy"] == rep["sets"]["vqav2"][
        "accuracy"]
    zs = tmp_path / "zs"
    assert main(["eval", "--task", "vqa", "--model", str(coca_dir), "--data", f"vqav2={data}", "--out", str(zs),
                 "--no-progress"]) == 0
    assert "generative, greedy" in json.loads((zs / "report.json").read_text())["model"]
    sh = tmp_path / "sh"  # the shift suite on a CoCa: its concepts and both importance measures
    decoded = []  # the shift suite decodes each scored question once more (the importance), not for its concepts
    answer = CocaVQA.answer_ids
    monkeypatch.setattr(CocaVQA, "answer_ids", lambda self, x, qs, *a, **k: decoded.extend(qs) or answer(self, x, qs,
                                                                                                         *a, **k))
    assert main(["eval", "--task", "vqa", "--model", str(run), "--data", f"vqav2={data}", "--ood", f"ok-vqa={data}",
                 "--shift", "--out", str(sh), "--no-progress"]) == 0
    an = json.loads((sh / "report.json").read_text())["analysis"]
    assert set(an["shift"]["vqav2"]) == {"uni_image", "uni_question", "image", "joint", "question"}
    assert set(an["modality_importance"]["ok-vqa"]) == {"image", "question", "question_share", "self_over_cross"}
    assert len(decoded) == 32  # vqav2's 8 questions and ok-vqa's 8, for the accuracy and for the importance
    assert "self/cross" in (sh / "report.md").read_text()


def _toy_set(root):
    from test_vqa_train_eval import toy_vqa_set

    return toy_vqa_set(root, (("train", 8), ("test", 4)))


def test_lora_weight_reads_as_the_merged_weight_and_attention_projections_are_refused(_model_once):
    from grace_plugin.models.lora import inject_lora, lora_modules

    model = copy.deepcopy(_model_once)
    inject_lora(model.visual, ["text.transformer.resblocks.0.mlp.c_fc"], rank=2, alpha=4.0)
    layer = lora_modules(model.visual)["text.transformer.resblocks.0.mlp.c_fc"]
    torch.nn.init.normal_(layer.lora_B)
    assert torch.allclose(layer.weight, layer.merged_linear().weight) and layer.bias is layer.base.bias
    with pytest.raises(ValueError, match="inside an nn.MultiheadAttention"):
        inject_lora(copy.deepcopy(_model_once).visual, ["*.attn.out_proj"], rank=2, alpha=4.0)


def test_pretraining_caption_loss_is_open_clips_on_the_caption_tokens(_model_once):
    """The tiny CoCa's pretraining projects only the caption's positions onto the vocabulary; the loss is open_clip's
    CoCaLoss caption term (cross-entropy over the non-pad labels) all the same."""
    import open_clip

    from grace_app.testbed.tiny_coca import caption_loss

    coca = _model_once.coca
    text = _model_once.tokenizer(["a red circle", "question: how many squares are there? answer: 2", "a 4"],
                                 context_length=coca.context_length)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = caption_loss(coca, x, text)
        out = coca(x, text)
        ref = open_clip.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"],
            output_dict=True)["caption_loss"]
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_coca_quickstart_smoke(tmp_path, capsys):
    """`grace quickstart --task vqa --backbone coca` at smoke size: the world's tiny CoCa pretrained, a GRACE row
    trained (LoRA on the MLPs, its AWP on the image tower's adapters) and evaluated in words, written under OUT/coca,
    a page of its own."""
    from grace_app.cli import main
    from grace_app.studies.publish import add_source, page_markdown

    out = tmp_path / "qs"
    assert main(["quickstart", "--task", "vqa", "--backbone", "coca", "--size", "small", "--steps", "2",
                 "--pretrain-steps", "3", "--n-adv", "2", "--recipes", "GRACE", "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "coca" / "summary.json").read_text())
    assert summary["backbone"] == "coca" and [r["method"] for r in summary["rows"]] == ["GRACE"]
    assert all(r["id"] is not None and r["adv"] is not None and len(r["sets"]) == 10 for r in summary["rows"])
    meta = json.loads((out / "coca" / "runs" / "grace" / "checkpoint.json").read_text())
    assert meta["architecture"]["head"]["kind"] == "coca" and meta["config"]["recipe"]["lora_targets"] == [
        "*.mlp.c_fc", "*.mlp.c_proj"]
    assert (out / "data" / "world.json").is_file() and not (out / "summary.json").exists()
    assert add_source(out / "coca", tmp_path / "pages").name == "quickstart-vqa-coca.json"
    assert page_markdown(summary).startswith("# Quick start, VQA with the generative backbone (CoCa)\n")
    assert main(["quickstart", "--backbone", "coca", "--out", str(tmp_path / "c")]) == 2
    assert "--backbone: a flag of `grace quickstart --task vqa`" in capsys.readouterr().err


def test_coca_prompt_states_ignore_padding_and_answer(_model_once):
    """The joint/question concepts read the decoder at the prompt's positions: the same with the batch padded to a
    longer prompt as alone, whatever the image tokens; and they move with the image (the cross-attention)."""
    from eval_suites.vqa_analysis import _prompt_states

    model = _model_once
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, embs = model.coca._encode_image(model.normalize(x))
        qs = ["how many?", "what colour is the big square on the left of the picture?"]
        both, zero = _prompt_states(model, qs, embs, torch.zeros_like(embs))
        alone = torch.cat([_prompt_states(model, [q], embs[i:i + 1])[0] for i, q in enumerate(qs)])
    assert torch.allclose(both, alone, atol=1e-5) and not torch.allclose(both, zero, atol=1e-3)


def test_coca_importance_is_the_answers_probability_drop(_model_once):
    from eval_suites.vqa_analysis import modality_importance

    model = _model_once
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    qs = QUESTIONS[:3]
    mean = x.mean(0, keepdim=True)
    got = modality_importance(model, None, x, qs, mean)
    with torch.no_grad():  # independent: exp of minus the answer's summed token NLL, from the full logits
        answers = model.answer(x, qs)

        def p(images, questions):
            n = torch.tensor([float((model.lm_batch([q], [a])[1] != IGNORE).sum()) for q, a in zip(questions, answers)])
            return torch.stack([torch.exp(-model.answer_loss(images[i:i + 1], [q], [a]) * n[i])
                                for i, (q, a) in enumerate(zip(questions, answers))])

        base = p(x, qs)
        di, dq = base - p(mean.expand_as(x), qs), base - p(x, [""] * 3)
    assert torch.allclose(torch.tensor(got["image"]).float(), di, atol=1e-5)
    assert torch.allclose(torch.tensor(got["question"]).float(), dq, atol=1e-5)
    assert got["self_over_cross"].shape == (3,) and (got["self_over_cross"] > 0).all()


def test_classification_recast_as_vqa_answered_in_words(coca_dir, tiny_world, tiny_clip_dir, tmp_path):
    """DiGraP §4.2 on the generative backbone: the classification world's images asked "what is in the image?",
    a CoCa fine-tuned on the ID train split's class names, its open answers scored by exact match and by ClipMatch
    (a CLIP text tower: --reference), beside the VQA accuracy of the same answers."""
    from grace_app.cli import main

    recast = tmp_path / "id-as-vqa"
    for split in ("train", "test"):
        assert main(["shards", "convert", "--format", "classification", "--source-set", str(tiny_world / "id"),
                     "--split", split, "--out", str(recast)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--task", "vqa", "--recipe", "ft", "--init", str(coca_dir), "--data", str(recast),
                 "--out", str(run), "--steps", "2", "--no-progress", "--set", "train.batch_size=8",
                 "--set", "train.val_every=0"]) == 0
    ev = tmp_path / "ev"
    assert main(["eval", "--task", "vqa", "--model", str(run), "--data", f"cls={recast}", "--reference",
                 str(tiny_clip_dir), "--out", str(ev), "--no-progress"]) == 0
    s = json.loads((ev / "report.json").read_text())["sets"]["cls"]
    c = s["classification"]
    assert c["n"] == s["n"] > 0 and c["exact_match"] == pytest.approx(s["accuracy"])
    assert 0 <= c["clip_match_1"] <= c["clip_match_5"] <= 100
    assert "ClipMatch@1" in (ev / "report.md").read_text()


def test_coca_tuning_smoke(tmp_path, capsys):
    """`grace study tune --task vqa --backbones coca`: the protocol's trials on the tiny CoCa (coca.yaml layered),
    its own page and its own tuned file (never tuned-vqa.yaml, the CLIP's)."""
    from grace_app.cli import main
    from grace_app.studies.publish import add_source

    out, tuned = tmp_path / "tune", tmp_path / "tuned-vqa-coca.yaml"
    assert main(["study", "tune", "--task", "vqa", "--backbones", "coca", "--methods", "ft", "--size", "small",
                 "--steps", "2", "--trials", "2", "--n-val-adv", "2", "--rescore-seeds", "1", "--pretrain-steps", "3",
                 "--out", str(out), "--write", str(tuned), "--no-progress"]) == 0
    doc = json.loads((out / "tuning.json").read_text())
    assert doc["backbone"] == "coca" and len(doc["methods"]["ft"]["trials"]) == 2
    assert (out / "coca" / "pretrained" / "open_clip_config.json").is_file()
    assert "for the coca backbone" in tuned.read_text() and "ft:" in tuned.read_text()
    assert add_source(out, tmp_path / "data").name == "tuning-vqa-coca-small-seed0.json"
    capsys.readouterr()
    assert main(["study", "tune", "--backbones", "coca", "--methods", "ft", "--out", str(tmp_path / "t2"),
                 "--no-write"]) == 2
    assert "coca: --task vqa" in capsys.readouterr().err


def test_tiny_coca_pretraining_is_deterministic_in_one_process(tmp_path):
    """open_clip leaves the CoCa decoder's output projection uninitialised (torch.empty): the pretraining sets it,
    so a second pretraining in the same process, after the allocator has handed out other memory, is identical."""
    import hashlib

    from grace_app.testbed.tiny_coca import CocaPretrainConfig, pretrain_tiny_coca
    from grace_app.testbed.vqa_world import VqaWorldSpec, write_vqa_world

    world = tmp_path / "w"
    write_vqa_world(world, seed=0, spec=VqaWorldSpec(train=8, val=2, test=2, ood=2, pairs=40, shard_size=100))
    cfg = CocaPretrainConfig(steps=2, batch_size=8, width=64, layers=2)
    digests = []
    for i in range(2):
        junk = torch.full((3000, 3000), 7.0)  # leave non-zero memory behind in the allocator
        del junk
        d = pretrain_tiny_coca(world / "pairs", tmp_path / f"c{i}", cfg, progress=False)
        digests.append(hashlib.sha256((d / "open_clip_model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
