"""Proximity-aware Adam variants from FRAMES-VQA and DiGraP: FTP, SPD and DiGraP.

Sources: DiGraP, arXiv 2502.15895 (Algorithm 1); the FRAMES-VQA code (arXiv 2505.21755), github.com/
chengyuehuang511/FRAMES-VQA files ``optimizer/ftp.py``, ``optimizer/adamh.py``, ``runners/runner_robust_ft.py``.

Hand-written because none is in timm (timm's ``adamp`` is Heo et al.'s norm-projection AdamP, unrelated to FTP's
"AdamP") nor in torch. All three are Adam on each parameter tensor plus a per-tensor rule tying the weights to an
anchor ``θ0`` (the weights at construction, or zero for LoRA factors as in
FRAMES-VQA's ``runners/runner_robust_ft.py``):

* ``FTP`` (Tian et al., NeurIPS 2023, https://arxiv.org/abs/2310.19182): after the Adam(W) proposal ``θ̃``, project
  every row of ``c = θ̃ - θ0`` onto an l1 ball of a learned per-tensor radius γ: ``θ = θ0 + clamp(γ/n_r, 0, 1) c_r``.
* ``SPD`` (Tian, Huang, Kira, NeurIPS 2024, https://arxiv.org/abs/2411.01713): after a plain Adam step, on tensors
  whose condition ``g·(θ0-θ) < 0`` holds, pull back ``θ̃ <- θ̃ - λ r (θ̃ - θ0)`` with
  ``r = clamp((||θ̃-θ0|| - ||θ-θ0||)/||θ̃-θ0||, 0, 1)``.
* ``DiGraP`` (Huang et al., ICLR 2025, https://arxiv.org/abs/2502.15895, Algorithm 1): when the task gradient
  conflicts with the proximity gradient ``θ - θ0``, remove a trainable fraction ω of its component along it before
  the Adam moments; ω is learned per tensor by hyper-gradient descent with its own Adam.

Each optimizer keeps its anchors and hyper-state in ``self.state`` so ``state_dict()`` (and the trainer's resume)
carries them. The projection maths are pure functions (``ftp_project``, ``spd_project``, ``digrap_direction``).
"""
from __future__ import annotations

import math

import torch

__all__ = ["FTP", "SPD", "DiGraP", "ftp_project", "ftp_row_norms", "spd_project", "digrap_direction"]


# ------------------------------------------------------------------------------------------------ pure maths
def ftp_row_norms(c: torch.Tensor) -> torch.Tensor:
    """FTP's "MARS" norm: l1 norm over all dims but the first (one value per row; a 1-D tensor has scalar rows)."""
    return c.reshape(c.shape[0], -1).abs().sum(1) + 1e-8 if c.dim() else c.abs().reshape(1) + 1e-8


