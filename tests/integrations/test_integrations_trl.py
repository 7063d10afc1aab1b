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


def config_kwargs(tmp_path, **overrides) -> dict:
    base = {"output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 6,
            "learning_rate": 1e-3, "logging_steps": 1, "report_to": [], "save_strategy": "no",
            "use_cpu": True, "dataloader_num_workers": 0, "seed": 0, "max_length": 64, "disable_tqdm": True,
            "bf16": False}
    return {**base, **overrides}


def sft_config(tmp_path, **overrides) -> SFTConfig:
    return SFTConfig(**config_kwargs(tmp_path, **overrides))


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
    rows = [{"prompt": f"{i}+{i + 1}=", "completion": str(2 * i + 1),
             "weight": w} for i, w in enumerate(weights)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = WeightedSFTTrainer(model=model, args=sft_config(tmp_path),
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
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
    assert (client.acked == client.leased == view["progress"][0]["shards"]
            and client.conflicts == client.dropped == 0)
    assert 0 < trainer.state.global_step < 50  # the run ended the training


def test_gkd_trainer_loss_is_the_weighted_mean_of_row_jsds(tmp_path, tiny_model_dir):
    from trl.experimental.gkd import GKDConfig

    from paced.integrations.trl_gkd import WeightedGKDTrainer

    weights = [0.5, 2.0, 0.0, 1.0]
    rows = [{"messages": [{"role": "user", "content": f"{i}+{i}="},
                          {"role": "assistant", "content": str(2 * i)}],
             "weight": w} for i, w in enumerate(weights)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    student, teacher = (AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
                        for _ in range(2))
    with torch.no_grad():  # a teacher unlike the student: the divergence is not 0
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    config = GKDConfig(**config_kwargs(tmp_path, per_device_train_batch_size=4, lmbda=0.0, beta=0.5))
    trainer = WeightedGKDTrainer(model=student, teacher_model=teacher, args=config,
                                 processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows))
    batch = trainer.data_collator(rows)
    per_row = []
    with torch.no_grad():
        for i in range(len(rows)):  # each row alone: JSD_0.5 per completion token, averaged
            ids, mask = batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1]
            s = torch.softmax(student(input_ids=ids, attention_mask=mask).logits[0, :-1], -1)
            t = torch.softmax(teacher(input_ids=ids, attention_mask=mask).logits[0, :-1], -1)
            m = 0.5 * s + 0.5 * t
            jsd = 0.5 * (t * (t / m).log()).sum(-1) + 0.5 * (s * (s / m).log()).sum(-1)
            per_row.append(float(jsd[batch["labels"][i, 1:] != -100].mean()))
    expected = sum(w * x for w, x in zip(weights, per_row, strict=True)) / sum(weights)
    assert abs(expected - sum(per_row) / len(per_row)) > 1e-5  # the weights change the loss
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged[0] == pytest.approx(expected, rel=1e-3, abs=1e-6)
