"""Modality importance from attention (FRAMES-VQA, arXiv 2505.21755 §6.3), as pure functions, and its adaptation to a
decoder that attends text and image with two softmaxes (CoCa, arXiv 2205.01917).

FRAMES-VQA reads PaliGemma's last-layer attention ``A`` (mean over heads, ``[L, L]``, one softmax over image and text
tokens together) and reports, per sample, ``img_ratio`` = mean over image-token rows ``r`` of ``A[r, T].sum() /
A[r, I].sum()`` and ``txt_ratio`` = the same mean over the prefix-text rows (``I``: image positions, ``T``: prompt
text positions; the answer suffix is in neither): attention mass on the question over mass on the image, larger
meaning more reliance on the question (``attention_ratios``).

A CoCa decoder has no single softmax: each text position attends the text (causal self-attention) and then the image
tokens (cross-attention), each softmax summing to one, so attention masses cannot be compared across the two. What
can be compared is what each one adds to the position's residual stream: ``residual_ratio`` is, per sample, the mean
over the prompt's text positions of ``||self-attention output|| / ||cross-attention output||`` in the decoder's last
layer (the outputs of ``text_decoder.resblocks[-1].attn`` and ``text_decoder.cross_attn[-1].attn``, before the
residual sum), with teacher forcing on the training answer as FRAMES-VQA does. It is the counterpart of
``txt_ratio``: larger = the question contributes more than the image at the positions that read the question.
"""
from __future__ import annotations

import torch

__all__ = ["attention_ratios", "residual_ratio"]


def attention_ratios(attn: torch.Tensor, image: torch.Tensor, text: torch.Tensor, eps: float = 1e-12
                     ) -> tuple[float, float]:
    """``(img_ratio, txt_ratio)`` of one sample's attention map ``attn`` ``[L, L]`` (rows: queries) with boolean
    position masks ``image`` and ``text`` ``[L]``."""
    a = attn.double()
    t_mass, i_mass = a[:, text].sum(-1), a[:, image].sum(-1).clamp_min(eps)
    ratio = t_mass / i_mass
    return float(ratio[image].mean()), float(ratio[text].mean())


def residual_ratio(self_out: torch.Tensor, cross_out: torch.Tensor, positions: torch.Tensor, eps: float = 1e-12
                   ) -> torch.Tensor:
    """Per sample, the mean over ``positions`` (``[B, L]`` boolean) of ``||self_out|| / ||cross_out||`` (both
    ``[B, L, D]``): ``[B]``."""
    r = self_out.double().norm(dim=-1) / cross_out.double().norm(dim=-1).clamp_min(eps)
    m = positions.to(r.dtype)
    return (r * m).sum(-1) / m.sum(-1).clamp_min(1)
