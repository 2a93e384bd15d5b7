"""GRACE: Gram-aligned Robustness via Adaptive Curvature Estimation (spec §1).

Paper: Chopra et al., "The Geometry of Robustness: Optimizing Loss Landscape Curvature and Feature Manifold
Alignment for Robust Finetuning of Vision-Language Models", CVPR 2026, https://arxiv.org/abs/2603.27139.
Threat model: l_inf, eps 4/255 (training PGD-10, step 1/255; evaluation APGD-CE).

One step (spec §1.d, Algorithm 1):
  1. ``x_adv`` = PGD on the current model (input gradients only; no parameter gradients are accumulated).
  2. ``f_ID, f_Adv`` from the clean and adversarial forwards; ``L_task = CE(head(f_ID), y)``.
  3. LAR-AWP: on layers whose curvature rank is > 0, a low-rank branch ``Δ_W = B_awp diag(m) A_awp`` is ascended
     on ``CE(head(f(x_adv)), y)`` and projected on ``||Δ_W||_F <= ρ_W``; the first ascent gradient reuses the
     step-2 forward (with ``B_awp = 0`` the branch adds nothing, so that forward *is* the unperturbed one).
  4. ``f_AWP`` under the frozen ``Δ*``; ``L_LAR = CE(head(f_AWP), y)``.
  5. ``L_GV = mean_i sqrt(det(G_i + εI))`` over ``(f_ID, f_Adv, f_AWP)``.
  6. ``L = L_task + λ_LAR L_LAR + λ_GV L_GV``; only the LoRA factors train; the text head is frozen.
  Every ``curvature_interval`` steps the diagonal Gauss-Newton curvature of each adapted W is measured, EMA'd and
  turned into AWP ranks by the percentile rule (the curvature curriculum).

Args: see ``GraceConfig``; each value the paper leaves open is a field with a comment citing the spec section.

Example:
    grace train --recipe grace --init runs/pretrained --data data/id --out runs/grace --steps 300 \\
        --set recipe.lora_rank=8 --set recipe.curvature_interval=50
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..curvature import allocate_ranks, ema_update, layer_curvature
from ..losses import gram_volume, pairwise_cosines
from ..models.lora import lora_modules
from ..perturbation import awp_branch
from .base import Recipe, RecipeConfig, StepContext, StepOutput, register_recipe

__all__ = ["GraceConfig", "Grace", "pgd_attack", "attack_steps"]


@dataclass
class GraceConfig(RecipeConfig):
    lora: bool = True  # spec §1.0: GRACE trains LoRA adapters on the frozen vision tower
    # --- training attack (spec §1.c, Sec. 6.1: PGD-10, l_inf 4/255, step 1/255) -----------------------------
    pgd_eps: float = 4 / 255
    pgd_alpha: float = 1 / 255
    pgd_steps: int = 10
    pgd_random_start: bool = True  # spec §1.c [INF]: random start in the eps-ball
    # --- LAR-AWP (spec §1.a) ---------------------------------------------------------------------------------
    awp_rank_max: int = 4  # Table 10 via [RI]
    rank_percentiles: list[float] = field(default_factory=lambda: [20.0, 80.0])  # φ_AWP = 80; bottom 20% -> 0
    rank_levels: list[int] = field(default_factory=lambda: [0, 2, 4])  # middle band not stated; [RI]: r_max/2
    rho: float = 0.05  # spec §1.a: value not stated ([RI] 0.05)
    # spec §1.a/§7 q2: projection norm not stated. "relative": ||Δ_W||_F <= ρ ||W(θ)||_F per layer (AWP-style
    # relative radius, recommended [INF]); "absolute": ||Δ_W||_F <= ρ per layer.
    rho_mode: str = "relative"
    awp_steps: int = 1  # T_AWP not stated ("several steps"); [RI] uses 1
    awp_lr: float = 1.0  # η as a fraction of the layer radius per normalised-gradient step (AWP-style)
    awp_input: str = "adv"  # spec §7 q4: f_AWP on x_adv (Alg. 1 l.13 via [RI]) or "clean"
    # --- curvature curriculum (spec §1.a, App. E.1) ----------------------------------------------------------
    curvature_interval: int = 1000  # K = 1000 iterations
    curvature_beta: float = 0.9  # β in [0.85, 0.95]
    curvature_labels: str = "true"  # spec §7 q3: "true" (empirical Fisher) or "sampled" (Gauss-Newton-Bartlett)
    # --- objective (spec §1.d, Eq. 4) ------------------------------------------------------------------------
    lambda_lar: float = 1.0  # not stated; [RI] 1.0
    lambda_gv: float = 1.0  # not stated; [RI] 1.0
    gram_eps: float = 1e-6  # spec §1.b: "small"; [RI] 1e-6
    gv_grad: str = "all"  # spec §1.b: gradients through all three embeddings ("all") or not through f_ID ("adv_awp")


def attack_steps(eps: float, steps: int) -> int:
    """The attack steps ``pgd_attack`` (and FARE's embedding attack) actually run: none when eps or steps is 0."""
    return steps if eps > 0 and steps > 0 else 0


_PGD_FROM = None


def _pgd_from_class():
    """torchattacks' ``PGD`` whose random start is given (``start_noise``) instead of drawn from the global RNG, so
    it can come from per-sample generators (grace_plugin/rng.py); otherwise torchattacks' forward line for line."""
    global _PGD_FROM
    if _PGD_FROM is None:
        import torchattacks

        class PGDFrom(torchattacks.PGD):
            start_noise: torch.Tensor | None = None

            def forward(self, images, labels):  # torchattacks/attacks/pgd.py PGD.forward, untargeted
                images = images.clone().detach().to(self.device)
                labels = labels.clone().detach().to(self.device)
                adv = images.clone().detach()
                if self.start_noise is not None:
                    adv = torch.clamp(adv + self.start_noise.to(adv), min=0, max=1).detach()
                for _ in range(self.steps):
                    adv.requires_grad = True
                    cost = F.cross_entropy(self.get_logits(adv), labels)
                    grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
                    adv = adv.detach() + self.alpha * grad.sign()
                    delta = torch.clamp(adv - images, min=-self.eps, max=self.eps)
                    adv = torch.clamp(images + delta, min=0, max=1).detach()
                return adv

        _PGD_FROM = PGDFrom
    return _PGD_FROM


def pgd_attack(model, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
               random_start: bool = True, autocast=None, ctx: StepContext | None = None) -> torch.Tensor:
    """l_inf PGD on the CE of ``model`` (Eq. 19) in [0,1] pixel space via torchattacks; parameters get no grads.

    With a trainer ``ctx`` the random start of sample ``i`` comes from ``(seed, step, global index of i)``
    (grace_plugin/rng.py): the same start whatever the number of processes the batch is split over."""
    import contextlib

    import torchattacks

    from ..rng import per_sample_uniform

    if not attack_steps(eps, steps):
        return x.detach()
    if ctx is not None and ctx.sample_index is not None:
        atk = _pgd_from_class()(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
        atk.start_noise = per_sample_uniform(x, -eps, eps, ctx, "attack_start") if random_start else None
    else:
        atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    atk.set_device(x.device)
    with (autocast or contextlib.nullcontext)():
        return atk(x, y).detach()


@register_recipe("grace")
class Grace(Recipe):
    Config = GraceConfig

    def __init__(self, model, cfg: GraceConfig):
        if not cfg.lora:
            raise ValueError("grace: recipe.lora must be true (LAR-AWP lives in the LoRA subspace, spec §1.a)")
        if cfg.awp_input not in ("adv", "clean") or cfg.rho_mode not in ("relative", "absolute"):
            raise ValueError("grace: recipe.awp_input must be adv|clean and recipe.rho_mode relative|absolute")
        if cfg.curvature_labels not in ("true", "sampled") or cfg.gv_grad not in ("all", "adv_awp"):
            raise ValueError("grace: recipe.curvature_labels must be true|sampled and recipe.gv_grad all|adv_awp")
        super().__init__(model, cfg)
        self.layers = lora_modules(model.visual)
        self.curvature: dict[str, float] = {}
        self.ranks: dict[str, int] = {n: 0 for n in self.layers}  # Alg. 1 l.2: r_AWP <- 0

    def awp_rank(self) -> int:
        return self.cfg.awp_rank_max

    # ----------------------------------------------------------------------------------------------- AWP
    def _radius(self, m) -> float:
        if self.cfg.rho_mode == "absolute":
            return self.cfg.rho
        with torch.no_grad():
            return self.cfg.rho * float((m.base.weight + m.lora_delta()).float().norm())

    def _init_branch(self, active: dict, ctx: StepContext | None = None) -> dict:
        """A random orthonormal A per layer; one draw per step, from (seed, step) under the trainer (rng.py)."""
        from ..rng import step_generator

        radii = {}
        gen = step_generator(ctx, "awp_init", self.layers[next(iter(active))].base.weight.device) if active else None
        for n, m in active.items():
            r = self.ranks[n]
            g = torch.randn(m.in_features, m.awp_rank, device=m.base.weight.device, generator=gen)
            q, _ = torch.linalg.qr(g)  # orthonormal rows: ||B M A||_F = ||B M||_F
            m.awp_A = q.t().contiguous().to(m.base.weight.dtype).requires_grad_(True)
            m.awp_B = torch.zeros_like(m.awp_B).requires_grad_(True)
            mask = torch.zeros_like(m.awp_mask)
            mask[:r] = 1
            m.awp_mask = mask
            radii[n] = self._radius(m)
        return radii

    @torch.no_grad()
    def _ascend(self, active: dict, radii: dict, grads: dict, update_a: bool) -> None:
        """Normalised ascent on the factors, then projection of each ``Δ_W`` onto its radius (new tensors, so
        graphs that saved the old factors stay valid)."""
        lr = self.cfg.awp_lr
        for n, m in active.items():
            g_b, g_a = grads[n]
            b = m.awp_B.detach() + lr * radii[n] * g_b / (g_b.norm() + 1e-12)
            a = m.awp_A.detach()
            if update_a and g_a is not None:
                a = a + lr * a.norm() * g_a / (g_a.norm() + 1e-12)
            d = float(((b * m.awp_mask) @ a).float().norm())
            if d > radii[n] > 0:
                b = b * (radii[n] / d)
            m.awp_A, m.awp_B = a.requires_grad_(True), b.requires_grad_(True)

    # ------------------------------------------------------------------------------------------- the step
    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        cfg, model = self.cfg, self.model
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        x_adv = pgd_attack(model, x, y, cfg.pgd_eps, cfg.pgd_alpha, cfg.pgd_steps, cfg.pgd_random_start,
                           ctx.autocast, ctx)
        active = {n: m for n, m in self.layers.items() if self.ranks.get(n, 0) > 0}
        logs: dict[str, float] = {}
        with awp_branch(active.values()):
            radii = self._init_branch(active, ctx)
            # Two forwards rather than one over [x; x_adv]: the first ascent step below back-propagates through the
            # adversarial graph alone, which a concatenated graph would make twice as expensive.
            with ctx.autocast():
                f_id, f_adv = model.encode(x).float(), model.encode(x_adv).float()
            l_task = F.cross_entropy(model.head(f_id), y)
            x_awp = x_adv if cfg.awp_input == "adv" else x
            if active:
                # First ascent step from B_awp = 0: the forward above is the unperturbed one.
                f_first = f_adv if cfg.awp_input == "adv" else f_id
                loss_p = F.cross_entropy(model.head(f_first), y)
                params = [m.awp_B for m in active.values()]
                # the ascent direction is a whole-batch statistic: averaged over ranks (1 process == N processes)
                g = ctx.all_reduce_mean(torch.autograd.grad(loss_p, params, retain_graph=True))
                self._ascend(active, radii, {n: (gb, None) for n, gb in zip(active, g)}, update_a=False)
                for _ in range(cfg.awp_steps - 1):
                    with ctx.autocast():
                        loss_p = F.cross_entropy(model(x_awp).float(), y)
                    params = [t for m in active.values() for t in (m.awp_B, m.awp_A)]
                    g = ctx.all_reduce_mean(torch.autograd.grad(loss_p, params))
                    self._ascend(active, radii, {n: (g[2 * i], g[2 * i + 1]) for i, n in enumerate(active)},
                                 update_a=True)
                for m in active.values():  # Δ* is a constant in the outer step (AWP/SAM practice, spec §1.a)
                    m.awp_A, m.awp_B = m.awp_A.detach(), m.awp_B.detach()
                with ctx.autocast():
                    f_awp = model.encode(x_awp).float()
                logs["awp_norm"] = sum(float(m.awp_delta().norm()) for m in active.values()) / len(active)
            else:  # all ranks 0: W_pert = W, so f_AWP is the unperturbed feature of the same input
                f_awp = f_adv if cfg.awp_input == "adv" else f_id
        l_lar = F.cross_entropy(model.head(f_awp), y)
        f_id_gv = f_id if cfg.gv_grad == "all" else f_id.detach()
        l_gv = gram_volume(f_id_gv, f_adv, f_awp, cfg.gram_eps).mean()
        loss = l_task + cfg.lambda_lar * l_lar + cfg.lambda_gv * l_gv
        c_ia, c_iw, c_aw = pairwise_cosines(f_id, f_adv, f_awp)
        logs.update(loss=float(loss.detach()), l_task=float(l_task.detach()), l_lar=float(l_lar.detach()),
                    l_gv=float(l_gv.detach()), cos_id_adv=c_ia, cos_id_awp=c_iw, cos_adv_awp=c_aw,
                    awp_layers=float(len(active)))
        return StepOutput(loss, logs)

    def pass_counts(self) -> dict[str, float]:
        """PGD: k forward+input-backward; clean and adversarial forwards; f_AWP forward; ascent backward (the first
        reuses the adversarial forward); extra ascent steps; final backward through the clean, adv and AWP graphs.
        The curvature measurement (every K steps) is amortised and not counted."""
        k, t = attack_steps(self.cfg.pgd_eps, self.cfg.pgd_steps), self.cfg.awp_steps
        return {"forward": k + 2 + 1 + (t - 1), "input_backward": k, "backward": 1 + (t - 1) + 3}

    # ------------------------------------------------------------------------------------------ curvature
    def measure_curvature(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        """Eq. 28 on one mini-batch: gradient w.r.t. each adapted *full* weight W (= grad of its frozen base)."""
        weights = [m.base.weight for m in self.layers.values()]
        for w in weights:
            w.requires_grad_(True)
        try:
            with ctx.autocast():
                logits = self.model(x).float()
            if self.cfg.curvature_labels == "sampled":
                y = self._sampled_labels(logits.detach(), ctx)
            # the gradient of the whole batch's mean loss: averaged over ranks, over the global batch size
            grads = ctx.all_reduce_mean(torch.autograd.grad(F.cross_entropy(logits, y), weights))
        finally:
            for w in weights:
                w.requires_grad_(False)
        return {n: layer_curvature(g, x.shape[0] * ctx.world) for n, g in zip(self.layers, grads)}

    @staticmethod
    def _sampled_labels(logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """One label per sample from its predictive distribution, drawn from that sample's generator (rng.py)."""
        from ..rng import per_sample_uniform

        u = per_sample_uniform(logits[:, :1].float(), 0.0, 1.0, ctx, "curvature_labels")  # inverse-CDF sampling
        cdf = torch.softmax(logits.float(), -1).cumsum(-1)
        return torch.searchsorted(cdf, u).clamp(max=logits.shape[1] - 1).squeeze(1)

    def after_step(self, batch: dict, ctx: StepContext) -> dict[str, float]:
        if ctx.step % self.cfg.curvature_interval:
            return {}
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        fresh = self.measure_curvature(x, y, ctx)
        self.curvature = ema_update(self.curvature, fresh, self.cfg.curvature_beta)
        self.ranks = allocate_ranks(self.curvature, tuple(self.cfg.rank_percentiles), tuple(self.cfg.rank_levels))
        logs = {f"curv/{n}": v for n, v in self.curvature.items()}
        logs.update({f"rank/{n}": float(r) for n, r in self.ranks.items()})
        return logs

    def state_dict(self) -> dict:
        return {"curvature": dict(self.curvature), "ranks": dict(self.ranks)}

    def load_state_dict(self, state: dict) -> None:
        self.curvature = dict(state.get("curvature", {}))
        self.ranks = {n: int(state.get("ranks", {}).get(n, 0)) for n in self.layers}
