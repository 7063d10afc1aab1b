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

-- name: aggregate_fast
-- `aggregate` without the per-sample deduplication (one hash aggregate, no window), plus per
-- problem `rows` (committed rows), `n` (distinct sample indices, from a 64-bit mask) and `top`
-- (the greatest index). Equal to `aggregate` exactly when every `top` < 64 and every problem has
-- rows = n, i.e. no sample was committed twice; the caller checks that and falls back otherwise.
SELECT problem_id,
       dataset,
       $student_id AS student_id,
       $sampling_hash AS sampling_hash,
       CAST(bit_count(bit_or(CAST(1 AS UBIGINT) << CAST(least(sample_idx, 63) AS UBIGINT))) AS BIGINT) AS n,
       count(*) FILTER (WHERE outcome = 'correct') AS correct,
       count(*) FILTER (WHERE outcome = 'wrong') AS wrong,
       count(*) FILTER (WHERE outcome = 'unparseable') AS unparseable,
       count(*) FILTER (WHERE outcome = 'timeout') AS timeout,
       count(*) FILTER (WHERE outcome = 'error') AS error,
       count(*) FILTER (WHERE outcome = 'correct') / count(*) AS pass_rate,
       CAST(0 AS INTEGER) AS stale_age,
       $snapshot_id AS snapshot_id,
       count(*) AS rows,
       max(sample_idx) AS top
FROM read_parquet($files)
GROUP BY dataset, problem_id
ORDER BY dataset, problem_id;