def ftp_project(anchor: torch.Tensor, proposal: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """``θ0 + clamp(γ/n_r, 0, 1) (θ̃ - θ0)`` row-wise: every row's l1 distance to the anchor is at most γ."""
    c = proposal - anchor
    if c.dim() == 0:
        return anchor + torch.clamp(gamma / (c.abs() + 1e-8), 0, 1) * c
    scale = torch.clamp(gamma / ftp_row_norms(c), 0, 1)
    return anchor + scale.view(-1, *([1] * (c.dim() - 1))) * c


def spd_project(anchor: torch.Tensor, prev: torch.Tensor, proposal: torch.Tensor, lam: float) -> torch.Tensor:
    """SPD's projection decay ``θ̃ - λ r (θ̃ - θ0)``, ``r = clamp((||θ̃-θ0|| - ||θ-θ0||)/||θ̃-θ0||, 0, 1)``.

    For ``λ = 1`` and ``r`` in (0, 1) the result is exactly as far from the anchor as ``prev`` was.
    """
    d_new = proposal - anchor
    n_new, n_old = d_new.norm(), (prev - anchor).norm()
    r = torch.clamp((n_new - n_old) / (n_new + 1e-12), 0, 1)
    return proposal - lam * r * d_new


def digrap_direction(g1: torch.Tensor, g2: torch.Tensor,
                     omega: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DiGraP's projected gradient (Eqs. 3-7) for one tensor; returns ``(g, g_proj_applied)``.

    ``g_proj = (g1·g2/||g2||²) g2``; if ``g1·g2 >= 0`` (no conflict) ``g = g1`` and nothing was projected,
    else ``g = g1 - ω g_proj``.
    """
    dot = (g1 * g2).sum()
    n2 = (g2 * g2).sum()
    if n2 <= 0 or dot >= 0:
        return g1, torch.zeros_like(g1)
    g_proj = (dot / n2) * g2
    return g1 - omega * g_proj, g_proj


# -------------------------------------------------------------------------------------------- shared Adam
def _hyper_adam_init(state: dict, key: str, device) -> None:
    """Zero moments ``<key>_m``, ``<key>_v`` and step count ``<key>_t`` for a scalar hyper-parameter's own Adam."""
    state[f"{key}_m"] = torch.zeros((), device=device)
    state[f"{key}_v"] = torch.zeros((), device=device)
    state[f"{key}_t"] = 0


def _hyper_adam_step(state: dict, key: str, hg: torch.Tensor, betas, lr: float) -> torch.Tensor:
    """One Adam step on a scalar hyper-parameter (FTP's γ, DiGraP's ω) with hyper-gradient ``hg``: updates the
    moments under ``key`` and returns the step to subtract (bias-corrected, eps 1e-8; no host sync)."""
    b1, b2 = betas
    state[f"{key}_t"] += 1
    t = state[f"{key}_t"]
    m, v = state[f"{key}_m"], state[f"{key}_v"]
    m.mul_(b1).add_(hg, alpha=1 - b1)
    v.mul_(b2).add_(hg * hg, alpha=1 - b2)
    return lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + 1e-8)


class _AnchoredAdam(torch.optim.Optimizer):
    """Adam(W) with a per-tensor anchor; subclasses hook into the step. ``anchor``: "init" (the weights now) or
    "zero" (per param group; FRAMES-VQA's choice for LoRA factors)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 anchor: str = "init", **extra):
        if anchor not in ("init", "zero"):
            raise ValueError(f"anchor must be 'init' or 'zero', got {anchor!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, anchor=anchor,
                                      **extra))
        for group in self.param_groups:
            for p in group["params"]:
                a = torch.zeros_like(p) if group["anchor"] == "zero" else p.detach().clone()
                self.state[p]["anchor"] = a

    @staticmethod
    def _adam_update(p, g, state, group) -> torch.Tensor:
        """Update Adam moments with ``g``; return the step ``d`` (including decoupled weight decay): θ̃ = θ - d."""
        b1, b2 = group["betas"]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
        d = (group["lr"] / (1 - b1 ** t)) * m / denom
        if group["weight_decay"]:
            d = d + group["lr"] * group["weight_decay"] * p.detach()
        return d

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._param_step(p, p.grad.detach(), self.state[p], group)
        return loss

    def _param_step(self, p, g, state, group) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _mean_state(self, key: str) -> float | None:
        vals = [float(s[key]) for s in self.state.values() if key in s]
        return sum(vals) / len(vals) if vals else None

    def stats(self) -> dict[str, float]:
        """Per-step logs: the mean of the per-tensor hyper-state (γ, ω, or the fraction SPD selected)."""
        return {}


# --------------------------------------------------------------------------------------------------- FTP
class FTP(_AnchoredAdam):
    """Fast Trainable Projection on AdamW (FRAMES-VQA ``optimizer/ftp.py`` "AdamP"; arXiv 2310.19182).

    Args:
        k: annealing factor for positive γ hyper-gradients (``adamp_k`` in ``optimizer/ftp.py``, e.g. 0.5).
        mu: learning rate of γ's internal Adam (1e-2 in ``optimizer/ftp.py``).
        gamma_init: initial radius (1e-8 in ``optimizer/ftp.py``).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, anchor="init",
                 k: float = 0.5, mu: float = 1e-2, gamma_init: float = 1e-8):
        super().__init__(params, lr, betas, eps, weight_decay, anchor, k=k, mu=mu, gamma_init=gamma_init)

    def _param_step(self, p, g, state, group) -> None:
        anchor = state["anchor"]
        if "gamma" not in state:
            state["gamma"] = torch.tensor(float(group["gamma_init"]), device=p.device)
            _hyper_adam_init(state, "g", p.device)
        elif "c_prev" in state:
            # ∂θ_{t-1}/∂γ = c_{t-1}/n_{t-1} row-wise (where the projection was active): Σ_r g_r·c_r / n_r
            c_prev, n_prev = state["c_prev"], state["n_prev"]
            hg = (g * c_prev).reshape(c_prev.shape[0] if c_prev.dim() else 1, -1).sum(1) / n_prev
            hg = hg.sum()
            hg = torch.where(hg > 0, hg * group["k"], hg)  # no host sync
            state["gamma"] = state["gamma"] - _hyper_adam_step(state, "g", hg, group["betas"], group["mu"])
        proposal = p.detach() - self._adam_update(p, g, state, group)
        c = proposal - anchor
        n = ftp_row_norms(c)
        state["gamma"] = torch.minimum(state["gamma"].clamp(min=1e-8), n.max())
        state["c_prev"], state["n_prev"] = c, n
        p.copy_(ftp_project(anchor, proposal, state["gamma"]))

    def stats(self) -> dict[str, float]:
        v = self._mean_state("gamma")
        return {} if v is None else {"ftp_gamma_mean": v}


