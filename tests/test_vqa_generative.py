"""The generative VQA backbone (open_clip CoCa): prompt tokens carry no loss, the greedy loop is the arg-max of the
teacher-forced logits and matches open_clip's own sampler at top_k=1, pixels in [0, 1], loading by name from a file."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from grace_plugin.vqa.generative import EOT, IGNORE, QUESTION_PROMPT, CocaVQA, tiny_coca_config, training_answer

NAME = "GRACE-Tiny-CoCa-test"
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(scope="module")
def vqa():
    import open_clip

    from grace_plugin.models.clip import register_open_clip_config

    register_open_clip_config(NAME, tiny_coca_config())
    torch.manual_seed(0)
    coca = open_clip.create_model(NAME, pretrained=None).eval()
    # open_clip initialises the decoder's output projection to zero (every logit 0, every arg-max a tie): give it
    # weights, so that greedy decoding has one answer to agree on
    torch.nn.init.normal_(coca.text_decoder.text_projection, std=coca.text_decoder.text_projection.shape[0] ** -0.5)
    return CocaVQA(coca, MEAN, STD, open_clip.get_tokenizer(NAME), max_new_tokens=5)


def _images(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_training_answer_is_the_most_frequent_first_on_ties():
    assert training_answer(["2", "two", "2", "3"]) == "2"
    assert training_answer(["red", "blue", "blue", "red"]) == "red"  # a tie: the first given


def test_only_the_answer_tokens_and_eot_carry_loss(vqa):
    qs, ans = ["how many circles?", "what colour is the square in the top left corner?"], ["2", "dark red"]
    text, labels, positions = vqa.lm_batch(qs, ans)
    for i, (q, a) in enumerate(zip(qs, ans)):
        answer_ids = vqa._ids(QUESTION_PROMPT.format(q=q) + f" {a}")[len(vqa.prompt_ids(q)):]
        keep = labels[i] != IGNORE
        assert answer_ids[-1] == EOT and labels[i][keep].tolist() == answer_ids
        assert text[i, positions[i][keep] + 1].tolist() == answer_ids  # each label is the next token of the text
    # the loss is the mean cross-entropy over exactly those positions (an independent masked computation over the
    # whole context: every position whose next token is an answer token)
    x = _images(2)
    logits = vqa.coca(vqa.normalize(x), text[:, :-1], output_labels=False)["logits"]
    full = torch.full(text[:, 1:].shape, -100)
    for i, (q, a) in enumerate(zip(qs, ans)):
        p, n = len(vqa.prompt_ids(q)), len(vqa._ids(QUESTION_PROMPT.format(q=q) + f" {a}"))
        full[i, p - 1:n - 1] = text[i, p:n]
    mask = full != -100
    expect = F.cross_entropy(logits[mask], full[mask])
    with torch.no_grad():
        assert float(vqa.answer_loss(x, qs, ans)) == pytest.approx(float(expect), rel=1e-5)


def test_greedy_loop_is_the_arg_max_of_teacher_forcing(vqa):
    x = _images(3, seed=1)
    prompt = torch.tensor([vqa.prompt_ids("how many circles?")] * 3)
    out = vqa.greedy_ids(x, prompt)
    assert out.shape[1] > prompt.shape[1] and torch.equal(out[:, :prompt.shape[1]], prompt)
    logits = vqa.coca(vqa.normalize(x), out, output_labels=False)["logits"]
    for i in range(3):
        row = out[i].tolist()
        for t in range(prompt.shape[1], len(row)):
            if row[t - 1] == EOT or row[t] == 0:
                break
            assert row[t] == int(logits[i, t - 1].argmax())


def test_batched_answers_equal_one_at_a_time_across_prompt_lengths(vqa):
    x = _images(3, seed=2)
    qs = ["how many circles?", "what colour is the big square on the left?", "how many circles?"]
    together = vqa.answer(x, qs)
    alone = [vqa.answer(x[i:i + 1], [q])[0] for i, q in enumerate(qs)]
    assert together == alone and all(isinstance(a, str) for a in together)


def test_pixels_in_unit_range_are_normalised_inside(vqa):
    x = _images(2, seed=3)
    text = vqa.lm_batch(["how many?"] * 2, ["2"] * 2)[0]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    a = vqa.coca(vqa.normalize(x), text, output_labels=False)["logits"]
    b = vqa.coca((x - mean) / std, text, output_labels=False)["logits"]
    assert torch.allclose(a, b)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="open_clip's CoCa.generate needs transformers")
def test_greedy_loop_matches_open_clip_generate_top_k_1(vqa):
    x = _images(2, seed=4)
    prompt = torch.tensor([vqa.prompt_ids("how many circles?")] * 2)
    ours = vqa.greedy_ids(x, prompt, max_new_tokens=4)
    # generate forces <eot> at the last of seq_len positions: give it one more, compare the free tokens
    theirs = vqa.coca.generate(vqa.normalize(x), text=prompt, generation_type="top_k", top_k=1,
                               seq_len=prompt.shape[1] + 5, min_seq_len=prompt.shape[1] + 1)
    assert ours.shape[1] == prompt.shape[1] + 4 and torch.equal(ours, theirs[:, :ours.shape[1]])


def test_a_coca_loads_by_name_from_a_local_file(vqa, tmp_path):
    """`NAME:FILE` goes through the same loader as a CLIP (vetted safetensors, open_clip's create_model): the path
    a real coca_ViT-B-32 takes with its downloaded weights, here on a tiny CoCa's file."""
    from safetensors.torch import save_file

    from grace_plugin.models.clip import load_clip

    f = tmp_path / "coca.safetensors"
    save_file({k: v.contiguous() for k, v in vqa.coca.state_dict().items()}, str(f))
    bundle = load_clip(f"{NAME}:{f}")
    assert type(bundle.clip).__name__ == "CoCa"
    assert all(torch.equal(v, bundle.clip.state_dict()[k]) for k, v in vqa.coca.state_dict().items())


def test_frames_attention_ratios_on_a_hand_built_map():
    """Rows 0-1 image tokens, 2-3 question text, 4 the answer (in neither): each ratio is text mass over image mass."""
    from eval_suites.attention_ratio import attention_ratios

    a = torch.tensor([[0.6, 0.2, 0.1, 0.1, 0.0],
                      [0.3, 0.3, 0.4, 0.0, 0.0],
                      [0.1, 0.1, 0.4, 0.4, 0.0],
                      [0.2, 0.3, 0.25, 0.25, 0.0],
                      [0.1, 0.1, 0.1, 0.1, 0.6]])
    image = torch.tensor([True, True, False, False, False])
    text = torch.tensor([False, False, True, True, False])
    img_ratio, txt_ratio = attention_ratios(a, image, text)
    assert img_ratio == pytest.approx(((0.2 / 0.8) + (0.4 / 0.6)) / 2)
    assert txt_ratio == pytest.approx(((0.8 / 0.2) + (0.5 / 0.5)) / 2)


def test_coca_reliance_ratio_reads_the_last_layers_two_attentions(vqa):
    """The CoCa counterpart: ||self-attention out|| / ||cross-attention out|| over the prompt's positions, from
    hooks on the decoder's last layer; checked against the same blocks run by hand on the hooked inputs."""
    from eval_suites.attention_ratio import residual_ratio

    x, qs, ans = _images(2, seed=5), ["how many circles?", "what colour is the square?"], ["2", "red"]
    s_out, c_out, prompt = vqa.attention_outputs(x, qs, ans)
    assert s_out.shape == c_out.shape and s_out.shape[:2] == prompt.shape
    assert prompt.sum(-1).tolist() == [len(vqa.prompt_ids(q)) for q in qs]
    ratio = residual_ratio(s_out, c_out, prompt)
    by_hand = [float((s_out[i].norm(dim=-1) / c_out[i].norm(dim=-1))[prompt[i]].mean()) for i in range(2)]
    assert ratio.tolist() == pytest.approx(by_hand) and all(r > 0 for r in by_hand)
    # causal: at the prompt's positions the outputs do not depend on the answer that follows; they do on the image
    s2, c2, _ = vqa.attention_outputs(x, qs, ["7", "green"])
    assert torch.allclose(s2[prompt], s_out[prompt], atol=1e-6) and torch.allclose(c2[prompt], c_out[prompt], atol=1e-6)
    s3, c3, _ = vqa.attention_outputs(_images(2, seed=6), qs, ans)
    assert not torch.allclose(c3[prompt], c_out[prompt])


def test_a_question_too_long_for_the_context_is_refused_not_truncated(vqa):
    """A prompt + answer beyond the context would lose its answer tokens to truncation (no loss, or a cut label):
    refused in one line naming the question, for training and for answering."""
    from grace_plugin.errors import GraceError

    long_q = "how many " + "very " * 30 + "red circles?"
    with pytest.raises(GraceError, match=r"question 'how many very .*more than the model's context of 24"):
        vqa.lm_batch([long_q], ["2"])
    with pytest.raises(GraceError, match=r"room for one answer token"):
        vqa.answer(_images(1), [long_q])
    near = "how many red circles are there in the top left corner of it?"  # fits alone, not with a long answer
    vqa.lm_batch([near], ["2"])
    with pytest.raises(GraceError, match=r"prompt \+ answer 'a very long answer"):
        vqa.lm_batch([near], ["a very long answer that does not fit"])
