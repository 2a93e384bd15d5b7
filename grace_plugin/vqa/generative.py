"""A generative VQA backbone: open_clip's CoCa answering in words (FRAMES-VQA's PaliGemma rows, arXiv 2505.21755 §5;
DiGraP's generative backbone, arXiv 2502.15895 §4).

CoCa (Yu et al. 2022, arXiv 2205.01917) is an image tower, a unimodal text tower and a text decoder that
cross-attends the image tokens; ``model(image, text)["logits"][:, t]`` predicts token ``t + 1`` (teacher forcing).
``CocaVQA`` takes [0, 1] pixels and normalises inside, as every model here does, and answers a question with the
prompt ``"question: {q} answer:"``:

* **training** (the PaliGemma recipe of FRAMES-VQA: the answer tokens after the prompt are the only labels): text =
  the tokens of ``"question: {q} answer: {a}"``; the labels are the answer's tokens and the closing ``<eot>``
  only, at the positions that predict them (``CocaTokens``); ``a`` is the most frequent of the annotators' answers
  (``training_answer``);
* **answering**: a greedy loop written here: open_clip's beam search ignores a text prefix and its ``generate``
  needs ``transformers`` (https://github.com/mlfoundations/open_clip/blob/v2.32.0/src/open_clip/coca_model.py). It
  starts from the prompt's tokens without ``<eot>`` and padding, appends the arg-max of the last position's logits
  until ``<eot>`` or ``max_new_tokens``, and decodes the new tokens; prompts of equal length run as one batch.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraceError
from ..models.classifier import ImageNormalizer

__all__ = ["QUESTION_PROMPT", "IGNORE", "CocaTokens", "CocaTarget", "CocaVQA", "tiny_coca_config", "training_answer",
           "coca_vqa_from_clip"]

QUESTION_PROMPT = "question: {q} answer:"
SOT, EOT = 49406, 49407  # open_clip's SimpleTokenizer: <start_of_text>, <end_of_text>
IGNORE = -100  # a label no loss reads (F.cross_entropy's default ignore_index)


def tiny_coca_config(width: int = 96, layers: int = 3, embed_dim: int = 64, image_size: int = 32, patch_size: int = 8,
                     text_width: int = 64, text_layers: int = 2, decoder_layers: int = 2,
                     context_length: int = 24) -> dict:
    """An open_clip CoCa config for the testbed, with the keys of open_clip's ``coca_ViT-B-32.json`` (attentional
    pooler and image tokens out, a CLS token on the text tower, a cross-attending decoder). The pooler's 17 queries
    give the decoder 16 image tokens and the contrastive side one (``coca_ViT-B-32`` has 256 for its 49 patches;
    the tiny tower has 16 patches)."""
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size,
                       "head_width": 32, "attentional_pool": True, "attn_pooler_heads": 2,
                       "attn_pooler_queries": 17, "output_tokens": True},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width, "heads": 2,
                     "layers": text_layers, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width, "heads": 2,
                           "layers": decoder_layers, "attn_pooler_heads": 2},
        "custom_text": True,
    }


def training_answer(answers: Sequence[str]) -> str:
    """The most frequent of the annotators' answers (FRAMES-VQA's ``multiple_choice_answer``); a tie goes to the
    answer given first (the authors' scripts break it by set iteration order, which depends on the hash seed)."""
    counts = Counter(answers)
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


class CocaTokens:
    """The prompt and answer tokens of a CoCa (picklable: the sample decoder of a loader worker uses it).

    ``lm_row(q, a)`` -> ``(text [C], labels [K], positions [K])``: ``text`` the tokens of prompt + answer + ``<eot>``
    padded with the pad id 0; ``labels`` the answer's tokens and ``<eot>``, each predicted at decoder position
    ``positions`` (label ``j`` is ``text[positions[j] + 1]``), padded with ``IGNORE`` (-100, the default
    ``ignore_index`` of ``F.cross_entropy``, so every recipe's loss is the answer tokens' mean cross-entropy). Only the
    ``K = answer_tokens`` positions that can carry a label are projected onto the 49,408-token vocabulary, not the
    whole context (3x fewer rows at the testbed's sizes); an answer longer than that is refused, never cut."""

    def __init__(self, tokenizer, context_length: int, answer_tokens: int = 8):
        self.tokenizer, self.context_length, self.answer_tokens = tokenizer, int(context_length), int(answer_tokens)

    def ids(self, text: str) -> list[int]:
        """The tokens of ``text`` as the tokenizer writes them: ``<sot> ... <eot>``, unpadded and not truncated (a
        text longer than the model's context is refused where it is used, never cut silently)."""
        row = self.tokenizer([text], context_length=max(1024, self.context_length))[0].tolist()
        return row[:row.index(EOT) + 1] if EOT in row else row

    def fits(self, n: int, question: str, what: str) -> None:
        if n > self.context_length:
            raise GraceError(f"question {question!r}: {what} is {n} tokens, more than the model's context of "
                             f"{self.context_length}")

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt's tokens without ``<eot>``: where answering starts."""
        return self.ids(QUESTION_PROMPT.format(q=question))[:-1]

    def lm_row(self, question: str, answer: str | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``answer``: words (tokenised after the prompt, ``<eot>`` added), or the tokens a decoder generated
        (``CocaVQA.answer_ids``: the model's own tokens, which the decoded text need not tokenise back to)."""
        prompt = self.prompt_ids(question)
        if isinstance(answer, str):
            full = self.ids(QUESTION_PROMPT.format(q=question) + f" {answer}")
        else:
            full = prompt + [int(t) for t in answer]
        self.fits(len(full), question, f"prompt + answer {answer!r} + <eot>")
        p = len(prompt)
        if len(full) - p > self.answer_tokens:
            raise GraceError(f"answer {answer!r}: {len(full) - p} tokens with <eot>, more than the "
                             f"{self.answer_tokens} answer positions")
        text = torch.zeros(self.context_length, dtype=torch.long)
        text[:len(full)] = torch.tensor(full)
        labels = torch.full((self.answer_tokens,), IGNORE, dtype=torch.long)
        labels[:len(full) - p] = torch.tensor(full[p:])
        # the first answer token is token p, predicted at position p - 1; unused slots point at the last position
        positions = torch.clamp(torch.arange(p - 1, p - 1 + self.answer_tokens), max=self.context_length - 2)
        return text, labels, positions

    def lm_batch(self, questions: Sequence[str], answers: Sequence[str | Sequence[int]], device=None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.lm_row(q, a) for q, a in zip(questions, answers)]
        return tuple(torch.stack([r[k] for r in rows]).to(device) for k in range(3))


class CocaTarget:
    """A raw VQA sample -> ``{"label": answer-token labels [K], "text": tokens [C], "positions" [K], "question",
    "record"}`` or a
    skip reason: the target of ``data.decode.decode_sample`` for a generative run (PaliGemma's recipe in FRAMES-VQA:
    the training answer is the annotators' most frequent, ``training_answer``). A question whose prompt and answer do
    not fit the context is skipped as ``bad_record`` (counted; ``--strict`` refuses), never truncated."""

    def __init__(self, tokens: CocaTokens):
        self.tokens = tokens

    def __call__(self, sample: dict) -> dict | str:
        from .data import RECORD_FIELDS, parse_record

        rec = parse_record(sample)
        if rec is None:
            return "bad_record"
        try:
            text, labels, positions = self.tokens.lm_row(rec["question"], training_answer(rec["answers"]))
        except GraceError:
            return "bad_record"
        return {"label": labels, "text": text, "positions": positions, "question": rec["question"],
                "record": {k: rec.get(k) for k in RECORD_FIELDS}}


class _DecoderHead(nn.Module):
    """``CocaVQA.head``: image features -> answer-token logits (what ``model.head(model.encode(x))`` computes in the
    recipes that split the model, GRACE and LP-FT), whose trainable parameters are the decoder's final LayerNorm and
    output projection (FRAMES-VQA's LP trains PaliGemma's ``lm_head`` only). A view into the owner's CoCa: it
    registers nothing of its own, so the weights have one name in a state dict."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner's CoCa holds the weights

    def parameters(self, recurse: bool = True):
        dec = self._owner.coca.text_decoder
        return iter([dec.ln_final.weight, dec.ln_final.bias, dec.text_projection])

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self._owner.logits_from_features(f)


class CocaVQA(nn.Module):
    """An open_clip CoCa that answers questions about [0, 1] images, with the interface every recipe trains.

    ``coca``: an ``open_clip.CoCa``; ``mean``/``std``: its pre-processing; ``tokenizer``: its open_clip tokenizer
    (``open_clip.get_tokenizer(name)``); ``pretrained_cfg``: timm's cfg for the transforms.

    The batch reaches the model through the VQA binding (``grace_plugin.vqa.model.bound``), as for ``ClipVQA``:

    * questions and teacher-forcing tokens bound (``QuestionContext.text``, ``labels``, ``positions``; training, and
      the attacks of adversarial recipes): ``model(x)`` is the answer-token logits ``[B, V, K]`` at the answer
      positions (class dimension second, as ``F.cross_entropy`` takes a sequence), so ``F.cross_entropy(model(x),
      labels)`` is the answer loss;
    * ``sequence=True`` as well (the evaluation's attacks): ``[B, 2]`` = ``(log p(a|x, q), log(1 - p(a|x, q)))`` of
      the bound answer ``a``'s whole token sequence, so the cross-entropy at label 0 is the answer's negative
      log-likelihood and "still correct" means ``p(a) > 1/2``: any attack of the registry (APGD-CE, PGD, ...)
      attacks the answer as a classifier's label;
    * questions only: ``predict_answers(x)`` decodes greedily.

    The recipe interface: ``visual`` is the whole CoCa (image tower, text tower and decoder: FRAMES-VQA's full
    fine-tuning trains all of PaliGemma; LoRA targets are globs over its module names); ``head`` the decoder's
    output layer (``_DecoderHead``); ``encode(x)`` the image side the decoder reads, flattened to one vector per
    image (the pooled latent, then the decoder's image tokens), ``head(f)`` the logits from it."""

    generative = True  # answers are decoded (no answer list); eval_suites.vqa asks
    head_is_new = False  # the output layer is pre-trained: it trains only where a recipe trains the head
    # LoRA's targets here: the MLP layers of every tower. open_clip's attention is ``nn.MultiheadAttention``, which
    # reads its q/k/v and output weights as tensors (``F.multi_head_attention_forward``) instead of calling a Linear,
    # so an adapter wrapping them would never run; FRAMES-VQA's PaliGemma LoRA targets q/k/v/o (arXiv 2505.21755 §5)
    lora_targets_hint = ["*.mlp.c_fc", "*.mlp.c_proj"]
    # what no answer depends on: the contrastive side (the pooled image and text latents and their projections, the
    # text tower's CLS token and final norm, which only the latent reads; the logit scale); never trained
    CONTRASTIVE_ONLY = ("coca.logit_scale", "coca.logit_bias", "coca.visual.proj", "coca.text.text_projection",
                        "coca.text.cls_emb", "coca.text.ln_final.*")

    def untrained_parameters(self) -> list[nn.Parameter]:
        import fnmatch

        return [p for n, p in self.named_parameters() if any(fnmatch.fnmatchcase(n, g) for g in self.CONTRASTIVE_ONLY)]
    question_fields = ("questions",)

    def __init__(self, coca: nn.Module, mean, std, tokenizer, max_new_tokens: int = 6,
                 pretrained_cfg: dict | None = None):
        super().__init__()
        self.coca = coca
        self.normalize = ImageNormalizer(mean, std)
        self.tokens = CocaTokens(tokenizer, int(coca.context_length))
        self.max_new_tokens = max_new_tokens
        self.answers: list[str] = []  # no answer vocabulary: answers are decoded
        self.num_classes = 0
        self.pretrained_cfg = dict(pretrained_cfg or {"mean": tuple(mean), "std": tuple(std)})
        self.default_cfg = self.pretrained_cfg  # timm alias
        self.head = _DecoderHead(self)
        with torch.no_grad():  # the decoder's image tokens per image (what ``encode`` flattens)
            _, embs = coca._encode_image(torch.zeros(1, 3, *coca.visual.image_size))
        self.token_shape = tuple(int(v) for v in embs.shape[1:])

    @property
    def tokenizer(self):
        return self.tokens.tokenizer

    @property
    def context_length(self) -> int:
        return self.tokens.context_length

    @property
    def visual(self) -> nn.Module:
        return self.coca

    @property
    def feature_tower(self) -> nn.Module:
        """The part of ``visual`` that ``encode`` runs (the image tower): where GRACE's LAR-AWP perturbs, as the
        paper perturbs CLIP's vision encoder (arXiv 2603.27139)."""
        return self.coca.visual

    def head_spec(self) -> dict:
        """checkpoint.json's architecture: a CoCa rebuilt from the run's open_clip config (``from_run``)."""
        return {"head": {"kind": "coca", "max_new_tokens": self.max_new_tokens}}

    # ------------------------------------------------------------------ tokens (CocaTokens)
    def _ids(self, text: str) -> list[int]:
        return self.tokens.ids(text)

    def prompt_ids(self, question: str) -> list[int]:
        return self.tokens.prompt_ids(question)

    def lm_batch(self, questions: Sequence[str], answers: Sequence[str | Sequence[int]], device=None
                 ) -> tuple[torch.Tensor, ...]:
        return self.tokens.lm_batch(questions, answers, device)

    # ------------------------------------------------------------------ the recipe interface
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        latent, embs = self.coca._encode_image(self.normalize(x))
        return torch.cat([latent, embs.flatten(1)], dim=1)

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        from .model import bound_flag, current_questions

        n, d = self.token_shape
        latent, embs = f[:, :f.shape[1] - n * d], f[:, f.shape[1] - n * d:].reshape(f.shape[0], n, d)
        text = current_questions(f.shape[0], "text").to(f.device)
        positions = current_questions(f.shape[0], "positions").to(f.device)
        rows = torch.arange(f.shape[0], device=f.device)[:, None]

        def answer_rows(_module, _inputs, out):  # [B, C-1, W] -> [B, K, W]: only these reach the vocabulary
            return out[rows, positions]

        handle = self.coca.text_decoder.ln_final.register_forward_hook(answer_rows)
        try:
            logits = self.coca(None, text[:, :-1], image_latent=latent, image_embs=embs,
                               output_labels=False)["logits"]  # [B, K, V]
        finally:
            handle.remove()
        if not bound_flag("sequence"):
            return logits.transpose(1, 2)  # [B, V, K]
        labels = current_questions(f.shape[0], "labels").to(f.device)
        keep = labels != IGNORE
        tok = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        logp = (tok * keep).sum(1).clamp_max(-1e-6)  # log p(a); below 0 so that log(1 - p) is finite
        return torch.stack([logp, torch.log(-torch.expm1(logp))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

    def answer_loss(self, images: torch.Tensor, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens and ``<eot>`` given the image and the prompt (teacher forcing)."""
        text, labels, positions = self.lm_batch(questions, answers, images.device)
        logits = self.coca(self.normalize(images), text[:, :-1], output_labels=False)["logits"]
        at = logits[torch.arange(len(questions), device=images.device)[:, None], positions]  # [B, K, V]
        return F.cross_entropy(at.float().reshape(-1, at.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)

    # ------------------------------------------------------------------ evaluation (the questions bound)
    def predict_answers(self, x: torch.Tensor) -> list[str]:
        """The bound questions' answers in words (greedy)."""
        from .model import current_questions

        return self.answer(x, current_questions(x.shape[0], "questions"))

    def attack_target(self, x: torch.Tensor):
        """``(clean answers, labels, context)`` for an attack on ``x``: the model's own greedy answers, label 0 of the
        ``sequence`` output, and the binding under which ``model(x)`` scores those answers."""
        from .model import QuestionContext, current_questions

        questions = list(current_questions(x.shape[0], "questions"))
        ids = self.answer_ids(x, questions)  # the generated tokens themselves: their text may tokenise otherwise
        clean = [self.decode(a) for a in ids]
        text, labels, positions = self.lm_batch(questions, ids, x.device)
        ctx = QuestionContext(questions=questions, text=text, labels=labels, positions=positions, sequence=True)
        return clean, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), ctx

    @torch.no_grad()
    def greedy_ids(self, images: torch.Tensor, prompts: torch.Tensor, max_new_tokens: int | None = None
                   ) -> torch.Tensor:
        """Greedy continuation of equal-length ``prompts`` ``[B, P]`` (no ``<eot>``, no padding): ``[B, P + k]``,
        rows that reached ``<eot>`` padded with the pad id after it."""
        pad = int(getattr(self.coca, "pad_id", 0))
        latent, embs = self.coca._encode_image(self.normalize(images))
        out, done = prompts, torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
        for _ in range(self.max_new_tokens if max_new_tokens is None else max_new_tokens):
            if out.shape[1] >= self.context_length:
                break
            logits = self.coca(None, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"]
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == EOT
            if bool(done.all()):
                break
        return out

    def decode(self, ids: Sequence[int]) -> str:
        import open_clip

        ids = [int(t) for t in ids]
        ids = ids[:ids.index(EOT)] if EOT in ids else ids
        return open_clip.decode(torch.tensor([t for t in ids if t not in (0, SOT)])).strip()

    @torch.no_grad()
    def answer_ids(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int | None = None
                   ) -> list[list[int]]:
        """Each question's greedy answer tokens (the continuation of its prompt, up to and with ``<eot>`` where the
        decoder ended it), prompts of one length batched."""
        prompts = [self.prompt_ids(q) for q in questions]
        for q, ids in zip(questions, prompts):
            self.tokens.fits(len(ids) + 1, q, "the prompt with room for one answer token")
        answers: list[list[int]] = [[] for _ in questions]
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[i] for i in idx], device=images.device)
            out = self.greedy_ids(images[idx], ids, max_new_tokens)
            for row, i in zip(out[:, length:].tolist(), idx):
                answers[i] = row[:row.index(EOT) + 1] if EOT in row else row
        return answers

    def answer(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Each question's answer in words (``answer_ids`` decoded)."""
        return [self.decode(ids) for ids in self.answer_ids(images, questions, max_new_tokens)]

    @torch.no_grad()
    def attention_outputs(self, images: torch.Tensor, questions: Sequence[str],
                          answers: Sequence[str | Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing on ``answers`` (words or generated tokens, as ``lm_batch``): the decoder's last-layer
        self-attention and cross-attention outputs ``[B, L, D]`` (before the residual sums) and the mask of the
        prompt's text positions ``[B, L]`` (``<sot>`` and the question; not the answer, not the padding)."""
        text = self.lm_batch(questions, answers, images.device)[0]
        dec = self.coca.text_decoder
        got: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, _inputs, output):  # nn.MultiheadAttention: (output, weights)
                got[name] = output[0] if module.batch_first else output[0].permute(1, 0, 2)
            return hook

        handles = [dec.resblocks[-1].attn.register_forward_hook(keep("self")),
                   dec.cross_attn[-1].attn.register_forward_hook(keep("cross"))]
        try:
            self.coca(self.normalize(images), text[:, :-1], output_labels=False)
        finally:
            for h in handles:
                h.remove()
        prompt = torch.zeros(text.shape[0], text.shape[1] - 1, dtype=torch.bool, device=images.device)
        for i, q in enumerate(questions):
            prompt[i, :len(self.prompt_ids(q))] = True
        return got["self"], got["cross"], prompt


def coca_vqa_from_clip(bundle, max_new_tokens: int = 6) -> CocaVQA:
    """A ``CocaVQA`` on a copy of the CoCa ``bundle`` (``models.clip.load_clip``; the bundle stays the pre-trained
    reference), with timm's pretrained cfg for the transforms."""
    import copy

    from ..models.clip import pretrained_cfg_from_clip

    cfg = pretrained_cfg_from_clip(bundle)
    return CocaVQA(copy.deepcopy(bundle.clip), cfg["mean"], cfg["std"], bundle.tokenizer(), max_new_tokens,
                   pretrained_cfg=cfg).eval()
