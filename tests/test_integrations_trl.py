"""paced.integrations.trl: TRL's SFTTrainer honouring paced's weights, on a tiny real model, from
rows in memory and from a run of the real service (leases acked after steps, no stall)."""

import math
import time

import datasets
import httpx
import pytest
import torch
from api_fixtures import ServerThread, make_service_home
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from paced.api.app import create_app
from paced.api.settings import Settings
from paced.client import ShardClient
from paced.integrations.trl import WeightedSFTTrainer


def sft_config(tmp_path, **overrides) -> SFTConfig:
    base = {"output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 6,
            "learning_rate": 1e-3, "logging_steps": 1, "report_to": [], "save_strategy": "no", "use_cpu": True,
            "dataloader_num_workers": 0, "seed": 0, "max_length": 64, "disable_tqdm": True,
            "bf16": False}
    return SFTConfig(**{**base, **overrides})


def hand_loss(model, examples, weights) -> tuple[float, float]:
    """(Σ w_i L_i / Σ w_i, the unweighted mean of L_i): each row alone, unpadded; L_i the mean
    NLL of its labelled tokens."""
    losses = []
    with torch.no_grad():
        for example in examples:
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            mask = target != -100
            losses.append(float(torch.nn.functional.cross_entropy(logits[mask], target[mask])))
    weighted = sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)
    return weighted, sum(losses) / len(losses)


def test_sft_trainer_loss_is_the_weighted_mean_of_row_losses(tmp_path, tiny_model_dir):
    weights = [1.0, 0.0, 0.25, 2.0, 0.5, 1.5]
    rows = [{"prompt": f"{i}+{i + 1}=", "completion": str(2 * i + 1), "weight": w} for i, w in enumerate(weights)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = WeightedSFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer)
    prepared = list(trainer.train_dataset)
    assert [e["weight"] for e in prepared] == weights  # TRL kept the column
    expected, unweighted = hand_loss(model, prepared, weights)
    assert abs(expected - unweighted) > 1e-3  # the weights change the loss: the check below can fail
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(math.isfinite(x) for x in logged)
    assert logged[0] == pytest.approx(expected, abs=1e-4)  # step 1: the whole batch at the initial weights
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_sft_trainer_over_http_leases_once_and_acks_every_shard_after_steps(tmp_path, tiny_model_dir):
    home, _ = make_service_home(tmp_path, n=40)
    with ServerThread(create_app(Settings(home=home.root, retry_after_seconds=0.1))) as server:
        created = httpx.post(f"{server.url}/v1/runs", json={"student_id": "s1", "dataset": "arith",
                                                            "shard_size": 5}).json()
        run = f"{server.url}/v1/runs/{created['run_id']}"
        client = ShardClient(run, consumer="trl", ttl_seconds=300)
        trainer = WeightedSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     args=sft_config(tmp_path, max_steps=50, per_device_train_batch_size=4),
                                     train_dataset=client.dataset(), shard_client=client,
                                     processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
        assert client.leased <= 1  # setting up peeked at most one shard, and kept it
        started = time.monotonic()
        trainer.train()
        elapsed = time.monotonic() - started
        view = httpx.get(run).json()
        client.close()
    assert view["done"] and client.done and elapsed < 120  # no stall for a lease TTL
    assert client.acked == client.leased == view["progress"][0]["shards"] and client.conflicts == client.dropped == 0
    assert 0 < trainer.state.global_step < 50  # the run ended the training
