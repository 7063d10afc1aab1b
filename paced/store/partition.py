"""Shards of a rollout or teacher job: a stable hash partition of problem ids.

Shard `rank` of `world` owns the problems whose id hashes (sha256, first 8 bytes) to `rank`
modulo `world`: the same on every machine and Python version, whatever order or subset of the
problems a shard sees, so the shards of one world are disjoint and together cover the pool.

Which shard a job is: `--shard RANK/WORLD`, else a Slurm array (`SLURM_ARRAY_TASK_ID` minus
`SLURM_ARRAY_TASK_MIN`, of `SLURM_ARRAY_TASK_COUNT`), else `RANK`/`WORLD_SIZE` (torchrun, Ray,
most launchers), else the whole pool. A shard tags the files it commits (`-s{rank}of{world}`)
so that shards never race for a file name.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from paced.errors import InputError

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard `rank` (0-based) of `world`; `Shard()` is the whole pool."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise InputError(f"a shard needs 0 <= RANK < WORLD, got {self.rank}/{self.world}",
                             detail={"field": "shard"})

    @property
    def whole(self) -> bool:
        return self.world == 1

    @property
    def tag(self) -> str:
        """The suffix of this shard's file names ("" for the whole pool)."""
        return "" if self.whole else f"-s{self.rank:05d}of{self.world:05d}"

    def owns(self, problem_id: str) -> bool:
        return self.whole or shard_of(problem_id, self.world) == self.rank

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"


WHOLE = Shard()


def shard_of(problem_id: str, world: int) -> int:
    """The rank that owns `problem_id` among `world` shards (stable across machines)."""
    digest = hashlib.sha256(problem_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % world


def parse_shard(text: str) -> Shard:
    """`RANK/WORLD` (e.g. `3/8`) as a Shard; InputError naming the expected form."""
    match = _SHARD_RE.match(str(text))
    if not match:
        raise InputError(f"--shard must be RANK/WORLD (e.g. 0/4), got {text!r}", detail={"field": "shard"})
    return Shard(int(match.group(1)), int(match.group(2)))


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as err:
        raise InputError(f"environment variable {name} must be an integer, got {env[name]!r}") from err


def resolve_shard(flag: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """The job's shard: the flag, else Slurm's array variables, else RANK/WORLD_SIZE, else whole."""
    if flag is not None:
        return parse_shard(flag)
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        return Shard(_env_int(env, "SLURM_ARRAY_TASK_ID") - first, _env_int(env, "SLURM_ARRAY_TASK_COUNT"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return Shard(_env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"))
    return WHOLE


def announce_shard(shard: Shard, job: str) -> Shard:
    """Say on stderr which shard a job runs (a shard may come from the environment)."""
    if not shard.whole:
        import sys

        print(f"paced {job}: shard {shard} (a stable hash of the problem ids)", file=sys.stderr)
    return shard


def add_shard_argument(parser) -> None:
    parser.add_argument("--shard", default=None, metavar="RANK/WORLD",
                        help="roll out only this shard of the problems (a stable hash of their ids); "
                             "default: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else RANK/WORLD_SIZE, "
                             "else every problem. Shards may run at once on one home")
