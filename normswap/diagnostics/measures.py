"""The measures of ``normswap diagnose``, as pure functions on tensors and streaming reducers.

Every reducer keeps a fixed number of float64 sums however many batches it sees, so a run's memory does not
grow with the data (a geometry reducer also keeps its last batch's ``n x n`` cosine matrix for the plot).

- **Affine divergence** (docs/methods.md section 1.1): one SGD step on ``z = W x + b`` moves ``z`` by
  ``-lr g (||x||^2 + 1)``; :func:`divergence_factor` gives that factor per sample (Linear: the last dim;
  ConvNd: per output location, ``||x||^2`` the receptive-field patch's squared norm), and
  :func:`effective_factor` what it becomes after a PatchNorm layer's correction ``m``: ``m^2 (n2 + 1)``
  (corrected form, the bias scaled too) or ``m^2 n2 + 1`` (normaliser forms). :class:`Moments` reduces them
  to a mean, coefficient of variation and max/min ratio.
- **Activation gains** (section 2.1): :class:`GainStats`, ``rho = E[f(X)^2] / Var[X]``, ``rho' = E[f'(X)^2]``
  and the normalising factor ``lam = sqrt((rho + rho') / (2 rho rho'))``.
- **Batch geometry** (section 4.2): :func:`batch_geometry` on post-activation features ``H`` (one row per
  sample): cosine matrix, odd sample, cluster tightness, odd orthogonality, norm ratio, effective rank of
  the centred Gram matrix, orthogonality gap; :class:`GeometryStats` averages them over batches.
- **UAN mixtures** (section 3.3): :class:`MixtureStats`, the log-likelihood gain of a UAN site's mixture
  over the best single Gaussian (K = 1) on the data, its priors and separation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normswap.variants.uan.em import mixture_loglik
from normswap.variants.anact.activations import apply_activation, derivative
from normswap.variants.patchnorm.layer import ConvGeometry, patch_sq_norm
from normswap.variants.base import Variant

__all__ = ["GEOMETRY_KEYS", "GainStats", "Geometry", "GeometryStats", "MixtureStats", "Moments", "batch_geometry",
           "cosine_matrix", "divergence_factor", "effective_factor", "effective_rank", "gram", "odd_index",
           "orthogonality_gap", "uan_summary"]

_F64 = torch.float64


# ---- streaming scalar statistics ---------------------------------------------------------------------
@dataclass
class Moments:
    """Count, mean, variance, min and max of every value seen, in float64 (:meth:`update` per batch).

    >>> m = Moments(); m.update(torch.tensor([1.0, 2.0, 3.0])); m.update(torch.tensor([6.0]))
    >>> m.mean, round(m.cv, 4), m.ratio
    (3.0, 0.7071, 6.0)
    """

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).to(_F64)
        if v.numel() == 0:
            return
        self.count += v.numel()
        self.total += float(v.sum())
        self.total_sq += float(v.square().sum())
        self.low, self.high = min(self.low, float(v.min())), max(self.high, float(v.max()))

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def var(self) -> float:
        """Population variance (clamped at 0 against rounding)."""
        return max(self.total_sq / self.count - self.mean ** 2, 0.0) if self.count else math.nan

    @property
    def cv(self) -> float:
        """Coefficient of variation, std / |mean| (NaN for a zero mean)."""
        return math.sqrt(self.var) / abs(self.mean) if self.count and self.mean != 0 else math.nan

    @property
    def ratio(self) -> float:
        """max / min (NaN unless every value is positive)."""
        return self.high / self.low if self.count and self.low > 0 else math.nan

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "cv": self.cv, "ratio": self.ratio, "min": self.low if self.count else math.nan,
                "max": self.high if self.count else math.nan, "count": self.count}


# ---- affine divergence --------------------------------------------------------------------------------
def divergence_factor(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``||x||^2 + 1`` for every sample (Linear: norm over the last dim) or every output location of every
    sample and group (ConvNd and PatchNormConv: the receptive-field patch, padding included)."""
    geom = _geometry(module)
    xs = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    n2 = patch_sq_norm(xs, geom) if geom is not None else xs.square().sum(dim=-1)
    return n2 + 1.0


