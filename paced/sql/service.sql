-- The curriculum service's own state (home/service/state.duckdb): runs, epochs, shards, leases.
-- Only `paced serve` writes this file (DuckDB: one writer per file). Times are Unix seconds.
-- Shard states: 'free' (never leased), 'leased' (lease_id, expires_at; an expired lease stays
-- 'leased' until the shard is handed out again), 'acked' (lease_id of the ack).

-- name: create_runs
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    created_at DOUBLE NOT NULL,
    student_id VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    snapshot_id VARCHAR NOT NULL,   -- the snapshot epoch 0 was built from (pinned)
    config VARCHAR NOT NULL,        -- the resolved run config as JSON
    epochs INTEGER NOT NULL,
    current_epoch INTEGER NOT NULL
);

-- name: create_epochs
CREATE TABLE IF NOT EXISTS epochs (
    run_id VARCHAR NOT NULL,
    epoch INTEGER NOT NULL,
    snapshot_id VARCHAR NOT NULL,
    items BIGINT NOT NULL,
    shards INTEGER NOT NULL,
    effective_sample_size DOUBLE NOT NULL,
    created_at DOUBLE NOT NULL,
    PRIMARY KEY (run_id, epoch)
);

-- name: create_shards
CREATE TABLE IF NOT EXISTS shards (
    run_id VARCHAR NOT NULL,
    epoch INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    items INTEGER NOT NULL,
    state VARCHAR NOT NULL,
    lease_id VARCHAR,
    expires_at DOUBLE,
    acked_at DOUBLE,
    PRIMARY KEY (run_id, epoch, shard)
);

-- name: create_leases
CREATE TABLE IF NOT EXISTS leases (
    lease_id VARCHAR PRIMARY KEY,
    run_id VARCHAR NOT NULL,
    epoch INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    consumer VARCHAR NOT NULL,
    issued_at DOUBLE NOT NULL,
    expires_at DOUBLE NOT NULL,
    acked_at DOUBLE
);

-- name: insert_run
INSERT INTO runs VALUES ($run_id, $created_at, $student_id, $dataset, $snapshot_id, $config, $epochs, 0);

-- name: insert_epoch
INSERT INTO epochs VALUES ($run_id, $epoch, $snapshot_id, $items, $shards, $ess, $created_at);

-- name: insert_shards
-- One row per shard of the epoch; the last shard may be short.
INSERT INTO shards
SELECT $run_id, $epoch, k, least($shard_size, $items - k * $shard_size), 'free', NULL, NULL, NULL
FROM range($shards) AS t(k);

-- name: set_current_epoch
UPDATE runs SET current_epoch = $epoch WHERE run_id = $run_id;

-- name: get_run
SELECT run_id, created_at, student_id, dataset, snapshot_id, config, epochs, current_epoch
FROM runs WHERE run_id = $run_id;

-- name: next_shard
-- The lowest shard of the epoch that is free or whose lease has expired.
SELECT shard, items FROM shards
WHERE run_id = $run_id AND epoch = $epoch
  AND (state = 'free' OR (state = 'leased' AND expires_at <= $now))
ORDER BY shard
LIMIT 1;

-- name: epoch_open
-- Live leases (and the soonest expiry) and shards not yet acked, in one epoch.
SELECT count(*) FILTER (WHERE state = 'leased' AND expires_at > $now) AS live,
       min(expires_at) FILTER (WHERE state = 'leased' AND expires_at > $now) AS soonest,
       count(*) FILTER (WHERE state <> 'acked') AS open
FROM shards WHERE run_id = $run_id AND epoch = $epoch;

-- name: lease_shard
UPDATE shards SET state = 'leased', lease_id = $lease_id, expires_at = $expires_at
WHERE run_id = $run_id AND epoch = $epoch AND shard = $shard;

-- name: insert_lease
INSERT INTO leases VALUES ($lease_id, $run_id, $epoch, $shard, $consumer, $now, $expires_at, NULL);

-- name: get_lease
SELECT run_id, epoch, shard, consumer, expires_at, acked_at FROM leases WHERE lease_id = $lease_id;

-- name: get_shard
SELECT state, lease_id, items FROM shards WHERE run_id = $run_id AND epoch = $epoch AND shard = $shard;

-- name: ack_shard
UPDATE shards SET state = 'acked', acked_at = $now
WHERE run_id = $run_id AND epoch = $epoch AND shard = $shard AND lease_id = $lease_id;

-- name: ack_lease
UPDATE leases SET acked_at = $now WHERE lease_id = $lease_id;

-- name: progress
SELECT e.epoch, e.snapshot_id, e.items, e.shards, e.effective_sample_size, e.created_at,
       count(*) FILTER (WHERE s.state = 'acked') AS acked,
       count(*) FILTER (WHERE s.state = 'leased' AND s.expires_at > $now) AS leased,
       count(s.shard) FILTER (WHERE s.state = 'free' OR (s.state = 'leased' AND s.expires_at <= $now)) AS pending
FROM epochs AS e
LEFT JOIN shards AS s ON s.run_id = e.run_id AND s.epoch = e.epoch
WHERE e.run_id = $run_id
GROUP BY ALL
ORDER BY e.epoch;

-- name: outstanding_leases
SELECT count(*) AS live FROM shards WHERE state = 'leased' AND expires_at > $now;
