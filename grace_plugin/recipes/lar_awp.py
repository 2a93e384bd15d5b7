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

The ascent (``ascent``; the paper's Alg. 1 l. 9-12 ascends the factors but states neither their init nor η):

* ``"svd"`` (default): the first step is the rank-r matrix that maximises the first-order loss increase
  ``<G_W, Δ>`` under ``||Δ||_F <= ρ_W``, i.e. the top-r singular directions of the layer's full-rank gradient
  ``G_W`` scaled to the bound (``perturbation.low_rank_ascent``): adversarial from the first step. Further steps
  (``awp_steps`` > 1) are projected ascent, ``Δ <- P_r,ρ(Δ + η ρ_W G_W / ||G_W||)``.
* ``"factor"``: the paper-literal factor ascent: a random orthonormal ``A_awp``, ``B_awp = 0``, normalised gradient
  steps on the factors (B first; both from the second step), projection by rescaling. With one step ``Δ`` is the
  gradient projected on a random rank-r subspace.

``G_W = sum over tokens of grad(L, y)^T x`` is taken from the module's recorded input and output
(``LoRALinear.awp_io``), so no gradient is ever accumulated into the frozen weights. Logged per step: per-layer
``||Δ||/||W||`` (``awp_rel/<layer>``, mean ``awp_rel``), the cosine of ``Δ*`` with ``G_W`` (``awp_cos/<layer>``,
mean ``awp_cos``) and the unperturbed adversarial loss ``l_adv`` (the recipe adds ``L_LAR`` and ``ΔL``).
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F

from ..curvature import allocate_ranks, ema_update, layer_curvature
from ..models.lora import lora_modules
from ..perturbation import awp_branch, low_rank_ascent, low_rank_projection

__all__ = ["LarAwp", "AWP_MODES", "ASCENTS", "curriculum_schedule", "full_rank_gradient"]

# off: no L_LAR term; zero: L_LAR on the unperturbed adversarial view (rho = 0: every layer at rank 0, so f_AWP is
# f_Adv and no pass is added); uniform: one rank for every layer; curriculum: ranks from curvature (GRACE)
AWP_MODES = ("off", "zero", "uniform", "curriculum")
ASCENTS = ("svd", "factor")


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


def full_rank_gradient(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``dL/dW`` of a linear layer ``y = x W^T`` from its input ``x`` (..., in) and ``grad_out = dL/dy`` (..., out):
    ``sum over the leading dims of grad_out^T x`` (out x in, float32)."""
    return grad_out.reshape(-1, grad_out.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()


def _ce(logits: torch.Tensor, y: torch.Tensor, norm: float | None) -> torch.Tensor:
    """The CE's mean, or its sum over ``norm`` (a subset of the batch: ``grace.awp_rows``)."""
    return F.cross_entropy(logits, y) if norm is None else F.cross_entropy(logits, y, reduction="sum") / norm


class LarAwp:
    """The LAR-AWP branch of the LoRA layers of ``model.visual`` and its rank map (curriculum or uniform).

    ``cfg`` carries ``awp``, ``awp_rank_max``, ``rank_percentiles``, ``rank_levels``, ``rho``, ``rho_mode``,
    ``awp_ascent``, ``awp_steps``, ``awp_lr``, ``curvature_interval``, ``curvature_beta``, ``curvature_updates``,
    ``curvature_memory`` and ``curvature_labels`` (``GraceConfig``).
    """

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        # the layers ``model.encode`` runs: the image tower (a CoCa's ``feature_tower``; its text side runs in the head)
        self.layers = lora_modules(getattr(model, "feature_tower", model.visual))
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
        """Per layer: ``B_awp = 0`` (the branch adds nothing until the ascent), the rank mask, and for the factor
        ascent a random orthonormal ``A_awp`` drawn from (seed, step) under the trainer (rng.py), so every rank draws
        the same branch."""
        from ..rng import step_generator

        radii = {}
        factor = self.cfg.awp_ascent == "factor"
        gen = step_generator(ctx, "awp_init", next(iter(active.values())).base.weight.device) \
            if active and factor else None
        for n, m in active.items():
            r = self.ranks[n]
            if factor:
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
    def _ascend_factors(self, active: dict, radii: dict, grads: dict, update_a: bool) -> None:
        """Factor ascent: normalised steps on the factors, then projection of each ``Δ_W`` onto its radius (new
        tensors, so graphs that saved the old factors stay valid)."""
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

    @torch.no_grad()
    def _ascend_svd(self, active: dict, radii: dict, full: dict, first: bool, ctx) -> None:
        """SVD ascent: the first step is ``low_rank_ascent`` of ``G_W``; later ones step along ``G_W`` by
        ``η ρ_W`` and project back onto rank ``r`` and the radius (``low_rank_projection``)."""
        from ..rng import step_generator

        gen = step_generator(ctx, "awp_svd", next(iter(active.values())).base.weight.device)
        for n, m in active.items():
            r, g = self.ranks[n], full[n]
            if first:
                b, a = low_rank_ascent(g, r, radii[n], gen)
            else:
                step = self.cfg.awp_lr * radii[n] * g / (g.norm() + 1e-12)
                b, a = low_rank_projection(m.awp_delta().float() + step, r, radii[n], gen)
            new_b, new_a = torch.zeros_like(m.awp_B), torch.zeros_like(m.awp_A)
            new_b[:, :r], new_a[:r] = b.to(new_b.dtype), a.to(new_a.dtype)
            m.awp_A, m.awp_B = new_a, new_b

    @contextlib.contextmanager
    def branch(self, ctx=None):
        """Context: the active layers' branch enabled from ``B_awp = 0`` (the model is unchanged until
        ``perturbed_features`` ascends it); on exit disabled and reset. ``ctx``: the trainer's step context (the
        initial direction is drawn from (seed, step))."""
        active = self.active()
        with awp_branch(active.values()):
            self._active, self._radii = active, self._init_branch(active, ctx)
            self._grad_inputs: list[torch.Tensor] = []
            try:
                yield self
            finally:
                self._grad_inputs = []

    @contextlib.contextmanager
    def record(self, on: bool = True):
        """Context (inside ``branch()``): the forwards run in it keep each active layer's input and output, the
        last one winning; ``ascent_parameters()`` then returns those outputs. ``on=False`` does nothing."""
        layers = list(self._active.values()) if on else []
        for m in layers:
            m.awp_record = True
        try:
            yield
        finally:
            for m in layers:
                m.awp_record = False

    def ascent_parameters(self) -> list[torch.Tensor]:
        """The outputs of the active layers in the last forward run under ``record()``: the first ascent step needs
        the loss's gradient w.r.t. them. A recipe that back-propagates through such a forward anyway can ask for
        these gradients in the same backward and hand them to ``perturbed_features`` (``first_grads``)."""
        missing = [n for n, m in self._active.items() if m.awp_io is None]
        if missing:
            raise RuntimeError(f"LAR-AWP: no recorded forward for {missing[:3]}; run the forward of the AWP view's "
                               "input inside LarAwp.record()")
        self._grad_inputs = [m.awp_io[0] for m in self._active.values()]  # G_W pairs these with the outputs
        return [m.awp_io[1] for m in self._active.values()]

    def _full_gradients(self, grads_out: list[torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        """``G_W`` per active layer from the gradients w.r.t. the recorded outputs, averaged over ranks (the ascent
        direction is a whole-batch statistic: 1 process == N processes)."""
        full = [full_rank_gradient(x.detach(), g) for x, g in zip(self._grad_inputs, grads_out)]
        return dict(zip(self._active, ctx.all_reduce_mean(full)))

    def perturbed_features(self, x_awp: torch.Tensor, y: torch.Tensor, f_first: torch.Tensor, ctx,
                           first_grads: list[torch.Tensor] | None = None,
                           loss_norm: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``f_AWP`` (inside ``branch()``): ascend ``Δ`` for ``awp_steps`` steps on ``CE(head(f), y)``, the first
        from ``f_first`` (the unperturbed feature of ``x_awp``, from a forward run under ``record()`` at
        ``B_awp = 0``), or from ``first_grads`` (the gradient of a CE w.r.t. ``ascent_parameters()`` the caller
        already computed), then the forward of ``x_awp`` under the frozen ``Δ*``. With no active layer ``W_pert =
        W``: ``f_first`` is returned. ``loss_norm``: the ascent CE is the sum over the rows divided by it (a subset
        of the batch, ``awp_rows``), else their mean. Logs ``l_adv`` (the unperturbed CE), ``awp_rel`` and
        ``awp_cos`` (module docstring)."""
        model, active, radii = self.model, self._active, self._radii
        l_adv = float(_ce(model.head(f_first.detach()), y, loss_norm).detach())  # (a trained head has a graph)
        if not active:
            return f_first, {"l_adv": l_adv}
        if first_grads is None:
            loss_p = _ce(model.head(f_first), y, loss_norm)
            first_grads = torch.autograd.grad(loss_p, self.ascent_parameters(), retain_graph=True)
        full = self._full_gradients(list(first_grads), ctx)
        svd = self.cfg.awp_ascent == "svd"
        if svd:
            self._ascend_svd(active, radii, full, True, ctx)
        else:  # dL/dB_awp = G_W A^T (masked): y gains ((x A^T) m) B^T
            g_b = {n: ((full[n] @ m.awp_A.detach().float().t()) * m.awp_mask, None) for n, m in active.items()}
            self._ascend_factors(active, radii, g_b, update_a=False)
        for _ in range(self.cfg.awp_steps - 1):
            with self.record(svd), ctx.autocast():
                logits = model(x_awp).float()
            loss_p = _ce(logits, y, loss_norm)
            if svd:
                g = torch.autograd.grad(loss_p, self.ascent_parameters())
                self._ascend_svd(active, radii, self._full_gradients(list(g), ctx), False, ctx)
            else:
                params = [t for m in active.values() for t in (m.awp_B, m.awp_A)]
                g = ctx.all_reduce_mean(torch.autograd.grad(loss_p, params))
                self._ascend_factors(active, radii, {n: (g[2 * i], g[2 * i + 1]) for i, n in enumerate(active)},
                                     update_a=True)
        for m in active.values():  # Δ* is a constant in the outer step (AWP/SAM practice)
            m.awp_A, m.awp_B = m.awp_A.detach(), m.awp_B.detach()
            m.awp_io = None  # the recorded activations are not needed any more
        self._grad_inputs = []
        with ctx.autocast():
            f_awp = model.encode(x_awp).float()
        return f_awp, {"l_adv": l_adv, **self._diagnostics(active, full)}

    @torch.no_grad()
    def _diagnostics(self, active: dict, full: dict) -> dict[str, float]:
        """Per layer ``||Δ*||_F / ||W||_F`` and ``cos(Δ*, G_W)``, and their means over the active layers."""
        logs, rel, cos = {}, [], []
        for n, m in active.items():
            d = m.awp_delta().float()
            w = float((m.base.weight + m.lora_delta()).float().norm())
            dn, gn = float(d.norm()), float(full[n].norm())
            rel.append(dn / w if w else 0.0)
            cos.append(float((d * full[n]).sum()) / (dn * gn) if dn and gn else 0.0)
            logs[f"awp_rel/{n}"], logs[f"awp_cos/{n}"] = rel[-1], cos[-1]
        logs.update(awp_rel=sum(rel) / len(rel), awp_cos=sum(cos) / len(cos),
                    awp_norm=sum(float(m.awp_delta().norm()) for m in active.values()) / len(active))
        return logs

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
