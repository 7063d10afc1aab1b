"""Service settings: pydantic-settings with the `PACED_` prefix, built in `create_app()`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything `paced serve` can be told, from the environment (`PACED_HOME`, `PACED_TOKEN`, …)
    or as keyword arguments. Limits bound every input that costs memory or time."""

    model_config = SettingsConfigDict(env_prefix="PACED_", extra="ignore", frozen=True)

    home: Path = Field(Path("./paced-data"), description="data home")
    token: SecretStr | None = Field(
        None, description="bearer token required on every POST (state-changing) endpoint; unset: none")
    lease_ttl_seconds: float = Field(300.0, gt=0, description="lease time-to-live when a request gives none")
    max_lease_ttl_seconds: float = Field(86400.0, gt=0,
                                         description="the longest lease a consumer may ask for")
    retry_after_seconds: float = Field(
        5.0, gt=0, description="the longest wait suggested when every open shard is under a live lease")
    epoch_build_wait_seconds: float = Field(
        2.0, ge=0, description="how long a lease request waits for a new epoch, or a re-plan of a run that "
        "follows snapshots, to be built before it answers `wait` (the build goes on in the background)")
    max_shard_size: int = Field(4096, ge=1, description="largest shard a run may ask for")
    max_epochs: int = Field(10000, ge=1, description="most epochs a run may ask for")
    max_num_samples: int = Field(10_000_000, ge=1, description="most draws per epoch (weighted-sample mode)")
    max_request_bytes: int = Field(65536, ge=1024, description="largest request body accepted")
    token_reads: bool = Field(
        False, description="require the token on reads too (GET of pass rates, runs, shards, metrics); "
        "/v1/health stays open but answers only status and version without it")

    @model_validator(mode="after")
    def _reads_need_a_token(self):
        if self.token_reads and not self.require_token():
            raise ValueError("PACED_TOKEN_READS needs PACED_TOKEN: set a token to require on reads")
        return self

    def require_token(self) -> bool:
        return self.token is not None and bool(self.token.get_secret_value())
