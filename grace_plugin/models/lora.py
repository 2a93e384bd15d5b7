"""LoRA adapters on ``nn.Linear`` with an optional low-rank adversarial weight branch (GRACE's LAR-AWP).

``W(θ) = W(θ0) + s·B A`` (GRACE, arXiv 2603.27139, Eq. 5; ``s = alpha / rank``) and, while the AWP branch is active,
``W_pert = W(θ) + B_awp diag(m) A_awp`` (Eq. 6 with the rank mask of Fig. 4). timm's ViT fuses q/k/v in one
``qkv`` Linear; ``splits=3`` gives q, k and v their own rank-r factors on the three output slices (PEFT's separate
q/k/v adapters). The AWP factors are non-persistent buffers: never in ``parameters()`` (so never in an optimizer)
nor in a ``state_dict``.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "inject_lora", "merge_lora", "lora_modules", "lora_parameters"]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, splits: int = 1, awp_rank: int = 0):
        super().__init__()
        if base.out_features % splits:
            raise ValueError(f"out_features {base.out_features} not divisible by splits {splits}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.splits, self.scaling = rank, splits, alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(splits * rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(splits, self.out_features // splits, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: A random, B zero => delta 0
        self.awp_rank = awp_rank
        self.register_buffer("awp_A", torch.zeros(awp_rank, self.in_features, device=dev, dtype=dt), persistent=False)
        self.register_buffer("awp_B", torch.zeros(self.out_features, awp_rank, device=dev, dtype=dt), persistent=False)
        self.register_buffer("awp_mask", torch.zeros(awp_rank, device=dev, dtype=dt), persistent=False)
        self.awp_enabled = False
        # LAR-AWP's full-rank gradient: while ``awp_record`` is set, a forward keeps ``(input, output)`` in
        # ``awp_io``; dL/dW is then ``grad(L, output)^T input`` over the tokens (lar_awp.py), with no gradient
        # ever accumulated into the frozen base weight
        self.awp_record = False
        self.awp_io: tuple[torch.Tensor, torch.Tensor] | None = None

    def lora_delta(self) -> torch.Tensor:
        """``s·B A`` as a dense ``(out, in)`` matrix (block-diagonal in B when split)."""
        A = self.lora_A.view(self.splits, self.rank, self.in_features)
        return (torch.einsum("sor,sri->soi", self.lora_B, A).reshape(self.out_features, self.in_features)
                * self.scaling)

    def awp_delta(self) -> torch.Tensor:
        return (self.awp_B * self.awp_mask) @ self.awp_A

    @property
    def weight(self) -> torch.Tensor:
        """The layer's effective weight ``W0 + s·BA`` (+ the AWP branch while active), for code that reads a Linear's
        ``weight`` instead of calling it (open_clip reads ``mlp.c_fc.weight.dtype`` for its cast dtype)."""
        w = self.base.weight + self.lora_delta()
        return w + self.awp_delta() if self.awp_enabled and self.awp_rank else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(x, self.lora_A)  # (..., splits*rank)
        h = h.view(*h.shape[:-1], self.splits, self.rank)
        y = y + torch.einsum("...sr,sor->...so", h, self.lora_B).reshape(y.shape) * self.scaling
        if self.awp_enabled and self.awp_rank:
            y = y + F.linear(F.linear(x, self.awp_A) * self.awp_mask, self.awp_B)
        if self.awp_record:
            self.awp_io = (x, y)
        return y

    def merged_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.lora_delta())
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def inject_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, split_qkv: bool = True,
                awp_rank: int = 0) -> list[str]:
    """Wrap every ``nn.Linear`` whose qualified name matches a glob in ``targets``; return the wrapped names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(fnmatch.fnmatchcase(n, t) for t in targets)]
    if not names:
        raise ValueError(f"no nn.Linear matches LoRA targets {targets}")
    inside_mha = [n for n in names if isinstance(model.get_submodule(n.rpartition(".")[0]) if "." in n else model,
                                                 nn.MultiheadAttention)]
    if inside_mha:  # it passes out_proj.weight to F.multi_head_attention_forward: the adapter's forward never runs
        raise ValueError(f"LoRA target {inside_mha[0]} is inside an nn.MultiheadAttention, which reads its weights "
                         "directly")
    for n in names:
        base = model.get_submodule(n)
        splits = 3 if (split_qkv and n.endswith("qkv")) else 1
        _set(model, n, LoRALinear(base, rank, alpha, splits=splits, awp_rank=awp_rank))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain Linear holding ``W0 + s·BA`` (in place); returns ``model``."""
    for n, m in list(lora_modules(model).items()):
        _set(model, n, m.merged_linear())
    return model
