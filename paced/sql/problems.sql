-- name: read_all
SELECT id, prompt, answer, difficulty, metadata
FROM read_parquet($files)
ORDER BY id;

-- name: count
SELECT count(*) AS problems, count(DISTINCT difficulty) AS difficulties
FROM read_parquet($files);
