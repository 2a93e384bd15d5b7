"""LAR-AWP, GRACE's layer-wise adaptive low-rank adversarial weight perturbation, as a component a recipe owns.

GRACE (arXiv 2603.27139) Sec. 3 / Eqs. 6-7 and Algorithm 1 lines 8-13: on every adapted layer whose AWP rank is
> 0, a branch ``Δ_W = B_awp diag(m) A_awp`` inside the LoRA subspace is ascended on the CE of the perturbed model and
projected on ``||Δ_W||_F <= ρ_W``; ``f_AWP`` is then the feature under the frozen ``Δ*``. The rank map comes from
``mode``:

* ``"curriculum"`` (GRACE): every ``interval`` steps the diagonal Gauss-Newton curvature of each adapted W is
  measured (App. E.1 Eq. 28), EMA'd (Eq. 29) and turned into ranks by the percentile rule; ranks start at 0
  (Alg. 1 l.2).
* ``"uniform"`` (Table 8's "+ LAR-AWP, uniform rank"): every adapted layer gets ``rank_levels[1]`` from step 0, the
  curriculum's mean rank under the default 20/60/20 bands (our choice: the paper does not state the uniform rank), so
  the two rows spend the same perturbation capacity on average.

Scaling with run length (our choice, not the paper's): the paper updates every K = 1000 steps with β = 0.9 over a
50-epoch ImageNet run (about 250k steps at batch 256): 250 updates and an EMA time constant of 10 updates, 4% of the
run. A few-hundred-step run with K = 50 and β = 0.9 makes 6 updates and keeps 59% of its weight on the first one, so
the ranks never change. ``updates`` > 0 sets ``K = total_steps / updates``; ``memory`` > 0 sets β so that the EMA's
time constant ``1/(1-β)`` spans that fraction of the run (``updates: 250, memory: 0.04`` reproduce the paper's
proportions at any length). How often the ranks changed is counted (``rank_updates``, ``rank_changes``).
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F

from ..curvature import allocate_ranks, ema_update, layer_curvature
from ..models.lora import lora_modules
from ..perturbation import awp_branch

__all__ = ["LarAwp", "AWP_MODES", "curriculum_schedule"]

AWP_MODES = ("off", "uniform", "curriculum")


def curriculum_schedule(total_steps: int, interval: int, beta: float, updates: int = 0,
                        memory: float = 0.0) -> tuple[int, float]:
    """The curriculum's (interval, beta) for a run of ``total_steps``: as given, or scaled with the run length
    (``updates`` curvature updates; an EMA time constant of ``memory`` of the run)."""
    if updates > 0:
        interval = max(1, total_steps // updates)
    if memory > 0:
        n = memory * total_steps / interval  # EMA time constant in updates
        beta = 1.0 - 1.0 / n if n > 1 else 0.0
    return interval, beta


def _ce(logits: torch.Tensor, y: torch.Tensor, norm: float | None) -> torch.Tensor:
    """The CE's mean, or its sum over ``norm`` (a subset of the batch: ``grace.awp_rows``)."""
    return F.cross_entropy(logits, y) if norm is None else F.cross_entropy(logits, y, reduction="sum") / norm


