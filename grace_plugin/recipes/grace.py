"""GRACE: Gram-aligned Robustness via Adaptive Curvature Estimation (arXiv 2603.27139).

Paper: Chopra et al., "The Geometry of Robustness: Optimizing Loss Landscape Curvature and Feature Manifold
Alignment for Robust Finetuning of Vision-Language Models", CVPR 2026, https://arxiv.org/abs/2603.27139.
Threat model: l_inf, eps 4/255 (training PGD-10, step 1/255; evaluation APGD-CE).

One step (Sec. 3 and Algorithm 1):
  1. ``x_adv`` = PGD on the current model (input gradients only; no parameter gradients are accumulated).
  2. ``f_ID, f_Adv`` from the clean and adversarial forwards; ``L_task = CE(head(f_ID), y)``.
  3. LAR-AWP: on layers whose curvature rank r is > 0, a rank-r branch ``Δ_W = B_awp diag(m) A_awp`` maximises
     ``CE(head(f(x_adv)), y)`` under ``||Δ_W||_F <= ρ_W`` (default: the top-r singular directions of dL/dW, the
     first-order worst case; or the paper-literal factor ascent, ``awp_ascent``); the first ascent gradient reuses
     the step-2 forward (with ``B_awp = 0`` the branch adds nothing, so that forward *is* the unperturbed one).
  4. ``f_AWP`` under the frozen ``Δ*``; ``L_LAR = CE(head(f_AWP), y)``.
  5. ``L_GV = mean_i sqrt(det(G_i + εI))`` over ``(f_ID, f_Adv, f_AWP)``.
  6. ``L = L_task + λ_LAR L_LAR + λ_GV L_GV``; only the LoRA factors train; the text head is frozen.
  Every ``curvature_interval`` steps the diagonal Gauss-Newton curvature of each adapted W is measured, EMA'd and
  turned into AWP ranks by the percentile rule (the curvature curriculum).

Components, switched by config (how Table 8's ablation rows are built without another recipe; README "Recipes"):
  * LoRA: always on (``lora`` must be true); every row of Table 8 fine-tunes the adapters.
  * ``awp``: ``curriculum`` (GRACE), ``uniform`` (one rank for every layer, Table 8 "uniform rank"), ``zero``
    (``L_LAR`` at ``ρ = 0``: the adversarial CE without weight perturbation, ``f_AWP = f_Adv``; the row that
    isolates the perturbation) or ``off`` (no ``L_LAR`` term, no ``f_AWP``); the component is ``lar_awp.LarAwp``.
  * ``gram_volume``: the ``L_GV`` term over ``(f_ID, f_Adv, f_AWP)``; with ``awp: off`` it is the two-view volume of
    ``(f_ID, f_Adv)``. ``lambda_lar: 0`` keeps GRACE's three-view volume without the ``L_LAR`` term (Table 8's
    "+ GV only" on the testbed).
  With ``awp: off`` and ``gram_volume: false`` the step is LoRA-FT with a frozen head (no attack is run).
  Logged every step: ``gv_share`` (``λ_GV L_GV / L``), ``l_adv`` / ``l_lar`` / ``delta_l`` (what Δ added to the
  adversarial loss), per-layer ``awp_rel`` (||Δ||/||W||) and ``awp_cos`` (cosine with dL/dW), and the curriculum's
  cumulative ``awp_rank_updates`` / ``awp_rank_changes``; ``summary()`` (saved in checkpoint.json) has the run's
  totals and mean GV share.

Args: see ``GraceConfig``; each value the paper leaves open is a field with a comment saying so.

Example:
    grace train --recipe grace --init runs/pretrained --data data/id --out runs/grace --steps 300 \\
        --set recipe.lora_rank=8 --set recipe.curvature_interval=50
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import checked
from ..losses import gram_volume, pairwise_cosines
from .adversarial import AdvConfig, AdversarialRecipe, attack_steps
from .base import StepOutput, register_recipe
from .lar_awp import ASCENTS, AWP_MODES, LarAwp
from ..vqa.model import rows

__all__ = ["GraceConfig", "Grace", "GraceFastConfig", "GraceFast", "GraceLiteConfig", "GraceLite", "awp_rows"]


@dataclass
class GraceConfig(AdvConfig):
    """The training attack comes from ``AdvConfig`` (PGD-10, l_inf 4/255, step 1/255, GRACE Sec. 6.1)."""

    lora: bool = checked(True, choices=(True,))  # GRACE trains LoRA adapters on the frozen vision tower (Sec. 3, Eq. 5)
    # --- components (Table 8 ablation) ------------------------------------------------------------------------
    awp: str = checked("curriculum", choices=lambda: AWP_MODES)  # curriculum | uniform | zero | off
    gram_volume: bool = True  # the L_GV term of Eq. 4
    # --- LAR-AWP (Sec. 3, Eqs. 6-7) ---------------------------------------------------------------------------
    awp_rank_max: int = 4  # Table 10 (as quoted by github.com/amashkk/grace)
    rank_percentiles: list[float] = field(default_factory=lambda: [20.0, 80.0])  # φ_AWP = 80; bottom 20% -> 0
    rank_levels: list[int] = field(default_factory=lambda: [0, 2, 4])  # middle band not stated; our choice r_max/2
    # ρ is not stated in the paper; 5e-3 relative is AWP's γ (Wu et al., arXiv 2004.05884, Sec. 4: ||v_l|| <= γ ||w_l||)
    rho: float = checked(5e-3, gt=0.0)
    # Projection norm not stated. "relative": ||Δ_W||_F <= ρ ||W(θ)||_F per layer (AWP-style relative radius);
    # "absolute": ||Δ_W||_F <= ρ per layer.
    rho_mode: str = checked("relative", choices=("relative", "absolute"))
    # Ascent not specified beyond "gradient ascent on (A_AWP, B_AWP)" (Alg. 1 l. 9-12): "svd" takes the top-r
    # singular directions of the layer's gradient (the first-order worst case); "factor" is the paper-literal factor
    # ascent from a random A (lar_awp.py; measured against each other in docs/recipes.md)
    awp_ascent: str = checked("svd", choices=lambda: ASCENTS)
    awp_steps: int = checked(1, ge=1)  # T_AWP not stated ("several steps"); our default 1
    awp_lr: float = 1.0  # η as a fraction of the layer radius per normalised-gradient step (AWP-style)
    # f_AWP on x_adv (Eq. 7: joint input and weight worst case) or "clean"; not stated
    awp_input: str = checked("adv", choices=("adv", "clean"))
    # --- curvature curriculum (App. E.1) ----------------------------------------------------------------------
    curvature_interval: int = 1000  # K = 1000 iterations
    curvature_beta: float = 0.9  # β in [0.85, 0.95]
    # Our choice (the paper fixes K and β for a ~250k-step run): > 0 scales them with the run length, see lar_awp.py.
    curvature_updates: int = 0  # > 0: K = total_steps / curvature_updates
    curvature_memory: float = 0.0  # > 0: β such that the EMA time constant is this fraction of the run
    # "true" (empirical Fisher) or "sampled" (Gauss-Newton-Bartlett); not stated
    curvature_labels: str = checked("true", choices=("true", "sampled"))
    # --- objective (Eq. 4) ------------------------------------------------------------------------------------
    lambda_lar: float = 1.0  # not stated; our default 1.0
    lambda_gv: float = 1.0  # not stated; our default 1.0
    # "small" (Eq. 9); our default 1e-6. > 0: it bounds the volume's gradient at alignment (losses.gram_volume)
    gram_eps: float = checked(1e-6, gt=0.0)
    # gradients through all three embeddings ("all") or not through f_ID ("adv_awp")
    gv_grad: str = checked("all", choices=("all", "adv_awp"))
    # Our addition (not in the paper): the f_AWP view, L_LAR and L_GV on this fraction of the batch only (chosen by
    # global sample index, ``awp_rows``; batches are shuffled), an unbiased estimate of both means at a fraction of
    # the AWP view's forward and backward. 1.0 (default) is the paper's objective.
    awp_fraction: float = checked(1.0, gt=0.0, le=1.0)
    # Diagnostic (not in the paper): every this many steps, log each weighted term's gradient norm over the trained
    # parameters and its share of the step's gradient (losses.gradient_shares: gnorm_*, gshare_task/lar/gv); one
    # extra backward per term on those steps. 0: never
    grad_terms_every: int = checked(0, ge=0)


def awp_rows(n: int, fraction: float, sample_index=None, device=None):
    """(rows of the AWP view, normaliser of its per-sample sums) for a local batch of ``n``.

    A sample is in the view when its *global* index ``i`` in the step (``ctx.sample_index``; 0..n-1 outside the
    trainer) satisfies ``floor((i + 1) f) > floor(i f)``: a fraction ``f`` of every run of indices, the same samples
    whatever the number of processes. Sums are divided by ``f * n`` (the expected count) rather than by the local
    count, so that averaging over ranks gives the global estimate: ``sum over the view / (f * B)``, an unbiased
    estimate of the batch mean (a plain mean at ``f = 1``)."""
    if fraction >= 1.0:
        return torch.arange(n, device=device), float(n)
    i = sample_index.to(device) if sample_index is not None else torch.arange(n, device=device)
    keep = torch.floor((i + 1).double() * fraction) > torch.floor(i.double() * fraction)
    return torch.nonzero(keep).flatten(), fraction * n


@register_recipe("grace")
class Grace(AdversarialRecipe):
    Config = GraceConfig

    def __init__(self, model, cfg: GraceConfig):
        super().__init__(model, cfg)
        self.awp = LarAwp(model, cfg)
        self._gv_share_sum, self._gv_share_n = 0.0, 0

    def awp_rank(self) -> int:
        return self.cfg.awp_rank_max if self.cfg.awp in ("uniform", "curriculum") else 0

    @property
    def needs_adv(self) -> bool:
        """The adversarial view is used by L_LAR (through f_AWP) or by L_GV; LoRA-FT alone runs no attack."""
        return self.cfg.awp != "off" or self.cfg.gram_volume

    # ------------------------------------------------------------------------------------------- the step
    def attack(self, x, y, ctx):
        return super().attack(x, y, ctx) if self.needs_adv else x.detach()

    def adversarial_loss(self, x, x_adv, y, ctx):
        with self.awp.branch(ctx):  # the branch at B_awp = 0 adds nothing: the forwards below are the unperturbed ones
            return self.objective(x, x_adv, y, ctx)

    def objective(self, x, x_adv, y, ctx, f_id=None, first_grads=None):
        """Eq. 4 inside ``awp.branch()``. ``f_id``: the clean feature when the caller already has it (its graph saw
        the branch at ``B_awp = 0``); ``first_grads``: the first AWP ascent gradient when the caller already has it
        (``LarAwp.perturbed_features``)."""
        cfg, model = self.cfg, self.model
        awp_on = cfg.awp != "off"
        logs: dict[str, float] = {}
        # Two forwards rather than one over [x; x_adv]: the first ascent step back-propagates through the
        # adversarial graph alone, which a concatenated graph would make twice as expensive.
        # the forward of the AWP view's input is recorded: the first ascent step differentiates through it
        with ctx.autocast():
            if f_id is None:
                with self.awp.record(awp_on and cfg.awp_input == "clean"):
                    f_id = model.encode(x).float()
            with self.awp.record(awp_on and cfg.awp_input == "adv"):
                f_adv = model.encode(x_adv).float() if self.needs_adv else None
        l_task = F.cross_entropy(model.head(f_id), y)
        f_awp = None
        # the AWP view's rows (all by default) and the normaliser of its sums: world-invariant (awp_rows)
        idx, norm = awp_rows(x.shape[0], cfg.awp_fraction, getattr(ctx, "sample_index", None), x.device)
        if awp_on:
            x_awp, f_first = (x_adv, f_adv) if cfg.awp_input == "adv" else (x, f_id)
            with rows(idx):  # a VQA model's bound questions follow the rows (grace_plugin/vqa/model.py)
                f_awp, awp_logs = self.awp.perturbed_features(x_awp[idx], y[idx], f_first[idx], ctx,
                                                              first_grads=first_grads, loss_norm=norm)
            logs.update(awp_logs)
        loss = l_task
        if awp_on:
            with rows(idx):
                l_lar = F.cross_entropy(model.head(f_awp), y[idx], reduction="sum") / norm
            loss = loss + cfg.lambda_lar * l_lar
            logs.update(l_lar=float(l_lar.detach()), delta_l=float(l_lar.detach()) - logs["l_adv"])
        if cfg.gram_volume:
            f_id_gv = f_id if cfg.gv_grad == "all" else f_id.detach()
            # at weight 0 the volume is logged only: no graph, so nothing of it can reach the step's gradient
            with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.lambda_gv != 0):
                if awp_on:
                    l_gv = gram_volume(f_id_gv[idx], f_adv[idx], f_awp, cfg.gram_eps).sum() / norm
                else:
                    l_gv = gram_volume(f_id_gv, f_adv, None, cfg.gram_eps).mean()
            if cfg.lambda_gv != 0:
                loss = loss + cfg.lambda_gv * l_gv
            share = float((cfg.lambda_gv * l_gv).detach() / loss.detach().abs().clamp_min(1e-12))
            logs.update(l_gv=float(l_gv.detach()), gv_share=share)
            self._gv_share_sum, self._gv_share_n = self._gv_share_sum + share, self._gv_share_n + 1
        if f_adv is not None:
            c_ia, c_iw, c_aw = pairwise_cosines(f_id[idx], f_adv[idx], f_awp if f_awp is not None else f_adv[idx])
            logs.update(cos_id_adv=c_ia)
            if f_awp is not None:
                logs.update(cos_id_awp=c_iw, cos_adv_awp=c_aw)
        logs.update(l_task=float(l_task.detach()), awp_layers=float(len(self.awp.active()) if awp_on else 0),
                    **self.awp.counters())
        every = cfg.grad_terms_every
        if every and torch.is_grad_enabled() and getattr(ctx, "step", 0) % every == 0:
            terms = {"task": l_task, "lar": cfg.lambda_lar * l_lar if awp_on else None,
                     "gv": cfg.lambda_gv * l_gv if cfg.gram_volume and cfg.lambda_gv != 0 else None}
            logs.update(self._gradient_shares({k: v for k, v in terms.items() if v is not None}))
        return loss, logs

    def _gradient_shares(self, terms: dict) -> dict[str, float]:
        """``losses.gradient_shares`` of the weighted terms over the trained parameters (graphs kept for the step)."""
        from ..losses import gradient_shares

        params = self.trainable_parameters()
        grads = {t: list(torch.autograd.grad(v, params, retain_graph=True, allow_unused=True))
                 for t, v in terms.items() if v.requires_grad}
        return gradient_shares(grads) if grads else {}

    def pass_counts(self) -> dict[str, float]:
        """PGD: k forward+input-backward (none without an adversarial view); clean (and adversarial) forwards; with
        AWP the f_AWP forward and the ascent backward (the first reuses a forward), plus extra ascent steps; the
        final backward through each graph (clean, adv, AWP). The curvature measurement (every K steps) is amortised
        and not counted."""
        c = self.cfg
        k = attack_steps(c.pgd_eps, c.pgd_steps) if self.needs_adv else 0
        views = 1 + self.needs_adv
        if c.awp in ("off", "zero"):  # zero: L_LAR is the head on f_Adv, no pass of its own
            return {"forward": k + views, "input_backward": k, "backward": views}
        t, phi = c.awp_steps, c.awp_fraction  # the first ascent backward runs through the whole adversarial graph
        return {"forward": k + views + phi * t, "input_backward": k, "backward": 1 + phi * (t - 1) + views + phi}

    # ------------------------------------------------------------------------------------------ curriculum
    def after_step(self, batch, ctx):
        return self.awp.after_step(batch, ctx)

    def summary(self) -> dict:
        out = self.awp.summary()
        if self._gv_share_n:
            out["gv_share_mean"] = self._gv_share_sum / self._gv_share_n
        return out

    def state_dict(self) -> dict:
        return self.awp.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.awp.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- grace_fast
@dataclass
class GraceFastConfig(GraceConfig):
    pgd_steps: int = 1  # one attack step instead of PGD-10 (the cheaper schedule)
    pgd_alpha: float = 1.25 * 4 / 255  # Wong et al. 2020: step 1.25 eps from a random start
    pgd_random_start: bool = True  # required: without it a single step is FGSM, which overfits sooner


@register_recipe("grace_fast")
class GraceFast(Grace):
    """GRACE with a one-step training attack: the cheaper schedule (GRACE's cost claim, about 5x vanilla FT).

    The paper reports GRACE at about 5x the cost of vanilla fine-tuning, which its PGD-10 training attack cannot
    reach: ``bench/step_cost.py`` measures full GRACE at several times that per FT step, most of it the ten attack
    passes (the measured ratios: docs/results/index.md, the step-cost pages). This
    schedule keeps everything else of GRACE (LoRA, LAR-AWP with the curvature curriculum, Gram volume, and the
    component switches) and replaces PGD-10 by one random-start step of size 1.25 eps, the "fast adversarial
    training" attack of Wong, Rice and Kolter (ICLR 2020, https://arxiv.org/abs/2001.03994). That paper's caveat
    applies: single-step training can overfit catastrophically (robust accuracy against multi-step attacks collapsing
    late in training); evaluate with APGD-CE, as ``grace eval`` does, not with the training attack.

    Threat model: l_inf, eps 4/255 (training FGSM with random start, step 5/255; evaluation APGD-CE).
    Args: those of ``GraceConfig``; only the attack defaults differ (``pgd_steps`` 1, ``pgd_alpha`` 1.25 * 4/255).
    Step cost and testbed effect: docs/step_cost.md "Step cost". It lives in this module (not its own) so that no recipe
    module imports another.

    Example:
        grace train --recipe grace_fast --init runs/pretrained --data data/id --out runs/grace_fast --steps 300
    """

    Config = GraceFastConfig


# ---------------------------------------------------------------------------------------------- grace_lite
@dataclass
class GraceLiteConfig(GraceConfig):
    # one attack step (0: no attack, as eps 0); k > 1 runs k steps from the noisy start, the last one sharing its
    # backward with the first ascent (a point on the cost/robustness frontier above one step;
    # docs/step_cost.md "Step cost")
    pgd_steps: int = checked(1, ge=0)
    pgd_alpha: float = 4 / 255  # N-FGSM (arXiv 2206.03098) Sec. 4: step alpha = eps
    noise: float = checked(2.0, ge=0.0)  # N-FGSM: start noise U[-k eps, k eps], k = 2
    project: bool = False  # N-FGSM does not clip the perturbation back to the eps-ball (only to [0, 1])
    # where the attack's one gradient is taken: "noisy" (x + noise: N-FGSM's point, one extra forward) or "clean"
    # (the clean forward of L_task, which the step runs anyway: no extra forward; the noise is added after the step)
    attack_grad: str = checked("noisy", choices=("noisy", "clean"))
    # the AWP view on a random half of each batch: with it the step is <= 3x an ft step (docs/step_cost.md "Step cost")
    awp_fraction: float = checked(0.5, gt=0.0, le=1.0)


@register_recipe("grace_lite")
class GraceLite(Grace):
    """GRACE with one noisy attack step whose backward also gives the first LAR-AWP ascent gradient.

    Full GRACE spends 10 of its ~13 passes on PGD-10 and one more backward on the first AWP ascent step
    (``Grace.pass_counts``). This schedule keeps Eq. 4's objective, LoRA, LAR-AWP with the curvature curriculum
    and the Gram volume, and changes only how ``x_adv`` and the first ascent direction are found:

    * the attack is N-FGSM (de Jorge et al., "Make Some Noise: Reliable and Efficient Single-Step Adversarial
      Training", NeurIPS 2022, https://arxiv.org/abs/2206.03098, Alg. 1): ``x_adv = clip_[0,1](x + η + α sign(g))``
      with ``η ~ U[-kε, kε]``, ``k = 2``, ``α = ε`` and no projection onto the ε-ball, the single-step schedule that
      paper found free of catastrophic overfitting without GradAlign's double backward (arXiv 2007.02617);
    * pass sharing: the attack's one backward, taken with the LAR-AWP branch
      enabled at ``B_awp = 0``, returns the gradient w.r.t. the input *and* w.r.t. ``B_awp``; the latter is the
      first ascent direction (GRACE Alg. 1 l. 9 takes it at ``x_adv``; here it is taken at the attack's point, one
      signed step away). With ``attack_grad: clean`` the gradient is taken at the clean forward that ``L_task``
      needs anyway (FGSM at x, then the noise), saving one more forward;
    * the AWP view, ``L_LAR`` and ``L_GV`` on a random half of each batch (``awp_fraction: 0.5``, an unbiased
      estimate of both means; 1.0 is GRACE's full view).

    Passes per step (``pass_counts``), with the default half AWP view: ``noisy`` 3.5 forwards, 1 input backward, 2.5
    backwards; ``clean`` 2.5, 1, 2.5 (GRACE with PGD-10: 13, 10, 4; ``grace_fast``: 4, 1, 4). Threat model:
    l_inf, eps 4/255 (training N-FGSM; evaluation APGD-CE). Args: those of ``GraceConfig`` plus ``noise``,
    ``project``, ``attack_grad`` and the ``awp_fraction`` default 0.5; ``awp_steps`` > 1 adds ascent steps as in
    GRACE; ``noise=1.0, pgd_alpha=1.25 eps, project=True`` makes the step RS-FGSM (Wong et al. 2020,
    https://arxiv.org/abs/2001.03994) with the same passes. Step cost and testbed effect (including where one step
    keeps much less of GRACE's robustness than PGD): docs/step_cost.md "Step cost". It lives in this module (not its
    own) so that no recipe module imports another.

    Example:
        grace train --recipe grace_lite --init runs/pretrained --data data/id --out runs/grace_lite --steps 300
    """

    Config = GraceLiteConfig

    def __init__(self, model, cfg: GraceLiteConfig):
        if cfg.attack_grad == "clean" and cfg.pgd_steps > 1:
            from ..errors import UsageError

            raise UsageError("grace_lite: recipe.attack_grad clean takes the one attack step's gradient at the clean "
                             f"forward; it needs recipe.pgd_steps 1, got {cfg.pgd_steps}")
        super().__init__(model, cfg)

    def training_step(self, batch, ctx):
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        with self.awp.branch(ctx):
            x_adv, f_id, first_grads = self._attack(x, y, ctx)
            loss, logs = self.objective(x, x_adv, y, ctx, f_id=f_id, first_grads=first_grads)
        return StepOutput(loss, {"loss": float(loss.detach()), **logs})

    def _attack(self, x, y, ctx):
        """(x_adv, the clean feature if the attack computed it, the first ascent gradient or None)."""
        from ..rng import per_sample_uniform

        c, model = self.cfg, self.model
        if not (self.needs_adv and self.attack_passes()):
            return x.detach(), None, None
        eps = c.pgd_eps
        # the ascent gradient is shared only when the AWP view is taken on the attacked input (Eq. 7)
        share = c.awp != "off" and c.awp_input == "adv"
        noise = per_sample_uniform(x, -c.noise * eps, c.noise * eps, ctx, "attack_start") if c.noise else 0.0

        def signed_step(start, g):  # one step from ``start`` (projected onto the eps-ball with ``project``)
            delta = start.detach() - x + c.pgd_alpha * g.sign()
            return (x + (delta.clamp(-eps, eps) if c.project else delta)).clamp(0, 1).detach()

        f_id = None
        if c.attack_grad == "clean":
            point = x.detach().requires_grad_(True)
            with ctx.autocast(), self.awp.record(share or (c.awp != "off" and c.awp_input == "clean")):
                f_id = model.encode(point).float()
            params = self.awp.ascent_parameters() if share else []
            grads = torch.autograd.grad(F.cross_entropy(model.head(f_id), y), [point, *params], retain_graph=True)
            x_adv = signed_step(x + noise, grads[0])
        else:  # k steps from the noisy start; the last one's backward also gives the ascent gradient
            k, x_adv = self.attack_passes(), (x + noise).clamp(0, 1)
            for i in range(k):
                point = x_adv.detach().requires_grad_(True)
                last = i == k - 1
                with ctx.autocast(), self.awp.record(share and last):
                    loss = F.cross_entropy(model(point).float(), y)
                params = self.awp.ascent_parameters() if share and last else []
                grads = torch.autograd.grad(loss, [point, *params])
                x_adv = signed_step(point, grads[0])
        return x_adv, f_id, (list(grads[1:]) if share and self.awp.active() else None)

    def pass_counts(self) -> dict[str, float]:
        c = self.cfg
        base = dict(super().pass_counts())
        if not (self.needs_adv and self.attack_passes()):
            return base
        if c.awp != "off" and c.awp_input == "adv":
            base["backward"] -= 1  # the first ascent gradient came with the attack's backward
        if c.attack_grad == "clean":
            base["forward"] -= 1  # the attack's gradient came from the clean forward
        return base
