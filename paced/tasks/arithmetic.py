"""The built-in task: integer arithmetic with graded difficulty.

A problem is `"{a}{op}{b}="` with answer `str(a op b)`; its difficulty is the digit count of
the larger operand (1-4 by default). Operations: `+` (the training family) and `-` (a second
family, used as a held-out skill for measuring forgetting). Deterministic for a seed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from paced.errors import InputError

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}
# Characters the task's prompts and answers use; the built-in tokenizer covers exactly these.
ALPHABET = "0123456789+-="


def problem_id(prompt: str, answer: str) -> str:
    """The default id of a problem: a content hash of prompt and answer."""
    return hashlib.sha256(f"{prompt}\x1f{answer}".encode()).hexdigest()[:16]


def generate_problems(
    n: int, seed: int = 0, *, max_digits: int = 4, operations: str = "+", min_digits: int = 1
) -> pa.Table:
    """`n` distinct problems, spread evenly over digit counts `min_digits..max_digits`.

    Columns: id, prompt, answer, difficulty (digit count), operation. The same arguments
    always give the same table.
    """
    if n < 1:
        raise InputError(f"--n must be >= 1, got {n}")
    if not 1 <= min_digits <= max_digits <= 9:
        raise InputError(f"digits must satisfy 1 <= min <= max <= 9, got {min_digits}..{max_digits}")
    bad = set(operations) - set(OPERATIONS)
    if bad or not operations:
        raise InputError(f"operations must be drawn from {''.join(OPERATIONS)!r}, got {operations!r}")
    levels = list(range(min_digits, max_digits + 1))
    capacity = sum(len(operations) * (10**d - (10 ** (d - 1) if d > 1 else 0)) * 10**d for d in levels)
    if n > capacity // 2:
        raise InputError(f"--n {n} is too many distinct problems for {min_digits}..{max_digits} digits")
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    rows: dict[str, list] = {"id": [], "prompt": [], "answer": [], "difficulty": [], "operation": []}
    i = 0
    while len(rows["id"]) < n:
        digits = levels[i % len(levels)]
        op = operations[(i // len(levels)) % len(operations)]
        i += 1
        low = 0 if digits == 1 else 10 ** (digits - 1)
        a = int(rng.integers(low, 10**digits))
        b = int(rng.integers(0, 10**digits))
        if rng.random() < 0.5:
            a, b = b, a  # the larger-digit operand on either side
        prompt = f"{a}{op}{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = str(OPERATIONS[op](a, b))
        rows["id"].append(problem_id(prompt, answer))
        rows["prompt"].append(prompt)
        rows["answer"].append(answer)
        rows["difficulty"].append(digits)
        rows["operation"].append(op)
    return pa.table({**rows, "difficulty": pa.array(rows["difficulty"], pa.int32())})
