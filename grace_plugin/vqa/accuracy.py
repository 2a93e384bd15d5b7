"""The official VQA accuracy, exactly as the VQA evaluator computes it.

Source: github.com/GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (the evaluator behind
https://visualqa.org/evaluation.html, reused verbatim by LAVIS and FRAMES-VQA, arXiv 2505.21755 §4):

* the prediction is normalised: newlines/tabs to spaces, stripped, punctuation processed, then lower-cased with
  number words mapped to digits, articles dropped and contractions restored (``normalize_prediction``);
* the ground truth is *only* de-punctuated, and only when the annotators disagree (``prepare_ground_truth``); the
  sets store their answers pre-normalised ("2", "yes", no articles);
* a question scores ``mean over i of min(1, #{j != i : gt_j == p} / 3)``: the ten leave-one-out subsets of the
  annotators (``question_accuracy``); with ``c`` matches among ``n`` answers that is
  ``(c·min(1, (c−1)/3) + (n−c)·min(1, c/3)) / n`` (0, .3, .6, .9, 1 for c = 0..4 of 10).

Two inherited quirks are kept, because the numbers must equal the evaluator's: the period pattern
``(?!<=\\d)(\\.)(?!\\d)`` is a mistyped look-behind (it removes every period not followed by a digit), and
``re.UNICODE`` is passed where ``re.sub`` takes its ``count`` (so at most 32 periods go). Contraction keys with
capitals ("Im") can never match the lower-cased words; that too is the evaluator's behaviour.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

__all__ = ["normalize_prediction", "process_punctuation", "process_digit_article", "prepare_ground_truth",
           "question_accuracy", "accuracy_from_matches", "answer_scores", "summarise_scores", "group_mean",
           "accuracy_cell"]

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_Z95 = 1.959963984540054  # the normal 97.5% quantile
# the evaluator's contraction table (key -> replacement), one pair per line; a data table of the evaluator, needed
# as is for equal numbers (odd entries such as somebody'd -> somebodyd included)
_CONTRACTIONS = dict(line.split() for line in """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've
I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am
mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at
shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd
somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've
they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've
we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll
whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll
youre you're|youve you've""".replace("\n", "|").strip("|").split("|"))


def process_punctuation(text: str) -> str:
    """The evaluator's ``processPunctuation``: each mark is deleted when it touches a space (or the text has a
    digit-comma-digit), otherwise replaced by a space; then periods not followed by a digit go (at most 32)."""
    out = text
    comma_number = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: re.UNICODE (32) lands in ``count``, as in the evaluator


def process_digit_article(text: str) -> str:
    """The evaluator's ``processDigitArticle``: lower-case, number words to digits, articles dropped, contractions
    restored, single spaces."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_prediction(answer: str) -> str:
    """A predicted answer as the evaluator compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def prepare_ground_truth(answers: Sequence[str]) -> list[str]:
    """The annotators' answers as the evaluator compares them: de-punctuated only if they disagree."""
    answers = list(answers)
    return [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else answers


def accuracy_from_matches(c: int, n: int = 10) -> float:
    """The leave-one-out accuracy of a prediction that ``c`` of ``n`` annotators gave (closed form)."""
    if n <= 0:
        raise ValueError("a question needs at least one annotator answer")
    return (c * min(1.0, (c - 1) / 3) + (n - c) * min(1.0, c / 3)) / n


def question_accuracy(prediction: str, answers: Sequence[str], normalized: bool = False) -> float:
    """The official accuracy of one ``prediction`` against the annotators' ``answers`` (in [0, 1]).
    ``normalized``: the prediction is already ``normalize_prediction``-ed (e.g. an answer-vocabulary entry)."""
    p = prediction if normalized else normalize_prediction(prediction)
    gt = prepare_ground_truth(answers)
    return accuracy_from_matches(sum(g == p for g in gt), len(gt))


def answer_scores(answers: Sequence[str], vocabulary: dict[str, int]) -> dict[int, float]:
    """``{vocabulary index: the accuracy that predicting that answer would score}``, non-zero entries only: the
    soft target of a classifier over ``vocabulary`` (whose keys are normalised answers)."""
    gt = prepare_ground_truth(answers)
    out = {}
    for a in set(gt):
        i = vocabulary.get(a)
        if i is not None:
            out[i] = accuracy_from_matches(sum(g == a for g in gt), len(gt))
    return out


def _t_interval(values: Sequence[float], confidence: float = 0.95) -> list[float] | None:
    """Student-t interval of a mean (per-question scores are not binary, so not Wilson), in percent."""
    n = len(values)
    if n < 2:
        return None
    from scipy import stats

    m = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return [round(100 * max(0.0, m - half), 4), round(100 * min(1.0, m + half), 4)]


def summarise_scores(scores: Sequence[float], answer_types: Sequence[str] | None = None,
                     question_types: Sequence[str] | None = None) -> dict:
    """A set's accuracy from its per-question scores: the mean (percent, as the evaluator's ``overall`` before its
    rounding to 2 digits), n, a 95% t interval over questions, and the same per answer type and question type."""
    def one(vals):
        vals = list(vals)
        n = len(vals)
        m = math.fsum(vals) / n if n else None
        se = math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (n - 1) / n) if n > 1 else None
        return {"accuracy": 100 * m if n else None, "n": n, "se": 100 * se if se is not None else None,
                "ci95": _t_interval(vals)}

    out = one(scores)
    for key, types in (("per_answer_type", answer_types), ("per_question_type", question_types)):
        if types is not None:
            groups: dict[str, list[float]] = {}
            for t, s in zip(types, scores):
                groups.setdefault(str(t), []).append(s)
            out[key] = {t: one(v) for t, v in sorted(groups.items())}
    return out


def group_mean(summaries: Iterable[dict]) -> dict:
    """The unweighted mean of per-set accuracies (FRAMES-VQA's near / far / OOD means), with a 95% normal interval
    from the per-set standard errors (independent sets: se² = Σ se_i² / k²); no interval when a member has none."""
    summaries = [s for s in summaries if s.get("accuracy") is not None]
    if not summaries:
        return {"accuracy": None, "sets": 0, "ci95": None}
    k = len(summaries)
    if k == 1:  # one set: its own mean and interval
        return {"accuracy": summaries[0]["accuracy"], "sets": 1, "ci95": summaries[0].get("ci95")}
    mean = math.fsum(s["accuracy"] for s in summaries) / k
    ci = None
    if all(s.get("se") is not None for s in summaries):
        half = _Z95 * math.sqrt(math.fsum(s["se"] ** 2 for s in summaries)) / k
        ci = [round(mean - half, 4), round(mean + half, 4)]
    return {"accuracy": mean, "sets": k, "ci95": ci}


def accuracy_cell(m: dict | None) -> str:
    """A summary (``summarise_scores``, ``group_mean``) as a table cell: ``"82.17 [79.30, 85.03]"``; ``-`` when
    there is no accuracy."""
    if not m or m.get("accuracy") is None:
        return "-"
    ci = m.get("ci95")
    return f"{m['accuracy']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
