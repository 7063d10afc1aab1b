"""Request and response bodies of the service (pydantic), and the error shape.

Request bodies are strict: `"seed": "1"` or `"include_items": "yes"` is a 422, never coerced."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from paced.api.runs import RunConfig
from paced.curriculum import MODES, SCHEMES

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CONSUMER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=128)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
PriorParam = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False, strict=True)]


class ErrorBody(BaseModel):
    error: str = Field(description="what went wrong and what to fix")
    code: str = Field(description="stable machine-readable code")
    detail: Any = Field(None, description="e.g. {field, value}: the input at fault")


STRICT = ConfigDict(extra="forbid", strict=True)
Consumer = Annotated[str, Field(pattern=CONSUMER_PATTERN, max_length=128)]


class RunCreate(BaseModel):
    """A curriculum run over one data set, weighted by one student's pass rates."""

    model_config = STRICT

    student_id: Name
    dataset: Name
    scheme: Literal[tuple(sorted(SCHEMES))] = "paced"  # type: ignore[valid-type]
    alpha: Finite = Field(1.0, ge=0, le=1000, description="exponent α of w = p^α (1−p)^β")
    beta: Finite = Field(1.0, ge=0, le=1000, description="exponent β of w = p^α (1−p)^β")
    prior: tuple[PriorParam, PriorParam] = Field((1.0, 1.0), strict=False,  # a JSON array; its numbers strict
                                                 description="Beta(a₀, b₀) prior (paced-posterior)")
    mode: Literal[MODES] = "weighted-loss"  # type: ignore[valid-type]
    seed: int = Field(0, ge=0, le=2**63 - 1)
    shard_size: int = Field(256, ge=1, le=2**31 - 1,
                            description="items per shard (at most the max_shard_size setting)")
    epochs: int = Field(1, ge=1, le=2**31 - 1, description="epochs to serve (at most the max_epochs setting)")
    weight_floor: Finite = Field(0.0, ge=0, le=1,
                                 description="every measured problem gets at least this weight")
    uniform_mix: Finite = Field(0.0, ge=0, le=1, description="w' = (1−λ)·w/mean(w) + λ")
    follow_snapshots: bool = Field(
        False,
        description="take weights from the student's newest snapshot: each new epoch, and within an epoch "
        "the shards not leased yet are planned again when a newer snapshot appears")
    num_samples: int | None = Field(None, ge=0, le=2**31 - 1,
                                    description="draws per epoch (weighted-sample mode)")
    snapshot_id: Name | None = Field(None, description="pin this snapshot (default: the newest)")
    teacher_id: Name | None = Field(None,
                                    description="whose references fill `completion` (default: the first)")


    def to_config(self) -> RunConfig:
        """The service's own form of the request (the one conversion): the weight settings
        become one `WeightScheme`."""
        data = self.model_dump()
        return RunConfig.from_json(data)


class RunCreated(BaseModel):
    run_id: str
    snapshot_id: str
    epoch: int
    epochs: int
    shards: int
    items: int
    effective_sample_size: float
    warnings: list[str] = Field(default_factory=list,
                                description="e.g. most of the pool at weight 0 under an exact-zero scheme")


class EpochProgress(BaseModel):
    epoch: int
    snapshot_id: str
    items: int
    shards: int
    acked: int
    handed_out: int = Field(description="shards leased at least once (their bytes are fixed)")
    leased: int = Field(description="shards under a live lease")
    pending: int = Field(description="shards free or whose lease expired")
    effective_sample_size: float
    created_at: str


class PlanSegment(BaseModel):
    """Where an epoch's plan took a snapshot: segment 0 from the epoch's start, each later
    segment (a re-plan of the shards not leased yet) from `from_shard` on."""

    epoch: int
    segment: int
    from_shard: int = Field(description="the epoch's first shard planned from this snapshot")
    snapshot_id: str
    student_ids: list[str] | None = Field(description="the checkpoints whose rollouts measured the snapshot")
    checkpoint_id: str | None = Field(description="the lineage's newest checkpoint, when the snapshot "
                                                  "records it")
    created_at: str


class RunView(BaseModel):
    run_id: str
    created_at: str
    snapshot_id: str = Field(description="the snapshot the run was created from (epoch 0)")
    config: dict[str, Any]
    epochs: int
    current_epoch: int
    done: bool
    progress: list[EpochProgress]
    snapshot_history: list[PlanSegment] = Field(description="the snapshot each epoch, and each re-plan "
                                                "within an epoch, was planned from, in order")


class LeaseRequest(BaseModel):
    model_config = STRICT

    consumer: Consumer = Field(description="who takes the shard; only it may ack or renew the lease")
    ttl_seconds: Finite | None = Field(None, gt=0, le=1e7, description="lease lifetime (default: a setting)")
    include_items: bool = Field(True, description="false: fetch the rows from the shard endpoint instead")


class RenewRequest(BaseModel):
    model_config = STRICT

    ttl_seconds: Finite | None = Field(None, gt=0, le=1e7,
                                       description="new lifetime from now (default: a setting)")
    consumer: Consumer | None = Field(None,
                                      description="who renews: must be the lease's consumer unless `force`")
    force: bool = Field(False, description="renew a lease another consumer holds")


class AckRequest(BaseModel):
    model_config = STRICT

    consumer: Consumer | None = Field(None,
                                      description="who acks: must be the lease's consumer unless `force`")
    force: bool = Field(False, description="ack a lease another consumer holds (e.g. a dead trainer's)")


class RenewResponse(BaseModel):
    run_id: str
    lease_id: str
    epoch: int
    shard: int
    expires_at: str = Field(description="ISO 8601, UTC")
    ttl_seconds: float


class ShardItem(BaseModel):
    """One row, in the prompt–completion format TRL trainers read."""

    position: int
    problem_id: str
    prompt: str
    completion: str | None = Field(description="the teacher reference (null where there is none)")
    weight: float
    pass_rate: float
    n: int
    dataset: str
    guard: str
    answer: str | None = Field(None, description="the problem's reference answer (grading on-policy samples)")


class LeaseResponse(BaseModel):
    """`leased`: the shard is yours until `expires_at`, ack it when consumed. `wait`: every open
    shard is leased to someone else, ask again after `retry_after_seconds` (also the Retry-After
    header). `done`: every shard of every epoch is acked."""

    status: Literal["leased", "wait", "done"]
    run_id: str
    lease_id: str | None = None
    epoch: int | None = None
    shard: int | None = None
    snapshot_id: str | None = None
    expires_at: str | None = Field(None, description="ISO 8601, UTC")
    ttl_seconds: float | None = None
    num_items: int | None = None
    items: list[ShardItem] | None = None
    retry_after_seconds: float | None = None


class AckResponse(BaseModel):
    run_id: str
    lease_id: str
    epoch: int
    shard: int
    acked: bool = True
    already_acked: bool = Field(description="true when this lease had acked the shard before (idempotent)")


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    home: str | None = Field(None, description="the data home's path: only to a request with the token")
    students: dict[str, str] | None = Field(
        None, description="student id -> newest snapshot id (when reads are open, or with the token)")


class PassRates(BaseModel):
    """`paced.curriculum.summary.passrate_summary` of one snapshot (problems with n = 0 are
    counted as `unmeasured` and left out of the other figures)."""

    student_id: str
    snapshot_id: str
    dataset: str | None
    problems: int
    unmeasured: int
    rollouts: int
    mean_pass_rate: float | None
    share_zero: float | None
    share_one: float | None
    histogram: list[int] = Field(description="10 counts over [0, 1]; p = 1 falls in the last bin")
    bin_edges: list[float]