class LarAwp:
    """The LAR-AWP branch of the LoRA layers of ``model.visual`` and its rank map (curriculum or uniform).

    ``cfg`` carries ``awp``, ``awp_rank_max``, ``rank_percentiles``, ``rank_levels``, ``rho``, ``rho_mode``,
    ``awp_steps``, ``awp_lr``, ``curvature_interval``, ``curvature_beta``, ``curvature_updates``,
    ``curvature_memory`` and ``curvature_labels`` (``GraceConfig``).
    """

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.layers = lora_modules(model.visual)
        self.curvature: dict[str, float] = {}
        uniform = cfg.rank_levels[1] if cfg.awp == "uniform" else 0
        self.ranks: dict[str, int] = {n: uniform for n in self.layers}  # curriculum: Alg. 1 l.2, r_AWP <- 0
        self.rank_updates = 0  # curriculum allocations made
        self.rank_changes = 0  # layer ranks changed by allocations after the first
        self.rank_change_events = 0  # allocations after the first that changed at least one rank

    def active(self) -> dict:
        return {n: m for n, m in self.layers.items() if self.ranks.get(n, 0) > 0}

    # ------------------------------------------------------------------------------------------ the branch
    def _radius(self, m) -> float:
        if self.cfg.rho_mode == "absolute":
            return self.cfg.rho
        with torch.no_grad():
            return self.cfg.rho * float((m.base.weight + m.lora_delta()).float().norm())

    def _init_branch(self, active: dict, ctx=None) -> dict:
        """A random orthonormal A per layer; one draw per step, from (seed, step) under the trainer (rng.py), so
        every rank draws the same branch."""
        from ..rng import step_generator

        radii = {}
        gen = step_generator(ctx, "awp_init", next(iter(active.values())).base.weight.device) if active else None
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

    @contextlib.contextmanager
    def branch(self, ctx=None):
        """Context: the active layers' branch enabled from ``B_awp = 0`` (the model is unchanged until
        ``perturbed_features`` ascends it); on exit disabled and reset. ``ctx``: the trainer's step context (the
        initial direction is drawn from (seed, step))."""
        active = self.active()
        with awp_branch(active.values()):
            self._active, self._radii = active, self._init_branch(active, ctx)
            yield self

    def ascent_parameters(self) -> list[torch.Tensor]:
        """The ``B_awp`` factors of the active layers (inside ``branch()``): what the first ascent step moves. A
        recipe that already back-propagates through the model at ``B_awp = 0`` can ask for their gradient in the
        same backward and hand it to ``perturbed_features`` (``first_grads``)."""
        return [m.awp_B for m in self._active.values()]

    def perturbed_features(self, x_awp: torch.Tensor, y: torch.Tensor, f_first: torch.Tensor, ctx,
                           first_grads: list[torch.Tensor] | None = None,
                           loss_norm: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``f_AWP`` (inside ``branch()``): ascend ``Δ`` for ``awp_steps`` steps on ``CE(head(f), y)``, the first
        from ``f_first`` (the unperturbed feature of ``x_awp``, whose graph saw the branch at ``B_awp = 0``), or from
        ``first_grads`` (the gradient of a CE w.r.t. ``ascent_parameters()`` the caller already computed), then the
        forward of ``x_awp`` under the frozen ``Δ*``. With no active layer ``W_pert = W``: ``f_first`` is returned.
        ``loss_norm``: the ascent CE is the sum over the rows divided by it (a subset of the batch, ``awp_rows``),
        else their mean."""
        model, active, radii = self.model, self._active, self._radii
        if not active:
            return f_first, {}
        if first_grads is None:
            loss_p = _ce(model.head(f_first), y, loss_norm)
            first_grads = torch.autograd.grad(loss_p, self.ascent_parameters(), retain_graph=True)
        # the ascent direction is a whole-batch statistic: averaged over ranks (1 process == N processes)
        g = ctx.all_reduce_mean(first_grads)
        self._ascend(active, radii, {n: (gb, None) for n, gb in zip(active, g)}, update_a=False)
        for _ in range(self.cfg.awp_steps - 1):
            with ctx.autocast():
                logits = model(x_awp).float()
            loss_p = _ce(logits, y, loss_norm)
            params = [t for m in active.values() for t in (m.awp_B, m.awp_A)]
            g = ctx.all_reduce_mean(torch.autograd.grad(loss_p, params))
            self._ascend(active, radii, {n: (g[2 * i], g[2 * i + 1]) for i, n in enumerate(active)}, update_a=True)
        for m in active.values():  # Δ* is a constant in the outer step (AWP/SAM practice)
            m.awp_A, m.awp_B = m.awp_A.detach(), m.awp_B.detach()
        with ctx.autocast():
            f_awp = model.encode(x_awp).float()
        return f_awp, {"awp_norm": sum(float(m.awp_delta().norm()) for m in active.values()) / len(active)}

    # ------------------------------------------------------------------------------------------ curriculum
    def measure_curvature(self, x: torch.Tensor, y: torch.Tensor, ctx) -> dict[str, float]:
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
    def _sampled_labels(logits: torch.Tensor, ctx) -> torch.Tensor:
        """One label per sample from its predictive distribution, drawn from that sample's generator (rng.py)."""
        from ..rng import per_sample_uniform

        u = per_sample_uniform(logits[:, :1].float(), 0.0, 1.0, ctx, "curvature_labels")  # inverse-CDF sampling
        cdf = torch.softmax(logits.float(), -1).cumsum(-1)
        return torch.searchsorted(cdf, u).clamp(max=logits.shape[1] - 1).squeeze(1)

    def schedule(self, total_steps: int) -> tuple[int, float]:
        c = self.cfg
        return curriculum_schedule(total_steps, c.curvature_interval, c.curvature_beta, c.curvature_updates,
                                   c.curvature_memory)

    def after_step(self, batch: dict, ctx) -> dict[str, float]:
        """The curriculum: every ``interval`` steps, measure, EMA and re-allocate the ranks."""
        if self.cfg.awp != "curriculum":
            return {}
        interval, beta = self.schedule(ctx.total_steps)
        if ctx.step % interval:
            return {}
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        fresh = self.measure_curvature(x, y, ctx)
        self.curvature = ema_update(self.curvature, fresh, beta)
        ranks = allocate_ranks(self.curvature, tuple(self.cfg.rank_percentiles), tuple(self.cfg.rank_levels))
        if self.rank_updates:
            changed = sum(ranks[n] != self.ranks.get(n, 0) for n in ranks)
            self.rank_changes += changed
            self.rank_change_events += bool(changed)
        self.rank_updates += 1
        self.ranks = ranks
        logs = {f"curv/{n}": v for n, v in self.curvature.items()}
        logs.update({f"rank/{n}": float(r) for n, r in self.ranks.items()})
        logs.update(curriculum_interval=float(interval), curriculum_beta=beta)
        return logs

    def counters(self) -> dict[str, float]:
        """Cumulative curriculum counters (logged every step, so the last log line carries the totals)."""
        return {"awp_rank_updates": float(self.rank_updates), "awp_rank_changes": float(self.rank_changes),
                "awp_rank_change_events": float(self.rank_change_events)}

    def summary(self) -> dict:
        return {"awp": self.cfg.awp, **{k: int(v) for k, v in self.counters().items()},
                "rank_histogram": {str(r): n for r, n in sorted(Counter(self.ranks.values()).items())}}

    def state_dict(self) -> dict:
        return {"curvature": dict(self.curvature), "ranks": dict(self.ranks), **self.counters()}

    def load_state_dict(self, state: dict) -> None:
        self.curvature = dict(state.get("curvature", {}))
        default = self.cfg.rank_levels[1] if self.cfg.awp == "uniform" else 0
        self.ranks = {n: int(state.get("ranks", {}).get(n, default)) for n in self.layers}
        self.rank_updates = int(state.get("awp_rank_updates", 0))
        self.rank_changes = int(state.get("awp_rank_changes", 0))
        self.rank_change_events = int(state.get("awp_rank_change_events", 0))
