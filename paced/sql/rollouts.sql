-- Rollout batch files (ROLLOUT_SCHEMA). `$files` is a list of Parquet paths.

-- name: samples
-- Committed sample indices per problem.
SELECT problem_id, list(DISTINCT sample_idx ORDER BY sample_idx) AS samples
FROM read_parquet($files)
GROUP BY problem_id
ORDER BY problem_id;

-- name: pass_counts
-- Per problem: how many of samples 0..k-1 are committed, and how many of those are correct.
SELECT problem_id,
       count(DISTINCT sample_idx) AS n,
       count(DISTINCT sample_idx) FILTER (WHERE outcome = 'correct') AS correct
FROM read_parquet($files)
WHERE sample_idx < $k
GROUP BY problem_id
ORDER BY problem_id;

-- name: read_all
SELECT problem_id, dataset, sample_idx, completion, outcome, tokens, finish_reason, student_id,
       sampling_hash, grader
FROM read_parquet($files)
ORDER BY dataset, problem_id, sample_idx;
