"""Per-problem weights from pass rates: the Beta kernel, its posterior mean, and guards.

Pure numpy/scipy: arrays in, arrays out. Weighting schemes are named in `SCHEMES` (the dict is
the registry):

- `paced`:            w = p̂^α (1−p̂)^β with p̂ = c/n (the paper's Beta kernel; α = β = 1 default)
- `paced-posterior`:  E[p^α (1−p)^β] under the Beta(c+a₀, n−c+b₀) posterior (never exactly 0)
- `uniform`:          w = 1
- `hard-filter`:      w = 1 if 0 < p̂ < 1 else 0 (DAPO-style dynamic sampling)

Guards against starving mastered problems (all off by default; our choice, see docs/method.md):
`weight_floor` ε: every measured problem gets at least ε; `uniform_mix` λ:
w' = (1−λ)·w/mean(w) + λ. Both act on weights normalised to mean 1 over the measured problems.

`WeightScheme` is the one form of these settings from the HTTP body and the CLI flags to the
manifest: the same six field names everywhere (`name` is written `scheme` in JSON).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import betaln

from paced.errors import InputError


def _check_exponents(alpha: float, beta: float) -> None:
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not np.isfinite(value) or value < 0:
            raise InputError(f"`{name}` must be a finite number >= 0, got {value}", detail={"field": name})


def beta_weight(p, alpha: float = 1.0, beta: float = 1.0) -> np.ndarray:
    """p^α (1−p)^β, vectorised; exact at the ends (0⁰ = 1), stable for non-integer exponents."""
    _check_exponents(alpha, beta)
    p = np.asarray(p, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise InputError("pass rates must lie in [0, 1] (no NaN)", detail={"field": "pass_rate"})
    # np.power(0, 0) == 1 and np.power(0, a>0) == 0 exactly, so the ends are exact.
    return np.power(p, alpha) * np.power(1.0 - p, beta)


def posterior_weight(correct, total, alpha: float = 1.0, beta: float = 1.0,
                     prior: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """E[p^α(1−p)^β] under p ~ Beta(c+a₀, n−c+b₀): B(c+a₀+α, n−c+b₀+β) / B(c+a₀, n−c+b₀).

    Computed in log space with `betaln`, so n = 10⁶ does not overflow.
    """
    _check_exponents(alpha, beta)
    a0, b0 = (float(x) for x in prior)
    if not (np.isfinite(a0) and np.isfinite(b0) and a0 > 0 and b0 > 0):
        raise InputError(f"`prior` must be two numbers > 0, got {prior}", detail={"field": "prior"})
    c = np.asarray(correct, dtype=np.float64)
    n = np.asarray(total, dtype=np.float64)
    if np.isnan(c).any() or np.isnan(n).any() or (c < 0).any() or (c > n).any():
        raise InputError("need 0 <= correct <= total", detail={"field": "correct"})
    a, b = c + a0, n - c + b0
    return np.exp(betaln(a + alpha, b + beta) - betaln(a, b))


@dataclass(frozen=True, kw_only=True)
class WeightScheme:
    """How to turn pass counts into weights. Validated on construction."""

    name: str = "paced"
    alpha: float = 1.0
    beta: float = 1.0
    prior: tuple[float, float] = (1.0, 1.0)
    weight_floor: float = 0.0
    uniform_mix: float = 0.0

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise InputError(f"`scheme` must be one of {', '.join(sorted(SCHEMES))}, got {self.name!r}",
                             detail={"field": "scheme"})
        _check_exponents(self.alpha, self.beta)
        for name in ("weight_floor", "uniform_mix"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise InputError(f"`{name}` must be in [0, 1], got {value!r}", detail={"field": name})
        try:
            prior = tuple(float(x) for x in self.prior)
        except (TypeError, ValueError):
            prior = ()
        if len(prior) != 2 or not all(np.isfinite(prior)) or min(prior) <= 0:
            raise InputError(f"`prior` must be two numbers > 0, got {self.prior!r}",
                             detail={"field": "prior"})
        object.__setattr__(self, "prior", prior)

    @property
    def guard(self) -> str:
        """Which guard shapes the weights: `none`, `floor`, `mix`, `floor+mix` (or `posterior`)."""
        parts = [g for g, on in (("floor", self.weight_floor > 0), ("mix", self.uniform_mix > 0)) if on]
        if self.name == "paced-posterior":
            parts.insert(0, "posterior")
        return "+".join(parts) or "none"

    def to_json(self) -> dict:
        """The JSON form (manifest.json inputs, the service's run config): `name` as `scheme`."""
        return {"scheme": self.name, "alpha": self.alpha, "beta": self.beta, "prior": list(self.prior),
                "weight_floor": self.weight_floor, "uniform_mix": self.uniform_mix}

    @classmethod
    def from_json(cls, data: dict) -> WeightScheme:
        """From `to_json`'s keys (other keys ignored; the guards default to off, as before they existed)."""
        given = {field: data[key] for key, field in JSON_KEYS.items() if data.get(key) is not None}
        return cls(**given)


JSON_KEYS = {"scheme": "name", "alpha": "alpha", "beta": "beta", "prior": "prior",
             "weight_floor": "weight_floor", "uniform_mix": "uniform_mix"}  # JSON key -> field


def _paced(c, n, s: WeightScheme):
    return beta_weight(c / n, s.alpha, s.beta)


def _posterior(c, n, s: WeightScheme):
    return posterior_weight(c, n, s.alpha, s.beta, s.prior)


def _uniform(c, n, s: WeightScheme):
    return np.ones_like(c, dtype=np.float64)


def _hard_filter(c, n, s: WeightScheme):
    return ((c > 0) & (c < n)).astype(np.float64)


SCHEMES = {"paced": _paced, "paced-posterior": _posterior, "uniform": _uniform, "hard-filter": _hard_filter}


def apply_guards(weights: np.ndarray, weight_floor: float = 0.0, uniform_mix: float = 0.0) -> np.ndarray:
    """Normalise to mean 1, then mix with uniform (λ) and raise to the floor (ε)."""
    w = np.asarray(weights, dtype=np.float64)
    if weight_floor == 0 and uniform_mix == 0:
        return w
    mean = w.mean() if w.size else 0.0
    w = w / mean if mean > 0 else np.zeros_like(w)
    if uniform_mix > 0:
        w = (1.0 - uniform_mix) * w + uniform_mix
    if weight_floor > 0:
        w = np.maximum(w, weight_floor)
    return w


def compute_weights(correct, total, scheme: WeightScheme) -> np.ndarray:
    """Weights for measured problems (total > 0). Unmeasured problems are an error here:
    callers split them off first and report them (they are never silently weighted)."""
    c = np.asarray(correct, dtype=np.float64)
    n = np.asarray(total, dtype=np.float64)
    if c.shape != n.shape:
        raise InputError("correct and total must have the same shape")
    if (n <= 0).any():
        raise InputError(f"{int((n <= 0).sum())} problems have no rollouts; weight only measured problems")
    if (c < 0).any() or (c > n).any():
        raise InputError("need 0 <= correct <= total for every problem")
    return apply_guards(SCHEMES[scheme.name](c, n, scheme), scheme.weight_floor, scheme.uniform_mix)


def effective_sample_size(weights) -> float:
    """(Σw)² / Σw²: how many equally weighted items the weighted set is worth."""
    w = np.asarray(weights, dtype=np.float64)
    sq = float(np.dot(w, w))
    return float(w.sum() ** 2 / sq) if sq > 0 else 0.0
