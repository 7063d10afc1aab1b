"""`paced train` on the fused head + loss path (the default) against the logits path."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from trainer_helpers import build_models, make_rows, parameters, summary_of, train_args, write_shards

from paced.cli import main
from paced.errors import InputError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("fused-models"))


@pytest.mark.parametrize("loss", ["forward", "akl"])
def test_fused_and_logits_paths_train_to_the_same_student(models, tmp_path, capsys, loss):
    shards = write_shards(tmp_path / "m", make_rows(12), shard_size=4)
    finals, summaries = [], []
    for path, extra in (("fused", []), ("logits", []), ("logits", ["--loss-in-place"])):
        out = tmp_path / f"{path}{len(extra)}"
        args = train_args(models, shards, out, "--loss", loss, "--steps", "3", "--loss-path", path, *extra)
        assert main(args) == 0
        summaries.append(summary_of(capsys))
        finals.append(parameters(out / "final"))
    start = parameters(models[0])
    assert any(not torch.equal(finals[0][k], v) for k, v in start.items())  # the student moved
    for other in finals[1:]:
        for key, value in finals[0].items():
            assert_close(value, other[key], rtol=1e-4, atol=1e-6)
    losses = [s["loss_last"] for s in summaries]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) == pytest.approx(losses[2], rel=1e-5)


def test_a_model_whose_logits_are_not_its_head_is_refused_on_the_fused_path(models, tmp_path, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    scaled = tmp_path / "scaled"
    shutil.copytree(models[0], scaled)
    model = AutoModelForCausalLM.from_pretrained(scaled)
    forward = model.forward

    def scaled_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    from paced.trainer import fused

    model.forward = scaled_forward
    side = type("Side", (), {})()
    side.input_ids = torch.tensor([[1, 2, 3]])
    side.attention_mask = torch.ones(1, 3, dtype=torch.long)
    side.index = torch.tensor([[1, 2]])
    with pytest.raises(InputError, match="use --loss-path logits"):
        fused.aligned_head_input(model, side)
