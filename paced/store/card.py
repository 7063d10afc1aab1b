"""Shard rows in the forms external trainers read, and the dataset card of a manifest folder.

- `conversational_rows`: TRL's conversational prompt–completion form (`prompt` a user turn,
  `completion` an assistant turn, each a list of {role, content}); the trainer applies the
  model's chat template.
- `dataset_card`: README.md with a `configs` block naming the shard files (one config, named by
  the shards' content), so
  `datasets.load_dataset(DIR)` and `trl sft --dataset_name DIR` load the shards and not
  manifest.parquet beside them; the manifest's inputs and counts follow as a table.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def conversational_rows(rows: pa.Table) -> pa.Table:
    """`prompt` and `completion` as one-turn conversations (a null completion stays null)."""
    def turns(column: str, role: str) -> pa.Array:
        texts = rows[column].to_pylist()
        return pa.array([None if t is None else [{"role": role, "content": t}] for t in texts],
                        pa.list_(MESSAGE))

    prompt, completion = turns("prompt", "user"), turns("completion", "assistant")
    rows = rows.set_column(rows.schema.get_field_index("prompt"), "prompt", prompt)
    return rows.set_column(rows.schema.get_field_index("completion"), "completion", completion)


def dataset_card(summary: dict) -> str:
    """README.md of a manifest folder (deterministic: the same summary gives the same text)."""
    inputs = summary["inputs"]
    facts = {**{f"inputs.{k}": v for k, v in inputs.items()},
             **{k: summary[k] for k in ("items", "shards", "shard_size", "effective_sample_size", "form",
                                        "require_reference", "left_out_without_reference",
                                        "measured_with_chat_template", "paced_version") if k in summary}}
    table = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in facts.items())
    form = ("conversational prompt–completion (lists of {role, content}: the trainer applies the chat "
            "template)"
            if summary.get("form") == "conversational" else "prompt–completion text")
    # A config name unique to the shards' bytes: `datasets` caches a folder's data under its
    # folder name and config name only, so two folders named alike would share a cache.
    digest = hashlib.sha256(json.dumps(summary["sha256"], sort_keys=True).encode()).hexdigest()[:16]
    return f"""---
configs:
- config_name: paced-{digest}
  default: true
  data_files:
  - split: train
    path: "shard-*.parquet"
tags:
- paced
- distillation
---
# paced manifest: {inputs['dataset']} weighted for {inputs['student_id']}

Rows in {form}, in epoch order, with the columns `position`, `problem_id`, `prompt`,
`completion` (the teacher's verified reference), `weight`, `pass_rate`, `n`, `dataset`,
`guard`. Train with each row's loss multiplied by `weight` and normalised by the batch's
weight sum (`paced.integrations.trl.WeightedSFTTrainer` does it for TRL).

    datasets.load_dataset("path/to/this/folder", split="train")

`manifest.parquet` (the epoch's items) and `manifest.json` (below, plus the sha256 of every
shard) sit beside the shards and are not part of the data set.

| what | value |
|---|---|
{table}
"""
