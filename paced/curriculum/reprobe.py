"""Cheap refreshes: which problems to re-roll, and carrying the rest forward as stale.

A problem whose pass rate is strictly between 0 and 1 can move either way, so it is always
re-rolled. Problems at p̂ = 0 or p̂ = 1 move rarely; a rotating, seeded share of them is
re-probed each round (`fraction`), so every one is re-probed at least once every
⌈1/fraction⌉ rounds. Problems not re-rolled carry their last counts, marked stale with their
age (rounds since they were last measured).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paced.errors import InputError


def select_reprobe(pass_rates: pa.Table, fraction: float, seed: int, round_index: int) -> pa.Array:
    """Problem ids to re-roll this round: every 0 < p̂ < 1, plus a rotating share of the ends."""
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"`reprobe_fraction` must be in [0, 1], got {fraction}",
                         detail={"field": "reprobe_fraction"})
    if round_index < 0:
        raise InputError(f"`round_index` must be >= 0, got {round_index}")
    table = pass_rates.sort_by("problem_id")
    p = table["pass_rate"].to_numpy()
    frontier = (p > 0) & (p < 1)
    ends = np.flatnonzero(~frontier)
    chosen = np.zeros(len(p), dtype=bool)
    chosen[frontier] = True
    if fraction > 0 and len(ends):
        period = math.ceil(1.0 / fraction)
        slot = np.random.default_rng(seed).permutation(len(ends)) % period  # a seeded rotation
        chosen[ends[slot == round_index % period]] = True
    return table["problem_id"].filter(pa.array(chosen))


def carry_forward(previous: pa.Table, fresh: pa.Table) -> pa.Table:
    """Merge fresh measurements over a previous snapshot's rows.

    Rows of `fresh` (stale_age 0) replace the previous rows of the same problem; the other
    previous rows are kept with `stale_age + 1` (and, with evidence columns, a carried share of
    1: none of it fresh). Both tables share the snapshot schema.
    """
    fresh_ids = fresh["problem_id"]
    keep = previous.filter(pc.invert(pc.is_in(previous["problem_id"], value_set=fresh_ids)))
    aged = keep.set_column(keep.schema.get_field_index("stale_age"), "stale_age",
                           pc.add(keep["stale_age"], pa.scalar(1, pa.int32())).cast(pa.int32()))
    if "carried_share" in aged.column_names:  # nothing fresh in a carried row: all of it is carried
        carried = pc.if_else(pc.greater(aged["evidence_n"], 0), 1.0, 0.0).cast(pa.float64())
        aged = aged.set_column(aged.schema.get_field_index("carried_share"), "carried_share", carried)
    merged = pa.concat_tables([fresh.cast(previous.schema), aged])
    return merged.sort_by([("dataset", "ascending"), ("problem_id", "ascending")])
