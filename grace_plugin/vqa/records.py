"""The VQA sets' record formats, read into one record shape, and a registry of them (``grace shards convert
--format``).

One record per question: ``{"question_id", "question", "answers": [str, ...], "image": <path>, "image_id",
"question_type", "answer_type"}`` (the last three may be None). Formats (arXiv 2505.21755, github.com/chengyuehuang511/
FRAMES-VQA ``data/datasets/coco_vqa.py``; the COCO-VQA files of https://visualqa.org/download.html):

* ``frames``: FRAMES-VQA's record list (a JSON list, or a dict whose values are records) of ``{"question_id",
  "question", "image": <path relative to the image folder>, "answer": [the annotators' answers] | str}``;
  ``question_type`` / ``answer_type`` / ``image_id`` are kept when present.
* ``coco-vqa``: the questions file ``{"questions": [{"question_id", "image_id", "question"}]}`` beside the
  annotations file ``{"annotations": [{"question_id", "image_id", "question_type", "answer_type",
  "answers": [{"answer", ...}]}]}`` (VQAv2, VQA-CP v2, VQA-Rephrasings, AdVQA, OK-VQA); the image of a question is
  ``--image-pattern`` formatted with its ``image_id`` (``COCO_val2014_{image_id:012d}.jpg``).

A file or field that is not what the format says is refused in one line naming the file, the record and the field;
a question with no annotation (or an annotation with no question) refuses the pair: nothing is dropped silently.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import GraceError, InputNotFound, UsageError, read_json
from ..registries import Registry

__all__ = ["RecordFormatError", "RecordFormat", "register_format", "get_format", "list_formats", "read_frames",
           "read_coco_vqa", "check_record"]


class RecordFormatError(GraceError, ValueError):
    """A VQA record file that does not hold what its format says; the message names the file, record and field."""


class UnknownFormatError(UsageError, KeyError):
    pass


@dataclass(frozen=True)
class RecordFormat:
    """A VQA source format: ``read(args) -> records`` where ``args`` holds the converter's flags (``records``,
    ``questions``, ``annotations``, ``image_pattern``); ``needs``: the flags it requires."""

    name: str
    description: str
    needs: tuple[str, ...]
    read: Callable[[dict], list[dict]]


_FORMATS: Registry[RecordFormat] = Registry("format", UnknownFormatError)


def register_format(fmt: RecordFormat) -> RecordFormat:
    return _FORMATS.register(fmt.name)(fmt)


def get_format(name: str) -> RecordFormat:
    return _FORMATS.get(name)


def list_formats() -> list[str]:
    return _FORMATS.names()


def _load(path, what: str):
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"{p}: {what} file does not exist")
    return read_json(p, RecordFormatError)


def _qid(value, where: str):
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise RecordFormatError(f"{where}: field 'question_id' must be an integer or a non-empty string, got "
                                f"{value!r}")
    return value


def check_record(rec: dict, where: str) -> dict:
    """A record of the common shape, its fields checked (``where`` names the file and record in errors)."""
    qid = _qid(rec.get("question_id"), where)
    q = rec.get("question")
    if not isinstance(q, str) or not q.strip():
        raise RecordFormatError(f"{where}: field 'question' must be a non-empty string, got {q!r}")
    answers = rec.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise RecordFormatError(f"{where}: the annotators' answers must be a non-empty list of strings, got "
                                f"{answers!r}")
    image = rec.get("image")
    if not isinstance(image, str) or not image:
        raise RecordFormatError(f"{where}: field 'image' must be a path, got {image!r}")
    out = {"question_id": qid, "question": q, "answers": answers, "image": image}
    for k in ("image_id", "question_type", "answer_type"):
        out[k] = rec.get(k)
    return out


def read_frames(args: dict) -> list[dict]:
    path = args["records"]
    data = _load(path, "--records")
    if isinstance(data, dict):
        data = list(data.values())
    if not isinstance(data, list):
        raise RecordFormatError(f"{path}: expected a JSON list of records (or a dict of them), got "
                                f"{type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        where = f"{path} record {i}"
        if not isinstance(rec, dict):
            raise RecordFormatError(f"{where}: expected an object, got {type(rec).__name__}")
        if "answer" not in rec:
            raise RecordFormatError(f"{where}: field 'answer' (the annotators' answers) is missing")
        out.append(check_record({**rec, "answers": rec["answer"]}, where))
    return out


def _image_name(pattern: str, image_id, where: str) -> str:
    try:
        return pattern.format(image_id=image_id)
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--image-pattern {pattern!r}: cannot be formatted with image_id={image_id!r} ({where}): "
                         f"{e}") from None


def read_coco_vqa(args: dict) -> list[dict]:
    qpath, apath, pattern = args["questions"], args["annotations"], args["image_pattern"]
    qdata, adata = _load(qpath, "--questions"), _load(apath, "--annotations")
    for data, path, key in ((qdata, qpath, "questions"), (adata, apath, "annotations")):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise RecordFormatError(f"{path}: field {key!r} (a list) is missing")
    anns = {}
    for i, a in enumerate(adata["annotations"]):
        where = f"{apath} annotations[{i}]"
        if not isinstance(a, dict):
            raise RecordFormatError(f"{where}: expected an object")
        qid = _qid(a.get("question_id"), where)
        if qid in anns:
            raise RecordFormatError(f"{where}: question_id {qid!r} is annotated twice")
        raw = a.get("answers")
        if not isinstance(raw, list) or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in raw):
            raise RecordFormatError(f"{where}: field 'answers' must be a list of {{'answer': str, ...}}")
        anns[qid] = a
    out, seen = [], set()
    for i, q in enumerate(qdata["questions"]):
        where = f"{qpath} questions[{i}]"
        if not isinstance(q, dict):
            raise RecordFormatError(f"{where}: expected an object")
        qid = _qid(q.get("question_id"), where)
        if qid not in anns:
            missing = sum(1 for x in qdata["questions"] if isinstance(x, dict) and x.get("question_id") not in anns)
            raise RecordFormatError(f"{apath}: no annotation for question_id {qid!r} of {qpath} ({missing} questions "
                                    "lack one); a question without answers cannot be scored")
        if qid in seen:
            raise RecordFormatError(f"{where}: question_id {qid!r} appears twice")
        seen.add(qid)
        a = anns[qid]
        image_id = q.get("image_id", a.get("image_id"))
        if image_id is None:
            raise RecordFormatError(f"{where}: field 'image_id' is missing")
        out.append(check_record({"question_id": qid, "question": q.get("question"), "image_id": image_id,
                                 "answers": [x["answer"] for x in a["answers"]],
                                 "image": _image_name(pattern, image_id, where),
                                 "question_type": a.get("question_type"), "answer_type": a.get("answer_type")},
                                where))
    extra = set(anns) - seen
    if extra:
        raise RecordFormatError(f"{apath}: {len(extra)} annotations have no question in {qpath} (first question_id: "
                                f"{sorted(extra, key=str)[0]!r})")
    return out


register_format(RecordFormat("frames", "FRAMES-VQA record list: question_id, question, image (relative to --images), "
                             "answer (the annotators' answers)", ("records",), read_frames))
register_format(RecordFormat("coco-vqa", "COCO-VQA questions + annotations (VQAv2, VQA-CP v2, VQA-Rephrasings, "
                             "AdVQA, OK-VQA); images by --image-pattern", ("questions", "annotations",
                                                                          "image_pattern"), read_coco_vqa))
