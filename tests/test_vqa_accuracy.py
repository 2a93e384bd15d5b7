"""The official VQA accuracy (grace_plugin/vqa/accuracy.py) against hand-made cases, the closed form and a literal
leave-one-out loop written here independently."""
import math

import pytest

from grace_plugin.vqa import accuracy as A


def loop_accuracy(prediction: str, answers: list[str]) -> float:
    """The evaluator's per-question loop, element by element (leave annotator i out, count matches, cap at 3)."""
    p = A.normalize_prediction(prediction)
    gt = [A.process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    accs = []
    for i in range(len(gt)):
        others = gt[:i] + gt[i + 1:]
        accs.append(min(1.0, sum(o == p for o in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("c,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_closed_form_of_ten(c, expected):
    answers = ["yes"] * c + ["no"] * (10 - c)
    assert A.accuracy_from_matches(c) == pytest.approx(expected)
    assert A.question_accuracy("yes", answers) == pytest.approx(expected)
    assert loop_accuracy("yes", answers) == pytest.approx(expected)


@pytest.mark.parametrize("n", [1, 3, 5, 9, 10])
def test_closed_form_matches_the_loop_for_any_count(n):
    for c in range(n + 1):
        answers = ["2"] * c + ["3"] * (n - c)
        assert A.accuracy_from_matches(c, n) == pytest.approx(loop_accuracy("2", answers))


@pytest.mark.parametrize("pred,norm", [
    ("Two", "2"), ("two dogs.", "2 dogs"), ("The Red one", "red 1"), ("a dog", "dog"), ("dont", "don't"),
    ("Yes!", "yes"), ("  yes\n", "yes"), ("red, white", "red white"), ("1,000", "1000"), ("3.5", "3.5"),
    ("t-shirt", "t shirt"), ("left - right", "left  right".replace("  ", " ")), ("it's", "it's"),
    ("Im", "im"),  # the table's "Im" key never matches a lower-cased word: the evaluator's behaviour
    ("somebody'd", "somebodyd"), ("none", "0"), ("e.g.", "eg"), ("mr. smith", "mr smith"), ("10:30", "10:30"),
])
def test_prediction_normalisation(pred, norm):
    assert A.normalize_prediction(pred) == norm


def test_period_quirks_are_the_evaluators():
    # the mistyped look-behind removes every period not followed by a digit (also after a digit)
    assert A.process_punctuation("2. 5.5") == "2 5.5"
    # re.UNICODE lands in re.sub's count: at most 32 periods are removed
    assert A.process_punctuation("." * 40) == "." * 8


def test_ground_truth_only_depunctuated_when_annotators_disagree():
    same = ["t-shirt"] * 10
    assert A.prepare_ground_truth(same) == same  # agreement: untouched
    mixed = ["t-shirt"] * 9 + ["shirt"]
    assert A.prepare_ground_truth(mixed)[0] == "t shirt"
    # so the prediction "t-shirt" (normalised to "t shirt") scores 0 on unanimous raw GT, 1 on the mixed one
    assert A.question_accuracy("t-shirt", same) == 0.0
    assert A.question_accuracy("t-shirt", mixed) == pytest.approx(1.0)
    # GT is never lower-cased or digit-mapped: "Two" annotations do not match a normalised prediction
    assert A.question_accuracy("two", ["Two"] * 10) == 0.0
    assert A.question_accuracy("two", ["2"] * 10) == 1.0


def test_hand_made_mixed_case():
    answers = ["2", "2", "two", "3", "2", "2.", "3", "3", "3", "4"]
    assert A.question_accuracy("Two.", answers) == pytest.approx(loop_accuracy("Two.", answers))
    # "2." is de-punctuated to "2" (annotators disagree): 5 matches -> 1.0
    assert A.question_accuracy("2", answers) == pytest.approx(1.0)
    assert A.question_accuracy("3", answers) == pytest.approx(1.0)
    assert A.question_accuracy("4", answers) == pytest.approx(0.3)


def test_answer_scores_are_the_accuracy_of_each_vocabulary_answer():
    vocab = {"2": 0, "3": 1, "4": 2, "yes": 3}
    answers = ["2", "2", "3", "3", "3", "3", "4", "5", "5", "5"]
    s = A.answer_scores(answers, vocab)
    assert set(s) == {0, 1, 2}
    for a, i in vocab.items():
        assert s.get(i, 0.0) == pytest.approx(A.question_accuracy(a, answers))


def test_summaries_and_group_means():
    s = A.summarise_scores([1.0, 0.3, 0.0, 1.0], ["yes/no", "number", "number", "yes/no"], ["a", "b", "b", "a"])
    assert s["accuracy"] == pytest.approx(57.5) and s["n"] == 4
    lo, hi = s["ci95"]
    assert lo < 57.5 < hi
    assert s["per_answer_type"]["yes/no"]["accuracy"] == pytest.approx(100.0)
    assert s["per_question_type"]["b"]["accuracy"] == pytest.approx(15.0)
    g = A.group_mean([{"accuracy": 40.0, "se": 3.0}, {"accuracy": 60.0, "se": 4.0}])
    assert g["accuracy"] == 50.0 and g["sets"] == 2
    assert g["ci95"][1] - 50.0 == pytest.approx(1.959963984540054 * math.sqrt(9 + 16) / 2, abs=1e-3)
    assert A.group_mean([])["accuracy"] is None
    # the one cell format of the report, the model card: two decimals, the interval beside, "-" when unmeasured
    assert A.accuracy_cell({"accuracy": 82.1666, "ci95": [79.3, 85.034]}) == "82.17 [79.30, 85.03]"
    assert A.accuracy_cell({"accuracy": 50.0, "ci95": None}) == "50.00"
    assert A.accuracy_cell(A.group_mean([])) == "-" and A.accuracy_cell(None) == "-"
