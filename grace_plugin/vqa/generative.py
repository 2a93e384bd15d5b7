"""A generative VQA backbone: open_clip's CoCa answering in words (FRAMES-VQA's PaliGemma rows, arXiv 2505.21755 §5;
DiGraP's generative backbone, arXiv 2502.15895 §4).

CoCa (Yu et al. 2022, arXiv 2205.01917) is an image tower, a unimodal text tower and a text decoder that
cross-attends the image tokens; ``model(image, text)["logits"][:, t]`` predicts token ``t + 1`` (teacher forcing).
``CocaVQA`` takes [0, 1] pixels and normalises inside, as every model here does, and answers a question with the
prompt ``"question: {q} answer:"``:

* **training** (the PaliGemma recipe of FRAMES-VQA: the answer tokens after the prompt are the only labels): text =
  the tokens of ``"question: {q} answer: {a}"``; the labels of the prompt's tokens are the pad id, which the
  cross-entropy ignores, so only the answer's tokens and the closing ``<eot>`` carry loss; ``a`` is the most frequent
  of the annotators' answers (``training_answer``);
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

__all__ = ["QUESTION_PROMPT", "CocaVQA", "tiny_coca_config", "training_answer"]

QUESTION_PROMPT = "question: {q} answer:"
SOT, EOT = 49406, 49407  # open_clip's SimpleTokenizer: <start_of_text>, <end_of_text>


def tiny_coca_config(width: int = 96, layers: int = 3, embed_dim: int = 64, image_size: int = 32, patch_size: int = 8,
                     text_width: int = 64, text_layers: int = 2, decoder_layers: int = 2,
                     context_length: int = 24) -> dict:
    """An open_clip CoCa config for the testbed, with the keys of open_clip's ``coca_ViT-B-32.json`` (attentional
    pooler and image tokens out, a CLS token on the text tower, a cross-attending decoder)."""
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size,
                       "head_width": 32, "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
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


class CocaVQA(nn.Module):
    """An open_clip CoCa that answers questions about [0, 1] images.

    ``coca``: an ``open_clip.CoCa``; ``mean``/``std``: its pre-processing; ``tokenizer``: its open_clip tokenizer
    (``open_clip.get_tokenizer(name)``)."""

    def __init__(self, coca: nn.Module, mean, std, tokenizer, max_new_tokens: int = 6):
        super().__init__()
        self.coca = coca
        self.normalize = ImageNormalizer(mean, std)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.context_length = int(coca.context_length)

    def _ids(self, text: str) -> list[int]:
        """The tokens of ``text`` as the tokenizer writes them: ``<sot> ... <eot>``, unpadded and not truncated (a
        text longer than the model's context is refused where it is used, never cut silently)."""
        row = self.tokenizer([text], context_length=max(1024, self.context_length))[0].tolist()
        return row[:row.index(EOT) + 1] if EOT in row else row

    def _fits(self, n: int, question: str, what: str) -> None:
        if n > self.context_length:
            raise GraceError(f"question {question!r}: {what} is {n} tokens, more than the model's context of "
                             f"{self.context_length}")

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt's tokens without ``<eot>``: where answering starts."""
        return self._ids(QUESTION_PROMPT.format(q=question))[:-1]

    def lm_batch(self, questions: Sequence[str], answers: Sequence[str], device=None) -> tuple[torch.Tensor, ...]:
        """``(text, labels)``: ``text`` the padded tokens of prompt + answer + ``<eot>``; ``labels = text[:, 1:]`` with
        every position that predicts a prompt token (and the padding) set to the pad id 0, which the loss ignores."""
        pad = int(getattr(self.coca, "pad_id", 0))
        text = torch.full((len(questions), self.context_length), pad, dtype=torch.long)
        labels = torch.full((len(questions), self.context_length - 1), pad, dtype=torch.long)
        for i, (q, a) in enumerate(zip(questions, answers)):
            full = self._ids(QUESTION_PROMPT.format(q=q) + f" {a}")
            self._fits(len(full), q, f"prompt + answer {a!r} + <eot>")
            p = len(self.prompt_ids(q))
            text[i, :len(full)] = torch.tensor(full)
            # label j is token j + 1: the first answer token is token p, predicted at position p - 1
            labels[i, p - 1:len(full) - 1] = torch.tensor(full[p:])
        return text.to(device), labels.to(device)

    def answer_loss(self, images: torch.Tensor, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens and ``<eot>`` given the image and the prompt (teacher forcing)."""
        text, labels = self.lm_batch(questions, answers, images.device)
        out = self.coca(self.normalize(images), text[:, :-1], output_labels=False)
        return F.cross_entropy(out["logits"].float().reshape(-1, out["logits"].shape[-1]), labels.reshape(-1),
                               ignore_index=int(getattr(self.coca, "pad_id", 0)))

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
    def answer(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Each question's answer in words: the greedy continuation of its prompt, prompts of one length batched."""
        prompts = [self.prompt_ids(q) for q in questions]
        for q, ids in zip(questions, prompts):
            self._fits(len(ids) + 1, q, "the prompt with room for one answer token")
        answers: list[str] = [""] * len(questions)
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[i] for i in idx], device=images.device)
            out = self.greedy_ids(images[idx], ids, max_new_tokens)
            for row, i in zip(out[:, length:].tolist(), idx):
                answers[i] = self.decode(row)
        return answers

    @torch.no_grad()
    def attention_outputs(self, images: torch.Tensor, questions: Sequence[str], answers: Sequence[str]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing on ``answers``: the decoder's last-layer self-attention and cross-attention outputs
        ``[B, L, D]`` (before the residual sums) and the mask of the prompt's text positions ``[B, L]`` (``<sot>``
        and the question; not the answer, not the padding)."""
        text, _ = self.lm_batch(questions, answers, images.device)
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
