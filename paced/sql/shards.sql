-- name: assemble
-- Manifest items (registered as `items`) joined with prompts and one reference per problem.
WITH refs AS (
    SELECT problem_id, arg_min(response, attempt) AS response
    FROM read_parquet($ref_files)
    GROUP BY problem_id
)
SELECT i.position, i.problem_id, p.prompt, r.response AS completion, i.weight, i.pass_rate, i.n,
       $dataset AS dataset, $guard AS guard, p.answer
FROM items AS i
JOIN read_parquet($problem_files) AS p ON p.id = i.problem_id
LEFT JOIN refs AS r ON r.problem_id = i.problem_id
ORDER BY i.position;

-- name: assemble_no_refs
SELECT i.position, i.problem_id, p.prompt, CAST(NULL AS VARCHAR) AS completion, i.weight, i.pass_rate,
       i.n, $dataset AS dataset, $guard AS guard, p.answer
FROM items AS i
JOIN read_parquet($problem_files) AS p ON p.id = i.problem_id
ORDER BY i.position;