# --------------------------------------------------------------------------------------------------- SPD
class SPD(_AnchoredAdam):
    """Selective Projection Decay on Adam (FRAMES-VQA ``optimizer/adamh.py`` "AdamH"; arXiv 2411.01713).

    Args:
        lam: projection-decay strength λ (the FRAMES-VQA code passes its weight_decay here).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, anchor="init",
                 lam: float = 1.0):
        super().__init__(params, lr, betas, eps, weight_decay, anchor, lam=lam)

    def _param_step(self, p, g, state, group) -> None:
        anchor = state["anchor"]
        prev = p.detach().clone()
        proposal = prev - self._adam_update(p, g, state, group)
        cond = (g * (anchor - prev)).sum()  # optimizer/adamh.py: c_t = g·(θ0 - θ); decay only where c_t < 0
        state["selected"] = bool(cond < 0)
        if state["selected"]:
            proposal = spd_project(anchor, prev, proposal, group["lam"])
        p.copy_(proposal)

    def stats(self) -> dict[str, float]:
        v = self._mean_state("selected")
        return {} if v is None else {"spd_selected_frac": v}


# ------------------------------------------------------------------------------------------------ DiGraP
class DiGraP(_AnchoredAdam):
    """Adam with trainable layer-wise directional gradient projection (DiGraP, arXiv 2502.15895, Algorithm 1).

    Args:
        mu: learning rate of the strengths' internal Adam (prototype: 1e-2).
        trainable: learn ω by hyper-gradient; False keeps ω = ``strength`` (the prototype's fixed mode).
        strength: the initial (trainable) or fixed ω; Alg. 1 starts at 0.
        normalize: Alg. 1 applies a "Normalization" to the hyper-gradient, not spelled out in the text. Our
            choice: "cosine" divides ``α g1_t·g_proj_{t-1}`` by ``||g1_t|| ||g_proj_{t-1}||``, "none" leaves it raw.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, anchor="init",
                 mu: float = 1e-2, trainable: bool = True, strength: float = 0.0, normalize: str = "cosine"):
        if normalize not in ("cosine", "none"):
            raise ValueError(f"normalize must be 'cosine' or 'none', got {normalize!r}")
        super().__init__(params, lr, betas, eps, weight_decay, anchor, mu=mu, trainable=trainable,
                         strength=strength, normalize=normalize)

    def _param_step(self, p, g1, state, group) -> None:
        if "omega" not in state:
            state["omega"] = torch.tensor(float(group["strength"]), device=p.device)
            _hyper_adam_init(state, "w", p.device)
        elif group["trainable"] and "g_proj_prev" in state:
            # θ_t = θ_{t-1} - α(g1 - ω g_proj) => ∂L(θ_t)/∂ω = α_{t-1} g1_t·g_proj_{t-1} (Baydin hyper-gradient)
            gp = state["g_proj_prev"]
            hg = state["lr_prev"] * (g1 * gp).sum()
            if group["normalize"] == "cosine":
                hg = hg / (g1.norm() * gp.norm() + 1e-12)
            step = _hyper_adam_step(state, "w", hg, group["betas"], group["mu"])
            state["omega"] = (state["omega"] - step).clamp(0.0, 1.0)
        g, g_proj = digrap_direction(g1, p.detach() - state["anchor"], state["omega"])
        state["g_proj_prev"], state["lr_prev"] = g_proj, float(group["lr"])
        p.sub_(self._adam_update(p, g, state, group))

    def stats(self) -> dict[str, float]:
        v = self._mean_state("omega")
        return {} if v is None else {"digrap_omega_mean": v}
