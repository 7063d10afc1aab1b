"""paced's weights in TRL's GKD trainer (`trl.experimental.gkd`): the generalised JSD of each
row, averaged over its completion tokens, times its `weight`, normalised by the batch's weight
sum. Rows are conversations (`messages`), as GKD reads them; `lmbda` > 0 samples completions
from the student (on-policy), each row keeping its weight.
"""

from __future__ import annotations

import torch
from trl.experimental.gkd import GKDTrainer

from paced.integrations.trl import Weighted, weighted_rows


class WeightedGKDTrainer(Weighted, GKDTrainer):
    """`GKDTrainer` whose loss honours each row's `weight`; `shard_client` as for
    `WeightedSFTTrainer`."""

    def __init__(self, *args, shard_client=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._paced_setup(shard_client)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = self._take_weights(model, inputs)
        student = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = self.teacher_model(input_ids=inputs["input_ids"],
                                         attention_mask=inputs["attention_mask"])
        jsd = self.generalized_jsd_loss(student.logits[:, :-1, :], teacher.logits[:, :-1, :], beta=self.beta,
                                        reduction="none")  # [B, T-1, V]
        labels = inputs["labels"][:, 1:]
        loss = weighted_rows(jsd.sum(-1), labels != -100, weights, student.logits)
        return (loss, student) if return_outputs else loss