def effective_factor(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The divergence factor a PatchNorm layer leaves at its current strength ``lam``, from its per-patch
    multiplier ``m`` (docs/methods.md sections 1.2, 1.3): ``m^2 (n2 + 1)`` for the corrected form
    (``m = 1 / sqrt(lam n2 + 1)``: exactly 1 at ``lam = 1``), ``m^2 n2 + 1`` for the ``l2`` / ``rms`` forms
    (``m = (1 - lam) + lam r / sqrt(n2 + eps)``; the bias is not rescaled there). Factors constant per channel
    (the gain, the scale that keeps the output's size) are left out: they move no sample against another.
    Any other layer: :func:`divergence_factor`."""
    form = getattr(module, "form", None)
    if not (isinstance(module, Variant) and form in ("corrected", "l2", "rms") and hasattr(module, "lam")):
        return divergence_factor(module, x)
    n2 = divergence_factor(module, x) - 1.0
    lam = float(module.current_strength())
    if form == "corrected":
        return (n2 + 1.0) / (lam * n2 + 1.0)
    geom = _geometry(module)
    size = geom.patch_size if geom is not None else x.shape[-1]
    r = math.sqrt(size) if form == "rms" else 1.0
    m = (1.0 - lam) + lam * r * torch.rsqrt(n2 + float(module.eps))
    return m.square() * n2 + 1.0


def _geometry(module: nn.Module) -> ConvGeometry | None:
    geom = getattr(module, "geom", None)
    if isinstance(geom, ConvGeometry):
        return geom
    return ConvGeometry.from_conv(module) if isinstance(module, nn.modules.conv._ConvNd) else None


# ---- activation gains (ANAct) ---------------------------------------------------------------------------
@dataclass
class GainStats:
    """Streaming ``rho``, ``rho'`` and ``lam`` of one activation ``kind`` (docs/methods.md section 2.1)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    n: int = 0
    sx: float = 0.0
    sxx: float = 0.0
    sff: float = 0.0
    sdd: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        """Add the pre-activations ``x`` (before the activation runs: in-place activations overwrite them)."""
        xs = x.detach().to(_F64)
        self.n += xs.numel()
        self.sx += float(xs.sum())
        self.sxx += float(xs.square().sum())
        self.sff += float(apply_activation(self.kind, self.params, xs).square().sum())
        self.sdd += float(derivative(self.kind, self.params, xs).square().sum())

    @property
    def rho(self) -> float:
        var = self.sxx / self.n - (self.sx / self.n) ** 2 if self.n else 0.0
        return (self.sff / self.n) / var if var > 0 else math.nan

    @property
    def rho_prime(self) -> float:
        return self.sdd / self.n if self.n else math.nan

    @property
    def lam(self) -> float:
        r, d = self.rho, self.rho_prime
        return math.sqrt((r + d) / (2 * r * d)) if r > 0 and d > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rho": self.rho, "rho_prime": self.rho_prime, "lam": self.lam}


# ---- batch geometry --------------------------------------------------------------------------------------
GEOMETRY_KEYS = ("tightness", "tightness_min", "odd_orthogonality", "norm_ratio", "effective_rank",
                 "orthogonality_gap")


@dataclass
class Geometry:
    """The batch geometry of one batch at one layer (docs/methods.md section 4.2)."""

    odd: int
    tightness: float
    tightness_min: float
    odd_orthogonality: float
    norm_ratio: float
    effective_rank: float
    orthogonality_gap: float
    cosine: torch.Tensor

    def values(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in GEOMETRY_KEYS}


def gram(h: torch.Tensor) -> torch.Tensor:
    """``H H^T`` (n x n, float64) of the rows of ``h`` (n, ...), multiplied in ``h``'s precision (at least
    float32): one matmul, and no float64 copy of a large feature map. Every geometry measure derives from it."""
    H = h.detach().reshape(h.shape[0], -1)
    H = H.to(torch.promote_types(H.dtype, torch.float32))
    return (H @ H.T).to(_F64)


def _cosine(g: torch.Tensor) -> torch.Tensor:
    norms = g.diagonal().clamp_min(0.0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return (g * inv[:, None] * inv[None, :]).clamp(-1.0, 1.0).fill_diagonal_(1.0)


def _effective_rank(g: torch.Tensor) -> float:
    gc = g - g.mean(dim=0, keepdim=True) - g.mean(dim=1, keepdim=True) + g.mean()  # J G J
    lam = torch.linalg.eigvalsh((gc + gc.T) / 2).clamp_min(0.0)
    s2 = float(lam.square().sum())
    return float(lam.sum()) ** 2 / s2 if s2 > 0 else 0.0


def _orthogonality_gap(g: torch.Tensor) -> float:
    total = float(g.trace())
    return float((g / total - torch.eye(g.shape[0], dtype=_F64) / g.shape[0]).norm()) if total > 0 else math.nan


def cosine_matrix(h: torch.Tensor) -> torch.Tensor:
    """``C_ij = <h_i, h_j> / (||h_i|| ||h_j||)`` of the rows of ``h`` (n, ...); a zero row has cosine 0 with
    everything (and 1 with itself)."""
    return _cosine(gram(h))


def odd_index(c: torch.Tensor) -> int:
    """``argmin_i mean_{j != i} C_ij``: the sample least like the others."""
    n = c.shape[0]
    off = (c.sum(dim=1) - c.diagonal()) / max(n - 1, 1)
    return int(off.argmin())


def effective_rank(h: torch.Tensor) -> float:
    """``(sum l)^2 / sum l^2`` over the eigenvalues ``l`` of the centred Gram matrix ``J H H^T J``
    (``J = I - 11^T / n``); 0 when the rows coincide."""
    return _effective_rank(gram(h))


def orthogonality_gap(h: torch.Tensor) -> float:
    """``|| H H^T / ||H||_F^2 - I / n ||_F``: 0 for mutually orthogonal rows of equal norm (NaN for H = 0)."""
    return _orthogonality_gap(gram(h))


def batch_geometry(h: torch.Tensor) -> Geometry:
    """Every geometry measure of one batch of features ``h`` (n >= 3 samples, one row each).

    Tightness: mean and min of ``C_ij`` over pairs ``i < j`` without the odd sample ``o``; odd
    orthogonality ``max_{j != o} |C_oj|``; norm ratio ``||h_o|| / median_j ||h_j||`` (the median over all
    samples, the mean of the two middle values for even n; NaN when it is 0)."""
    n = h.shape[0]
    if n < 3:
        raise ValueError(f"batch geometry needs at least 3 samples, got {n}")
    g = gram(h)
    c = _cosine(g)
    o = odd_index(c)
    keep = torch.tensor([i for i in range(n) if i != o])
    sub = c[keep][:, keep]
    iu = torch.triu_indices(n - 1, n - 1, offset=1)
    pairs = sub[iu[0], iu[1]]
    norms = g.diagonal().clamp_min(0.0).sqrt()
    med = float(norms.median()) if n % 2 else float(norms.sort().values[n // 2 - 1: n // 2 + 1].mean())
    return Geometry(
        odd=o, tightness=float(pairs.mean()), tightness_min=float(pairs.min()),
        odd_orthogonality=float(c[o, keep].abs().max()),
        norm_ratio=float(norms[o]) / med if med > 0 else math.nan,
        effective_rank=_effective_rank(g), orthogonality_gap=_orthogonality_gap(g), cosine=c.float())


@dataclass
class GeometryStats:
    """Geometry measures averaged over batches (each batch is its own geometry), the last cosine matrix."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(GEOMETRY_KEYS, 0.0))
    batches: int = 0
    odd_counts: dict[int, int] = field(default_factory=dict)
    cosine: torch.Tensor | None = None

    def update(self, h: torch.Tensor) -> None:
        if h.shape[0] < 3:
            return
        g = batch_geometry(h)
        for k, v in g.values().items():
            self.sums[k] += v
        self.batches += 1
        self.odd_counts[g.odd] = self.odd_counts.get(g.odd, 0) + 1
        self.cosine = g.cosine

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: (v / self.batches if self.batches else math.nan) for k, v in self.sums.items()}
        out["batches"] = self.batches
        out["odd"] = max(self.odd_counts, key=self.odd_counts.get) if self.odd_counts else None
        return out


# ---- UAN mixtures --------------------------------------------------------------------------------------
@dataclass
class MixtureStats:
    """A UAN site's mixture against its data, streamed: the mean per-value log-likelihood of the mixture and
    the sums giving the maximum-likelihood single Gaussian (K = 1), per channel (or one row in sample mode)."""

    n: int = 0
    ll_sum: torch.Tensor | None = None
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None

    def update(self, values: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, log_pi: torch.Tensor) -> None:
        """``values`` (C, n); mixture parameters (K, C)."""
        v = values.detach().to(_F64)
        ll = mixture_loglik(v, mean, var, log_pi) * v.shape[1]
        if self.ll_sum is None:
            self.ll_sum, self.s1, self.s2 = torch.zeros_like(ll), torch.zeros_like(ll), torch.zeros_like(ll)
        self.n += v.shape[1]
        self.ll_sum += ll
        self.s1 += v.sum(dim=1)
        self.s2 += v.square().sum(dim=1)

    def gain(self, var_floor: float) -> torch.Tensor:
        """Per-row gain (nats per value) of the mixture over the best single Gaussian on the same values."""
        mean = self.s1 / self.n
        var_ml = (self.s2 / self.n - mean.square()).clamp_min(0.0)
        var = var_ml.clamp_min(var_floor)
        single = -0.5 * (torch.log(var) + math.log(2 * math.pi)) - var_ml / (2 * var)
        return self.ll_sum / self.n - single


def uan_summary(module: nn.Module, stats: MixtureStats | None) -> dict[str, Any]:
    """Priors (sorted per channel, then averaged), separation (median over channels of
    ``(max_k mu_k - min_k mu_k) / sqrt(running_var + eps)``; sample mode: on the z scale, as
    calibration reports it) and the log-likelihood gain over K = 1 on the diagnosed data."""
    with torch.no_grad():
        mu, _, log_pi = module._params(_F64)
        pri = log_pi.exp()
        if mu.dim() == 1:
            mu, pri = mu[:, None], pri[:, None]
        spread = mu.max(dim=0).values - mu.min(dim=0).values
        if hasattr(module, "running_var"):
            spread = spread / (module.running_var.to(_F64) + module.eps).sqrt()
        weights = pri.sort(dim=0, descending=True).values.mean(dim=1)
    out: dict[str, Any] = {"k": int(module.k), "weights": [float(w) for w in weights],
                           "separation": float(spread.median())}
    if stats is not None and stats.n:
        gain = stats.gain(float(module.var_floor))
        out.update(ll_gain=float(gain.mean()), ll_gain_min=float(gain.min()), values=stats.n)
    return out
