"""CLIP VQA models: the image tower of ``ClipClassifier`` with the question as a second input.

* ``ClipVQA`` (discriminative, FRAMES-VQA's LP / FT / LoRA rows with a CLIP backbone, arXiv 2505.21755 §5): the
  timm image tower (as fine-tuned by every recipe) and the frozen pre-trained CLIP text tower's embedding of the
  question, fused by an answer head ``LayerNorm([i, q, i⊙q]) -> Linear -> GELU -> Linear`` over the answer
  vocabulary (the classifier-VQA head of Teney et al., arXiv 1708.02711, with CLIP features). The head is new, so
  it trains in every recipe (``head_is_new``); the question tower stays frozen (its embeddings are cached per
  question), so a recipe's choice of weights (full, LoRA, ...) is the image tower's, as in classification.
* ``ZeroShotVQA`` (the zero-shot row): no new parameter; each candidate answer becomes the prompt
  ``"question: {q} answer: {a}"``, encoded by the CLIP text tower once per distinct (question, answer), and scored
  against the image as CLIP scores class prompts.

The question reaches the model through a binding (``bound``): the task sets the batch's question context around a
training step or an evaluation batch, so ``model(x)`` — what every recipe, torchattacks and AutoAttack call — gives
the answer logits for *these* questions, and an attack on ``x`` attacks the image through the VQA loss. A recipe that
runs the model on a subset of the rows narrows the binding with ``rows(idx)``.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraceError
from ..models.classifier import ImageNormalizer

__all__ = ["QuestionContext", "bound", "rows", "current_questions", "bound_flag", "AnswerHead", "ClipVQA",
           "ZeroShotVQA", "QuestionEncoder", "PROMPT", "UnboundQuestions", "vqa_model_from_clip",
           "zero_shot_vqa_from_clip"]

PROMPT = "question: {q} answer: {a}"


class UnboundQuestions(GraceError, RuntimeError):
    """A VQA model was called without the batch's questions bound (or on a batch of another size)."""


@dataclass
class QuestionContext:
    """The questions of the rows a VQA model is about to see: ``embedding`` ``[B, D]`` (ClipVQA) and/or
    ``prompts`` ``[B, A, D]`` (ZeroShotVQA), unit-norm; for the generative ``CocaVQA``
    (``grace_plugin/vqa/generative.py``) the ``questions`` themselves, and, where an answer is scored, its
    teacher-forcing tokens ``text`` ``[B, C]``, ``labels`` ``[B, K]`` and their decoder ``positions`` ``[B, K]``,
    with ``sequence`` asking for the whole answer's log-likelihood (``CocaVQA``'s attack output)."""

    embedding: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    questions: list[str] | None = None
    text: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    sequence: bool = False

    def __getitem__(self, idx) -> QuestionContext:
        def pick(v):
            if v is None or isinstance(v, torch.Tensor):
                return None if v is None else v[idx]
            if isinstance(idx, slice):
                return v[idx]
            i = idx.tolist() if isinstance(idx, torch.Tensor) else idx
            if isinstance(i, list) and i and isinstance(i[0], bool):
                return [q for q, keep in zip(v, i) if keep]
            return [v[j] for j in i] if isinstance(i, list) else [v[i]]

        return QuestionContext(pick(self.embedding), pick(self.prompts), pick(self.questions), pick(self.text),
                               pick(self.labels), pick(self.positions), self.sequence)


_BOUND: contextvars.ContextVar[QuestionContext | None] = contextvars.ContextVar("grace_vqa_questions", default=None)


@contextlib.contextmanager
def bound(ctx: QuestionContext | None):
    """Bind the questions of the next forwards (None: leave the binding as it is)."""
    if ctx is None:
        yield
        return
    token = _BOUND.set(ctx)
    try:
        yield
    finally:
        _BOUND.reset(token)


@contextlib.contextmanager
def rows(idx):
    """Narrow the bound questions to rows ``idx`` (a no-op when none are bound: a classification model)."""
    ctx = _BOUND.get()
    with bound(None if ctx is None else ctx[idx]):
        yield


def bound_flag(field: str) -> bool:
    """A boolean field of the bound context (False when none is bound)."""
    ctx = _BOUND.get()
    return bool(ctx is not None and getattr(ctx, field))


def current_questions(n: int, field: str) -> torch.Tensor:
    ctx = _BOUND.get()
    value = None if ctx is None else getattr(ctx, field)
    if value is None:
        raise UnboundQuestions("a VQA model needs its batch's questions: call it inside grace_plugin.vqa.model.bound("
                               "...) (the task does this around each training step and evaluation batch)")
    if len(value) != n:
        raise UnboundQuestions(f"{n} images but {len(value)} bound questions: narrow the binding to the rows "
                               "used (grace_plugin.vqa.model.rows)")
    return value


