"""The pure core: pass-rate estimates, weights, manifests. No I/O, no torch, no HTTP."""

from paced.curriculum.manifest import MODES, Manifest, build_manifest, shard_bounds, starvation_warning
from paced.curriculum.weights import (
    SCHEMES,
    WeightScheme,
    apply_guards,
    beta_weight,
    compute_weights,
    effective_sample_size,
    posterior_weight,
)

__all__ = [
    "MODES", "SCHEMES", "Manifest", "WeightScheme", "apply_guards", "beta_weight", "build_manifest",
    "compute_weights", "effective_sample_size", "posterior_weight", "shard_bounds", "starvation_warning",
]
