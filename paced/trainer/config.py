"""The trainer's configuration: one frozen dataclass, defaults and help text in one place.

`TrainConfig` is what `paced train` parses its flags into and what `trainer_state.json`
records (resolved, with the token left out). A stage schedule is a tuple of `Stage`s; without
`--stages` the run is one stage of `steps` steps with `loss`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from paced.curriculum import SCHEMES
from paced.errors import InputError
from paced.trainer.losses import LOSSES
from paced.trainer.report import check_report_to

ON_POLICY_BY_DEFAULT = {"reverse"}  # a loss whose stage samples from the student unless told
DEVICES = ("auto", "cpu", "cuda")
LOSS_PATHS = ("fused", "logits")
# The settings of --group-size (recorded in trainer_state.json only when it is on).
GROUP_FIELDS = ("group_size", "group_scheme", "group_alpha", "group_beta", "group_prior", "grader_workers",
                "grading_timeout_seconds", "group_snapshot_every", "group_normalize")
# --group-normalize: the step's Σ w·L over Σ w (a few weighted groups take the whole step) or over
# the number of samples N (the weights scale the step)
GROUP_NORMALIZE = ("weights", "samples")
# Fields that may differ between a run and its `--resume` (they do not change the result).
RESUMABLE_CHANGES = {"resume", "progress", "save_every", "token", "consumer", "http_retries", "out",
                     "http_timeout_seconds", "device", "grader_workers", "loss_path", "loss_in_place",
                     "loss_chunk_size", "report_to"}


@dataclass(frozen=True)
class Stage:
    """One stage of a schedule: a loss, a number of optimizer steps, and on/off-policy
    (None: the loss's default, on-policy for reverse KL, off-policy otherwise)."""

    loss: str
    steps: int
    on_policy: bool | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise InputError(f"stage loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"stage steps must be an integer >= 1, got {self.steps!r}")

    def resolved_on_policy(self, default: bool | None) -> bool:
        """This stage's own setting, else the run's `--on-policy`, else the loss's default."""
        if self.on_policy is not None:
            return self.on_policy
        if default is not None:
            return default
        return self.loss in ON_POLICY_BY_DEFAULT


def parse_stages(text: str) -> tuple[Stage, ...]:
    """`"forward:300,reverse:300"` (optionally `loss:steps:on|off`) -> stages, or InputError."""
    stages = []
    for part in (p.strip() for p in text.split(",")):
        bits = part.split(":")
        if len(bits) not in (2, 3) or not bits[1].strip().isdigit():
            raise InputError(
                f"--stages: cannot read {part!r}; write LOSS:STEPS[:on|off] separated by commas, "
                f"e.g. forward:300,reverse:300 (losses: {', '.join(LOSSES)})"
            )
        policy = None
        if len(bits) == 3:
            if bits[2] not in ("on", "off"):
                raise InputError(f"--stages: policy in {part!r} must be 'on' or 'off'")
            policy = bits[2] == "on"
        stages.append(Stage(bits[0].strip(), int(bits[1]), policy))
    if not stages:
        raise InputError("--stages is empty")
    return tuple(stages)


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one `paced train` run is told. Validated on construction."""

    student: str = _help("the student model: a folder (save_pretrained layout) or a Hugging Face Hub id")
    teacher: str = _help("the teacher model (folder or Hub id); may be the student's own starting checkpoint")
    source: str = _help("shards: a manifest folder, or a run URL http://HOST/v1/runs/RUN")
    out: str = _help("output folder for checkpoints (checkpoint-STEP/, final/)")
    loss: str = _help("loss of a single-stage run", "forward")
    steps: int = _help("optimizer steps of a single-stage run", 100)
    stages: tuple[Stage, ...] = _help("stage schedule, e.g. forward:300,reverse:300 (overrides "
                                      "loss/steps)", ())
    on_policy: bool | None = _help("sample from the student for every stage (default: per loss)", None)
    lr: float = _help("peak learning rate (AdamW)", 1e-4)
    min_lr_ratio: float = _help("the cosine ends at lr * min_lr_ratio", 0.1)
    warmup_steps: int = _help("linear warmup steps at the start of each stage", 0)
    weight_decay: float = _help("AdamW weight decay (not on biases and norms)", 0.0)
    max_grad_norm: float = _help("clip the gradient norm to this (0: no clipping)", 1.0)
    batch_size: int = _help("problems per micro-batch (per process)", 8)
    grad_accum: int = _help("micro-batches per optimizer step", 1)
    max_length: int = _help("longest training sequence in tokens (prompt + completion)", 1024)
    sample_temperature: float = _help("on-policy sampling temperature", 1.0)
    sample_top_p: float = _help("on-policy nucleus sampling (1: off)", 1.0)
    max_new_tokens: int = _help("on-policy: longest sampled completion", 64)
    chat_template: bool = _help("render prompts as one user turn with the student's chat template (as "
                                "`paced rollout --chat-template` measured them)", False)
    teacher_prompt_template: str | None = _help("teacher-side prompt with {prompt} and optionally {answer} "
                                                "(the shard row's reference answer: self-distillation "
                                                "with privileged information), "
                                                "e.g. 'Answer: {answer}\\n{prompt}'", None)
    group_size: int = _help("on-policy group distillation: K samples per prompt, graded, each weighted by "
                            "w(p̂ = c/K) of its group; `--group-size` alone means 8 (0: off, one sample per "
                            "prompt)", 0)
    group_scheme: str = _help("--group-size: in-group weights w(p̂): paced p^α(1−p)^β, hard-filter "
                              "(0 < p̂ < 1), uniform, paced-posterior (Beta posterior, prior from the row's "
                              "snapshot counts)", "paced")
    group_alpha: float = _help("--group-size: exponent α of the in-group weight", 1.0)
    group_beta: float = _help("--group-size: exponent β of the in-group weight", 1.0)
    group_prior: tuple[float, float] = _help("--group-size paced-posterior: Beta prior 'a,b' (added to the "
                                             "row's snapshot counts when it has them)", (1.0, 1.0))
    group_normalize: str = _help("--group-size: divide the step's Σ w·L by Σ w (weights: the weighted "
                                 "samples share the whole step) or by the step's sample count N (samples: "
                                 "the weights scale the step down when few samples weigh)", "weights")
    grader_workers: int = _help("--group-size: grading worker processes (killable; in-process graders need "
                                "none)", 2)
    grading_timeout_seconds: float = _help("--group-size: seconds per graded answer (past it: wrong, "
                                           "counted)", 10.0)
    group_snapshot_every: int = _help("--group-size: every N steps, write the next snapshot of the student's "
                                      "lineage from the training samples (the newest group of each problem "
                                      "trained since the last one; the rest carried) and go on with weights "
                                      "from it, with no extra generation (0: never)", 0)
    jsd_beta: float = _help("beta of the generalised JSD", 0.5)
    akl_head_mass: float = _help("AKL: head = top teacher tokens up to this mass", 0.5)
    loss_chunk_size: int | None = _help("tokens per loss chunk (default: from the vocabulary and the "
                                        "device's free memory)", None)
    loss_path: str = _help("fused: the loss from the last hidden states and the LM head, chunk by chunk, "
                           "never building the [tokens, vocab] logits (used where both models "
                           "expose their head, as transformers' causal LMs do); logits: from both "
                           "models' full logits", "fused")
    loss_in_place: bool = _help("logits path: write the loss gradient over the student logits (one "
                                "[tokens, vocab] buffer less)", False)
    fsdp: bool = _help("under torchrun: shard the student (and the teacher) with torch's fully_shard (FSDP2) "
                       "instead of DDP; checkpoints hold the gathered weights", False)
    seed: int = _help("seed of the student's sampling and of torch", 0)
    save_every: int = _help("save a checkpoint every N steps (0: only at the end)", 0)
    resume: bool = _help("continue from the newest checkpoint in --out", False)
    token: str | None = _help("bearer token for the service (default: $PACED_TOKEN)", None)
    consumer: str | None = _help("consumer name for leases (default: host-pid-rank)", None)
    lease_ttl_seconds: float | None = _help("lease time-to-live to ask for (default: the service's)", None)
    http_retries: int = _help("retries on connection errors and 5xx, with backoff", 5)
    http_timeout_seconds: float = _help("timeout of one HTTP request", 30.0)
    refresh_every: int = _help("every N steps: save, roll the checkpoint out, refresh its lineage's pass "
                               "rates and go on with weights from the new snapshot (0: never)", 0)
    refresh_between_stages: bool = _help("roll out + refresh (all problems) between stages", False)
    eval_every: int = _help("every N steps (and at step 0): greedy held-out accuracy on --eval-dataset "
                            "(0: never)", 0)
    device: str = _help("auto (cuda if available), cpu or cuda", "auto")
    progress: bool = _help("show a progress bar on stderr", True)
    report_to: tuple[str, ...] = _help("training logs, per optimizer step, re-measurement and eval (rank 0): "
                                       "jsonl (OUT/metrics.jsonl), tensorboard (OUT/tensorboard; the "
                                       "`tensorboard` extra), none; repeat the flag or separate with commas "
                                       "(default: jsonl)", ("jsonl",))

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        object.__setattr__(self, "stages", tuple(self.stages))
        for name in ("steps", "batch_size", "grad_accum", "max_length", "max_new_tokens", "grader_workers"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "weight_decay", "max_grad_norm", "http_retries",
                     "refresh_every", "eval_every", "group_size", "group_snapshot_every"):
            if getattr(self, name) < 0:
                raise InputError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"`lr` must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"`min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}")
        if self.sample_temperature < 0 or not 0 < self.sample_top_p <= 1:
            raise InputError("`sample_temperature` must be >= 0 and `sample_top_p` in (0, 1]")
        if not 0 <= self.jsd_beta <= 1 or not 0 <= self.akl_head_mass <= 1:
            raise InputError("`jsd_beta` and `akl_head_mass` must be in [0, 1]")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise InputError(f"`loss_chunk_size` must be >= 1, got {self.loss_chunk_size}")
        if self.lease_ttl_seconds is not None and not self.lease_ttl_seconds > 0:
            raise InputError(f"`lease_ttl_seconds` must be > 0, got {self.lease_ttl_seconds}")
        if self.loss_path not in LOSS_PATHS:
            raise InputError(f"`loss_path` must be one of {', '.join(LOSS_PATHS)}, got {self.loss_path!r}")
        if self.device not in DEVICES:
            raise InputError(f"`device` must be one of {', '.join(DEVICES)}, got {self.device!r}")
        object.__setattr__(self, "report_to", tuple(self.report_to))
        check_report_to(self.report_to)
        self._check_template()
        self._check_group()
        self._check_fsdp()
        if self.refresh_between_stages and len(self.schedule) < 2:
            raise InputError("--refresh-between-stages needs at least two --stages")

    def _check_group(self) -> None:
        if self.group_snapshot_every and not self.group_size:
            raise InputError("--group-snapshot-every snapshots the training samples of --group-size: add "
                             "--group-size")
        if self.group_snapshot_every and self.refresh_every:
            raise InputError("--group-snapshot-every and --refresh-every both write the lineage's next "
                             "snapshot: choose one (training samples, no extra generation; or "
                             "rollouts of a checkpoint)")
        if not self.group_size:
            return
        if self.group_scheme not in SCHEMES:
            raise InputError(f"--group-scheme must be one of {', '.join(sorted(SCHEMES))}, "
                             f"got {self.group_scheme!r}")
        if self.group_normalize not in GROUP_NORMALIZE:
            raise InputError(f"--group-normalize must be one of {', '.join(GROUP_NORMALIZE)}, "
                             f"got {self.group_normalize!r}")
        object.__setattr__(self, "group_prior", tuple(float(x) for x in self.group_prior))
        if len(self.group_prior) != 2 or not min(self.group_prior) > 0:
            raise InputError(f"--group-prior must be two numbers > 0, got {self.group_prior}")
        for name in ("group_alpha", "group_beta"):
            if not getattr(self, name) >= 0:
                raise InputError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if not self.grading_timeout_seconds > 0:
            raise InputError(f"`grading_timeout_seconds` must be > 0, got {self.grading_timeout_seconds}")
        if not any(s.resolved_on_policy(self.on_policy) for s in self.schedule):
            raise InputError("--group-size samples from the student: it needs an on-policy stage (--loss "
                             "reverse, --on-policy, or a stage like reverse:100 in --stages)")

    def _check_fsdp(self) -> None:
        if not self.fsdp:
            return
        if any(stage.resolved_on_policy(self.on_policy) for stage in self.schedule):
            raise InputError("--fsdp trains off-policy stages only (sampling from a sharded student is not "
                             "supported yet): give every stage ':off' or train on-policy with DDP")
        if self.refresh_every or self.refresh_between_stages or self.eval_every:
            raise InputError("--fsdp does not run refreshes or evals yet (they roll out the in-memory "
                             "student): drop --refresh-every/--refresh-between-stages/--eval-every, "
                             "or use DDP")

    def _check_template(self) -> None:
        template = self.teacher_prompt_template
        if template is None:
            return
        try:
            rendered = template.format(prompt="\x00", answer="")
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(
                f"--teacher-prompt-template must contain {{prompt}} and no other fields but {{answer}} "
                f"(write {{{{ and }}}} for braces): {err}"
            ) from err
        if "\x00" not in rendered:
            raise InputError("--teacher-prompt-template must contain {prompt}")

    @property
    def schedule(self) -> tuple[Stage, ...]:
        """The stages to run: `stages`, or one stage of `steps` steps with `loss`."""
        return self.stages or (Stage(self.loss, self.steps),)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.schedule)

    @property
    def is_http(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    def loss_kwargs(self, loss: str) -> dict:
        return {"jsd": {"beta": self.jsd_beta}, "akl": {"head_mass": self.akl_head_mass}}.get(loss, {})

    def to_json(self) -> dict:
        """The resolved config for trainer_state.json (the token is never written down)."""
        data = dataclasses.asdict(self)
        data["token"] = None
        if not data["chat_template"]:  # as every run before the flag: checkpoints written then still resume
            del data["chat_template"]
        if self.group_size:
            data["group_prior"] = list(self.group_prior)
        else:  # without group mode its settings are not recorded, so older checkpoints still resume
            for name in GROUP_FIELDS:
                data.pop(name)
        # recorded only when on (not the default): earlier --group-size checkpoints still resume
        if not self.group_snapshot_every:
            data.pop("group_snapshot_every", None)
        if self.group_normalize == "weights":
            data.pop("group_normalize", None)
        if not self.fsdp:  # recorded only when on, for the same reason
            data.pop("fsdp")
        data["report_to"] = list(self.report_to)
        data["stages"] = [dataclasses.asdict(s) | {"on_policy": s.resolved_on_policy(self.on_policy)}
                          for s in self.schedule]
        return data

    @classmethod
    def help_text(cls, name: str) -> str:
        return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)