class AnswerHead(nn.Module):
    """``[B, D]`` image features (bound questions ``[B, D]``) -> ``[B, A]`` answer logits."""

    def __init__(self, dim: int, answers: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * dim
        self.norm = nn.LayerNorm(3 * dim)
        self.fc1 = nn.Linear(3 * dim, hidden)
        self.fc2 = nn.Linear(hidden, answers)
        self.num_classes = answers

    def hidden(self, f: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The fused image-question representation (the head's penultimate activation: FRAMES-VQA's "joint"
        embedding for this model, arXiv 2505.21755 §4)."""
        return F.gelu(self.fc1(self.norm(torch.cat([f, q, f * q], dim=-1))))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(f, current_questions(f.shape[0], "embedding").to(f)))


class _ImageSide(nn.Module):
    """What both VQA models share with ``ClipClassifier``: [0,1] pixels normalised inside, the timm image tower, the
    answer list and timm's pretrained cfg."""

    def __init__(self, visual: nn.Module, pretrained_cfg: dict, answers: list[str]):
        super().__init__()
        self.normalize = ImageNormalizer(pretrained_cfg["mean"], pretrained_cfg["std"])
        self.visual = visual
        self.answers = list(answers)
        self.pretrained_cfg = dict(pretrained_cfg, num_classes=len(answers))
        self.default_cfg = self.pretrained_cfg  # timm alias
        self.num_classes = len(answers)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of [0,1] images."""
        return F.normalize(self.visual(self.normalize(x)), dim=-1)

    @torch.no_grad()
    def predict_answers(self, x: torch.Tensor) -> list[str]:
        """The bound questions' answers: the arg-max over the answer list."""
        return [self.answers[i] for i in self(x).argmax(1).tolist()]

    @torch.no_grad()
    def attack_target(self, x: torch.Tensor):
        """``(clean answers, labels, context)`` for an attack on ``x``: the model's own answers as the labels, under
        the binding as it is (None)."""
        idx = self(x).argmax(1)
        return [self.answers[i] for i in idx.tolist()], idx, None


class ClipVQA(_ImageSide):
    """CLIP image tower + answer head; input ``[B, 3, H, W]`` in [0,1] with the questions bound; output ``[B, A]``."""

    head_is_new = True  # every recipe trains the head (it has no pre-trained value)
    question_fields = ("embedding",)

    def __init__(self, visual: nn.Module, head: AnswerHead, pretrained_cfg: dict, answers: list[str]):
        super().__init__(visual, pretrained_cfg, answers)
        self.head = head

    def head_spec(self) -> dict:
        """The head's shape, as a run folder's checkpoint.json records it (``from_spec`` rebuilds it)."""
        return {"embed_dim": self.head.fc1.in_features // 3, "head": {"kind": "answer",
                                                                        "hidden": self.head.fc1.out_features}}

    @classmethod
    def from_spec(cls, visual: nn.Module, arch: dict, pretrained_cfg: dict, answers: list[str]) -> ClipVQA:
        head = AnswerHead(int(arch["embed_dim"]), len(answers), int(arch["head"]["hidden"]))
        return cls(visual, head, pretrained_cfg, answers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))


class ZeroShotVQA(_ImageSide):
    """CLIP answer scoring: ``logit_scale · <image, prompt(q, a)>`` over the candidate answers ``a``."""

    head_is_new = False
    question_fields = ("prompts",)

    def __init__(self, visual: nn.Module, logit_scale: float, pretrained_cfg: dict, answers: list[str]):
        super().__init__(visual, pretrained_cfg, answers)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encode(x)
        t = current_questions(f.shape[0], "prompts").to(f)
        return self.logit_scale * torch.einsum("bd,bad->ba", f, t)


class QuestionEncoder:
    """The frozen pre-trained CLIP text tower as the VQA models' question side, with a cache per string (questions
    and prompts repeat: a templated world has hundreds of distinct questions, VQAv2 ~5 questions per image)."""

    def __init__(self, bundle, device: str | torch.device = "cpu", batch: int = 256):
        self.clip = bundle.clip.eval()
        self.tokenizer = bundle.tokenizer()
        self.device, self.batch = torch.device(device), batch
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``[N, D]`` unit-norm text embeddings (float32, on the encoder's device)."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            self.clip.to(self.device)
            for i in range(0, len(todo), self.batch):
                chunk = todo[i:i + self.batch]
                emb = self.clip.encode_text(self.tokenizer(chunk).to(self.device), normalize=True).float()
                self.cache.update(zip(chunk, emb.cpu()))
        return torch.stack([self.cache[t] for t in texts]).to(self.device)

    def context(self, model: nn.Module, questions: list[str]) -> QuestionContext:
        """What ``model`` needs of ``questions``: their embeddings, and/or every answer's prompt."""
        fields = getattr(model, "question_fields", ())
        ctx = QuestionContext()
        if "embedding" in fields:
            ctx.embedding = self.encode(list(questions))
        if "questions" in fields:
            ctx.questions = list(questions)
        if "prompts" in fields:
            answers = model.answers
            flat = self.encode([PROMPT.format(q=q, a=a) for q in questions for a in answers])
            ctx.prompts = flat.view(len(questions), len(answers), -1)
        return ctx


def vqa_model_from_clip(bundle, answers: list[str], hidden: int | None = None, seed: int = 0) -> ClipVQA:
    """A ``ClipVQA`` on the CLIP ``bundle``'s image tower (converted to timm as for classification) with a new
    answer head over ``answers``, initialised from ``seed`` (the global RNG is left as it was)."""
    from ..models.clip import image_tower, pretrained_cfg_from_clip

    tower = image_tower(bundle)
    dim = int(bundle.model_cfg["embed_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AnswerHead(dim, len(answers), hidden)
    return ClipVQA(tower, head, pretrained_cfg_from_clip(bundle), answers).eval()


def zero_shot_vqa_from_clip(bundle, answers: list[str]) -> ZeroShotVQA:
    """The zero-shot answer scorer on the CLIP ``bundle`` (no new parameter)."""
    from ..models.clip import image_tower, pretrained_cfg_from_clip

    scale = float(bundle.clip.logit_scale.detach().exp())
    return ZeroShotVQA(image_tower(bundle), scale, pretrained_cfg_from_clip(bundle), answers).eval()
