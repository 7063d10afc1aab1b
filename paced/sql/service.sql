-- The curriculum service's own state (home/service/state.duckdb): runs, epochs, plan segments,
-- leases, acks. Only `paced serve` writes this file (DuckDB: one writer per file). Times are Unix
-- seconds. Leases and acks are append-only (a renewal moves a lease's expires_at); a shard's state
-- is derived from them: acked if it has an ack row (one per shard: the primary key makes a second
-- ack impossible), else held by its latest lease (live until expires_at), else free.
-- An epoch's plan is one or more segments: segment 0 is the epoch as first built; a run that
-- follows snapshots adds a segment (a re-plan of the never-leased shards from a newer snapshot)
-- starting at `from_shard`, and the epoch's `items`/`shards` are updated with it.

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

-- name: create_segments
CREATE TABLE IF NOT EXISTS segments (
    run_id VARCHAR NOT NULL,
    epoch INTEGER NOT NULL,
    segment INTEGER NOT NULL,
    from_shard INTEGER NOT NULL,    -- the epoch's shard index of the segment's first shard
    snapshot_id VARCHAR NOT NULL,
    items BIGINT NOT NULL,          -- the segment's own items and shards
    shards INTEGER NOT NULL,
    effective_sample_size DOUBLE NOT NULL,
    student_ids VARCHAR NOT NULL,   -- JSON list: the checkpoints that measured the snapshot's rows
    checkpoint_id VARCHAR,          -- the lineage's newest checkpoint (the side file), if recorded
    created_at DOUBLE NOT NULL,
    PRIMARY KEY (run_id, epoch, segment)
);

-- name: create_leases
CREATE TABLE IF NOT EXISTS leases (
    lease_id VARCHAR PRIMARY KEY,
    run_id VARCHAR NOT NULL,
    epoch INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    consumer VARCHAR NOT NULL,
    issued_at DOUBLE NOT NULL,
    expires_at DOUBLE NOT NULL
);

-- name: create_acks
CREATE TABLE IF NOT EXISTS acks (
    run_id VARCHAR NOT NULL,
    epoch INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    lease_id VARCHAR NOT NULL,
    acked_at DOUBLE NOT NULL,
    PRIMARY KEY (run_id, epoch, shard)
);

-- name: insert_run
INSERT INTO runs VALUES ($run_id, $created_at, $student_id, $dataset, $snapshot_id, $config, $epochs, 0);

-- name: insert_epoch
INSERT INTO epochs VALUES ($run_id, $epoch, $snapshot_id, $items, $shards, $ess, $created_at);

-- name: insert_segment
INSERT INTO segments VALUES ($run_id, $epoch, $segment, $from_shard, $snapshot_id, $items, $shards, $ess,
                             $student_ids, $checkpoint_id, $created_at);

-- name: resize_epoch
UPDATE epochs SET items = $items, shards = $shards WHERE run_id = $run_id AND epoch = $epoch;

-- name: epoch_segments
SELECT segment, from_shard, snapshot_id FROM segments
WHERE run_id = $run_id AND epoch = $epoch
ORDER BY segment;

-- name: run_segments
-- Every epoch's segments; an epoch recorded before segments existed shows as its segment 0.
SELECT e.epoch, coalesce(s.segment, 0) AS segment, coalesce(s.from_shard, 0) AS from_shard,
       coalesce(s.snapshot_id, e.snapshot_id) AS snapshot_id, s.items, s.shards, s.student_ids,
       s.checkpoint_id, coalesce(s.created_at, e.created_at) AS created_at
FROM epochs AS e
LEFT JOIN segments AS s ON s.run_id = e.run_id AND s.epoch = e.epoch
WHERE e.run_id = $run_id
ORDER BY e.epoch, segment;

-- name: handed_out
-- Shards of an epoch ever leased (shards go out in order, so these are 0 .. n-1) and its segments.
SELECT (SELECT coalesce(max(shard) + 1, 0) FROM leases WHERE run_id = $run_id AND epoch = $epoch) AS shards,
       (SELECT count(*) FROM segments WHERE run_id = $run_id AND epoch = $epoch) AS segments;

-- name: renew_lease
UPDATE leases SET expires_at = $expires_at WHERE lease_id = $lease_id;

-- name: set_current_epoch
UPDATE runs SET current_epoch = $epoch WHERE run_id = $run_id;

-- name: get_run
SELECT run_id, created_at, student_id, dataset, snapshot_id, config, epochs, current_epoch
FROM runs WHERE run_id = $run_id;

-- name: get_epoch_shards
SELECT shards, snapshot_id FROM epochs WHERE run_id = $run_id AND epoch = $epoch;

-- name: insert_leases
-- Many rows in one statement: every parameter is a list, one element per row.
INSERT INTO leases
SELECT unnest($lease_id), unnest($run_id), unnest($epoch), unnest($shard), unnest($consumer),
       unnest($issued_at), unnest($expires_at);

-- name: insert_acks
INSERT INTO acks
SELECT unnest($run_id), unnest($epoch), unnest($shard), unnest($lease_id), unnest($acked_at);

-- name: epoch_leases
-- In grant order: the last lease of a shard is its holder.
SELECT lease_id, shard, expires_at, consumer FROM leases
WHERE run_id = $run_id AND epoch = $epoch
ORDER BY issued_at, shard;

-- name: epoch_acks
SELECT shard, lease_id FROM acks WHERE run_id = $run_id AND epoch = $epoch;

-- name: get_lease
SELECT run_id, epoch, shard, consumer FROM leases WHERE lease_id = $lease_id;

-- name: get_ack
SELECT lease_id FROM acks WHERE run_id = $run_id AND epoch = $epoch AND shard = $shard;

-- name: progress
-- Per epoch: shards acked, shards ever leased, and shards under a live lease (at most one per shard).
SELECT e.epoch, e.snapshot_id, e.items, e.shards, e.effective_sample_size, e.created_at,
       (SELECT count(*) FROM acks AS a WHERE a.run_id = e.run_id AND a.epoch = e.epoch) AS acked,
       (SELECT count(DISTINCT l.shard) FROM leases AS l WHERE l.run_id = e.run_id AND l.epoch = e.epoch)
           AS handed_out,
       (SELECT count(DISTINCT l.shard) FROM leases AS l
        WHERE l.run_id = e.run_id AND l.epoch = e.epoch AND l.expires_at > $now
          AND NOT EXISTS (SELECT 1 FROM acks AS a
                          WHERE a.run_id = l.run_id AND a.epoch = l.epoch AND a.shard = l.shard)) AS leased
FROM epochs AS e
WHERE e.run_id = $run_id
ORDER BY e.epoch;

-- name: outstanding_leases
SELECT count(*) AS live FROM leases AS l
WHERE l.expires_at > $now
  AND NOT EXISTS (SELECT 1 FROM acks AS a WHERE a.run_id = l.run_id AND a.epoch = l.epoch AND a.shard = l.shard);

-- name: write_jsonl
-- An epoch's shard rows (registered as `shard_rows`) as JSON lines, in epoch order.
COPY (SELECT * FROM shard_rows ORDER BY position) TO $path (FORMAT json);

-- name: list_runs
SELECT run_id, created_at, student_id, dataset, epochs, current_epoch FROM runs
ORDER BY created_at DESC, run_id
LIMIT $limit;

-- name: expired_shards
-- Per epoch: shards whose latest lease has expired without an ack (handed out again on the next lease).
SELECT epoch, count(*) AS expired FROM (
    SELECT l.epoch, l.shard, max(l.expires_at) AS expires_at FROM leases AS l
    WHERE l.run_id = $run_id
      AND NOT EXISTS (SELECT 1 FROM acks AS a WHERE a.run_id = l.run_id AND a.epoch = l.epoch AND a.shard = l.shard)
    GROUP BY l.epoch, l.shard
) WHERE expires_at <= $now
GROUP BY epoch
ORDER BY epoch;

-- name: lease_totals
-- Per run: leases live now and shards whose latest lease expired unacked.
SELECT l.run_id,
       count(*) FILTER (WHERE l.expires_at > $now) AS live,
       count(*) FILTER (WHERE l.expires_at <= $now) AS expired
FROM (SELECT run_id, epoch, shard, max(expires_at) AS expires_at FROM leases GROUP BY run_id, epoch, shard) AS l
WHERE NOT EXISTS (SELECT 1 FROM acks AS a WHERE a.run_id = l.run_id AND a.epoch = l.epoch AND a.shard = l.shard)
GROUP BY l.run_id;
