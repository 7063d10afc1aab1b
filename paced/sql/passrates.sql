-- Pass-rate snapshots from rollout batch files. `$files` is a list of Parquet paths.

-- name: aggregate
-- One row per (data set, problem): counts by outcome over its distinct samples (should a sample
-- ever be committed twice, the copy in the first file by name counts), pass rate = correct / n.
WITH samples AS (
    SELECT dataset, problem_id, sample_idx, outcome
    FROM read_parquet($files, filename = true)
    QUALIFY row_number() OVER (PARTITION BY dataset, problem_id, sample_idx ORDER BY filename) = 1
)
SELECT problem_id,
       dataset,
       $student_id AS student_id,
       $sampling_hash AS sampling_hash,
       count(*) AS n,
       count(*) FILTER (WHERE outcome = 'correct') AS correct,
       count(*) FILTER (WHERE outcome = 'wrong') AS wrong,
       count(*) FILTER (WHERE outcome = 'unparseable') AS unparseable,
       count(*) FILTER (WHERE outcome = 'timeout') AS timeout,
       count(*) FILTER (WHERE outcome = 'error') AS error,
       count(*) FILTER (WHERE outcome = 'correct') / count(*) AS pass_rate,
       CAST(0 AS INTEGER) AS stale_age,
       $snapshot_id AS snapshot_id
FROM samples
GROUP BY dataset, problem_id
ORDER BY dataset, problem_id;

-- name: max_sample
-- The greatest sample index in the files (the width of `aggregate_distinct`'s bit sets).
SELECT coalesce(max(sample_idx), 0) AS max_sample FROM read_parquet($files);

-- name: aggregate_distinct
-- `aggregate` without the per-sample deduplication (one hash aggregate, no window), plus per
-- problem `rows` (committed rows) and `n` (distinct sample indices, from a bit set of width
-- $max_sample + 1). Equal to `aggregate` exactly when every problem has rows = n, i.e. no
-- sample was committed twice; the caller checks that and falls back to `aggregate` otherwise.
SELECT problem_id,
       dataset,
       $student_id AS student_id,
       $sampling_hash AS sampling_hash,
       bit_count(bitstring_agg(sample_idx, 0, $max_sample)) AS n,
       count(*) FILTER (WHERE outcome = 'correct') AS correct,
       count(*) FILTER (WHERE outcome = 'wrong') AS wrong,
       count(*) FILTER (WHERE outcome = 'unparseable') AS unparseable,
       count(*) FILTER (WHERE outcome = 'timeout') AS timeout,
       count(*) FILTER (WHERE outcome = 'error') AS error,
       count(*) FILTER (WHERE outcome = 'correct') / count(*) AS pass_rate,
       CAST(0 AS INTEGER) AS stale_age,
       $snapshot_id AS snapshot_id,
       count(*) AS rows
FROM read_parquet($files)
GROUP BY dataset, problem_id
ORDER BY dataset, problem_id;
