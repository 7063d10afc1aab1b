"""paced's weights in TRL: each example's loss times its `weight`, normalised by the batch's
weight sum, as `paced train` does (Σ_i w_i L_i / Σ_i w_i, L_i the mean loss over row i's
completion tokens).

    from paced.integrations.trl import WeightedSFTTrainer
    trainer = WeightedSFTTrainer(model=..., args=SFTConfig(...), train_dataset=rows)      # shard files
    trainer = WeightedSFTTrainer(..., train_dataset=client.dataset(), shard_client=client)  # the service

TRL drops columns the model does not take; `WeightedSFTTrainer` keeps `weight` (and the
client's `paced_done` mark), `WeightedCollator` carries them past TRL's collator, and with a
`shard_client` the trainer tells the client which shards each trained batch finished and acks
them after the optimizer step (`ShardStepCallback`). Needs `trl` (`pip install paced[trl]`).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from paced.client.shards import DONE_COLUMN
from paced.errors import InputError

WEIGHT = "weight"


class WeightedCollator:
    """Wraps a collator: takes `weight` (and `paced_done`) out of each example, collates the
    rest, and puts them back as a float tensor `weight` [B] (and a list `paced_done`)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        if any(WEIGHT not in e for e in examples):
            raise InputError("an example has no `weight` column: train on paced shards (or add a weight per "
                             "row)")
        weights = [float(e[WEIGHT] if e[WEIGHT] is not None else 0.0) for e in examples]
        done = [e.get(DONE_COLUMN) or "" for e in examples]
        batch = self.collator([{k: v for k, v in e.items()
                                if k not in (WEIGHT, DONE_COLUMN)} for e in examples])
        batch[WEIGHT] = torch.tensor(weights, dtype=torch.float32)
        batch[DONE_COLUMN] = done
        return batch


class ShardStepCallback(TrainerCallback):
    """Acks the shards a step finished, after its optimizer step (`client.step_done()`)."""

    def __init__(self, client):
        self.client = client

    def on_step_end(self, args, state, control, **kwargs):
        self.client.step_done()


def weighted_sequence_loss(logits, labels, weights):
    """Σ_i w_i L_i / Σ_i w_i, L_i = mean next-token NLL over row i's labelled tokens (labels ≠
    -100, shifted by one: logits[t] predicts labels[t + 1]). A batch of zero weight gives 0
    with a gradient path."""
    logits, labels = logits[:, :-1, :].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return weighted_rows(nll, labels != -100, weights, logits)


def weighted_rows(per_token, mask, weights, anchor):
    """Σ_i w_i mean_t(per_token[i, t] over mask[i]) / Σ_i w_i; 0 times `anchor` (a gradient
    path) when every weight is 0."""
    per_row = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    weights = weights.to(per_row.device, per_row.dtype)
    total = weights.sum()
    if float(total) == 0.0:
        return anchor.sum() * 0.0
    return (weights * per_row).sum() / total


class Weighted:
    """What makes a TRL trainer honour paced's weights (mixed in before the trainer class):
    the columns kept, the collator wrapped, the shard client told about trained batches."""

    def _paced_setup(self, shard_client) -> None:
        if getattr(self.args, "packing", False) or getattr(self.args, "padding_free", False):
            raise InputError("packing / padding_free merge rows, so a row's weight cannot be applied: "
                             "set packing=False and padding_free=False")
        self.data_collator = WeightedCollator(self.data_collator)
        self.model_accepts_loss_kwargs = False  # the Trainer averages micro-batches (gradient accumulation)
        self.shard_client = shard_client
        if shard_client is not None:
            shard_client.track_batches()
            self.add_callback(ShardStepCallback(shard_client))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (WEIGHT, DONE_COLUMN):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _take_weights(self, model, inputs: dict):
        """The batch's weights, out of `inputs`; the shard client told which shards it finishes."""
        weights = inputs.pop(WEIGHT)
        done = inputs.pop(DONE_COLUMN, None)
        if self.shard_client is not None and done is not None and model.training:
            self.shard_client.consumed(done)
        return weights


class WeightedSFTTrainer(Weighted, SFTTrainer):
    """`trl.SFTTrainer` whose loss honours each row's `weight` (see the module docstring).
    `shard_client`: a `paced.client.ShardClient` whose `dataset()` is the train set; its shards
    are acked after the optimizer step that trained on their last row."""

    def __init__(self, *args, shard_client=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._paced_setup(shard_client)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = self._take_weights(model, inputs)
        labels = inputs.pop("labels")
        keep = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
        outputs = model(**{k: v for k, v in inputs.items() if k in keep}, use_cache=False)
        loss = weighted_sequence_loss(outputs.logits, labels, weights)
        return (loss, outputs) if return_outputs else loss
