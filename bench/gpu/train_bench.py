"""Distillation training throughput, side by side: `paced train` (off-policy forward KL, fused or
logits loss path), TRL's GKDTrainer (lmbda=0 off-policy, beta=0 forward KL, seq_kd=False) and a
plain lower bound (student forward+backward with cross-entropy plus a no-grad teacher forward), on
the same random-init student/teacher (Qwen2-0.5B/1.5B shapes, Llama layers), the same synthetic
prompt/completion rows and the same AdamW.

    python3 bench/gpu/train_bench.py setup --work W --size full|tiny      # tokenizer, models, shard folder
    python3 bench/gpu/train_bench.py plain|paced|trl --work W --out RESULTS.jsonl \
        [--device cuda] [--loss-path fused|logits]
    python3 bench/gpu/train_bench.py report --out RESULTS.jsonl --table TABLE.md

Adapted from ../shared/gpu-check/train_bench.py (the kit that measured issue 17's table).

Each method runs in its own process (clean peak-memory numbers; one failure leaves the others):
WARMUP optimizer steps, then STEPS timed ones (CUDA synchronised at each step end).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

WARMUP, STEPS = int(os.environ.get("G2_WARMUP", 3)), int(os.environ.get("G2_STEPS", 20))
BATCH, LR = 8, 1e-4
PROMPT_WORDS, COMPLETION_WORDS = 127, 383  # + BOS, + EOS: 128 + 384 = 512 tokens a row
SIZES = {
    # Qwen2-0.5B / Qwen2-1.5B shapes (tied embeddings) as Llama layers (no qkv bias), random init
    "full": {"vocab": 151936,
             "student": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, intermediate_size=4864),
             "teacher": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                             num_key_value_heads=2, intermediate_size=8960)},
    "tiny": {"vocab": 2003,
             "student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128),
             "teacher": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                             num_key_value_heads=2, intermediate_size=192)},
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(vocab_size: int):
    """WordLevel over '<pad> <s> </s> <unk> w4 ... w{V-1}', whitespace split, BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right", model_max_length=1024)


def make_rows(n: int, vocab_size: int) -> list[dict]:
    rng = random.Random(0)

    def words(k):
        return " ".join(f"w{rng.randrange(len(SPECIALS), vocab_size)}" for _ in range(k))

    return [{"position": i, "problem_id": f"p{i:05d}", "prompt": words(PROMPT_WORDS),
             "completion": words(COMPLETION_WORDS), "weight": 1.0, "pass_rate": 0.5, "n": 8,
             "dataset": "synthetic", "guard": "none"} for i in range(n)]


def shard_schema():
    import pyarrow as pa

    return pa.schema([("position", pa.int64()), ("problem_id", pa.string()), ("prompt", pa.string()),
                      ("completion", pa.string()), ("weight", pa.float64()), ("pass_rate", pa.float64()),
                      ("n", pa.int64()), ("dataset", pa.string()), ("guard", pa.string())])


def setup(a) -> None:
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    work, size = Path(a.work), SIZES[a.size]
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = build_tokenizer(size["vocab"])
    assert len(tok) == size["vocab"], len(tok)
    dev = a.device if torch.cuda.is_available() or a.device == "cpu" else "cpu"
    for name, seed, dtype in (("student", 0, torch.float32), ("teacher", 1, torch.bfloat16)):
        # Llama layers (AutoTokenizer on a qwen2 folder swaps in Qwen2Tokenizer's byte-level pre-tokenizer)
        cfg = LlamaConfig(vocab_size=size["vocab"], tie_word_embeddings=True, max_position_embeddings=1024,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_bias=False,
                          rms_norm_eps=1e-6, **size[name])
        torch.manual_seed(seed)
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
        model.to(dtype).save_pretrained(work / name, safe_serialization=True)
        tok.save_pretrained(work / name)
        print(name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params", dtype, flush=True)
        del model
    rows = make_rows(256, size["vocab"])
    tok = AutoTokenizer.from_pretrained(work / "student")  # as every trainer loads it
    ids = tok([rows[0]["prompt"]])["input_ids"][0], tok([rows[0]["completion"]],
                                                        add_special_tokens=False)["input_ids"][0]
    assert len(ids[0]) == PROMPT_WORDS + 1 and len(ids[1]) == COMPLETION_WORDS and 3 not in ids[0] + ids[1]
    # the manifest folder as `paced manifest build` writes it: shard-NNNNN.parquet (SHARD_SCHEMA)
    # + manifest.json
    m = work / "manifest"
    m.mkdir(exist_ok=True)
    digests, shard_size = {}, 64
    for k, start in enumerate(range(0, len(rows), shard_size)):
        path = m / f"shard-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[start:start + shard_size], schema=shard_schema()), path)
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    pq.write_table(pa.table({"position": [r["position"] for r in rows],
                             "problem_id": [r["problem_id"] for r in rows],
                             "weight": [1.0] * len(rows)}), m / "manifest.parquet")
    (m / "manifest.json").write_text(json.dumps({
        "inputs": {"student_id": "synthetic-student", "dataset": "synthetic", "snapshot_id": None,
                   "scheme": "uniform", "mode": "weighted-loss", "seed": 0, "epoch": 0},
        "items": len(rows), "measured": 0, "unmeasured": len(rows), "zero_weight": 0,
        "with_reference": len(rows),
        "effective_sample_size": float(len(rows)), "shards": len(digests), "shard_size": shard_size,
        "guard": "none", "sha256": digests}, indent=1))
    (work / "rows.json").write_text(json.dumps(rows))
    print(json.dumps({"setup_seconds": round(time.perf_counter() - t0, 1), "device": dev}), flush=True)


# ---------------------------------------------------------------- timing


class Clock:
    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")
        self.marks: list[float] = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def mark(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def result(self, method: str, tokens_per_step: int, completion_per_step: int, **extra) -> dict:
        torch = self.torch
        timed = self.marks[-(STEPS + 1):]  # end of warm-up step WARMUP .. end of the last step
        steps = len(timed) - 1
        seconds = timed[-1] - timed[0] if steps > 0 else float("nan")
        ms = [1000 * (b - a) for a, b in zip(timed, timed[1:], strict=False)]
        out = {"method": method, "steps_timed": steps, "step_ms": round(1000 * seconds / max(steps, 1), 1),
               "step_ms_min": round(min(ms), 1) if ms else None,
               "step_ms_max": round(max(ms), 1) if ms else None,
               "tokens_per_s": round(tokens_per_step * steps / seconds) if steps else None,
               "completion_tokens_per_s": round(completion_per_step * steps / seconds) if steps else None,
               "tokens_per_step": tokens_per_step, "marks": len(self.marks)}
        if self.cuda:
            out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            out["gpu"] = torch.cuda.get_device_name()
        out.update(extra)
        return out


def emit(a, result: dict) -> None:
    print(json.dumps(result), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(result) + "\n")


# ---------------------------------------------------------------- (a) paced train


def run_paced(a) -> None:
    import argparse as ap

    from paced.trainer import cli as tcli
    from paced.trainer.loop import train

    work = Path(a.work)
    parser = ap.ArgumentParser()
    tcli.add_arguments(parser)
    args = parser.parse_args(["--student", str(work / "student"), "--teacher", str(work / "teacher"),
                              "--from", str(work / "manifest"), "--out", str(work / "paced_out"),
                              "--loss", "forward", "--steps", str(WARMUP + STEPS), "--lr", str(LR),
                              "--batch-size", str(BATCH), "--max-length", "1024", "--weight-decay", "0.0",
                              "--max-grad-norm", "1.0", "--device", a.device, "--no-progress",
                              "--loss-path", a.loss_path])
    config = tcli.config_from_args(args)
    clock = Clock(a.device)
    seen = {}

    def on_step(step, model, tokenizer):  # at step 0 and after every optimizer step
        clock.mark()
        seen["param_dtype"] = str(next(model.parameters()).dtype)

    summary = train(config, on_step=on_step)
    done = time.perf_counter()
    losses = {k: summary.get(k) for k in ("loss_first", "loss_last", "train_tokens", "train_seconds")}
    emit(a, clock.result(f"paced train --loss forward --loss-path {a.loss_path} (off-policy)", BATCH * 512,
                         BATCH * 384, final_save_s=round(done - clock.marks[-1], 1), **seen, **losses,
                         note="fp32 student weights + bf16 autocast, bf16 teacher; " + (
                             "fused head + loss from the last hidden states" if a.loss_path == "fused" else
                             "logits only for completion positions (logits_to_keep); chunked loss")))


# ---------------------------------------------------------------- (b) TRL GKDTrainer


def run_trl(a) -> None:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    work = Path(a.work)
    tok = AutoTokenizer.from_pretrained(work / "student")
    rows = json.loads((work / "rows.json").read_text())
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    cuda = a.device.startswith("cuda")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher",
                                                   dtype=torch.bfloat16 if cuda else torch.float32)

    def collate(examples):
        """paced's tokenisation: BOS + prompt, completion + EOS, right padded; labels -100 off the
        completion."""
        p = tok([e["prompt"] for e in examples])["input_ids"]
        c = tok([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
        seqs = [x + y + [tok.eos_token_id] for x, y in zip(p, c, strict=True)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, (s, x) in enumerate(zip(seqs, p, strict=True)):
            ids[b, :len(s)] = torch.tensor(s)
            attn[b, :len(s)] = 1
            labels[b, len(x):len(s)] = ids[b, len(x):len(s)]
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    clock = Clock(a.device)
    logged = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.mark()

        def on_step_end(self, args, state, control, **kw):
            clock.mark()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logged.append(logs["loss"])

    cfg = GKDConfig(output_dir=str(work / "trl_out"), per_device_train_batch_size=BATCH,
                    gradient_accumulation_steps=1,
                    max_steps=WARMUP + STEPS, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0,
                    weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=cuda, fp16=False,
                    use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
                    disable_tqdm=True,
                    dataloader_num_workers=0, seed=0, max_length=1024, lmbda=0.0, beta=0.0, seq_kd=False,
                    temperature=1.0, gradient_checkpointing=False, disable_dropout=True)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                         processing_class=tok, data_collator=collate, callbacks=[Timer()])
    info = {"trl": trl.__version__, "optimizer": type(trainer.create_optimizer()).__name__,
            "mixed_precision": str(trainer.accelerator.mixed_precision),
            "teacher_dtype": str(next(trainer.teacher_model.parameters()).dtype),
            "student_param_dtype": str(next(trainer.model.parameters()).dtype)}
    trainer.train()
    emit(a, clock.result("TRL GKDTrainer (lmbda=0, beta=0, seq_kd=False)", BATCH * 512, BATCH * 384, **info,
                         loss_first=logged[0] if logged else None, loss_last=logged[-1] if logged else None,
                         note="Trainer bf16=True (autocast over fp32 student), bf16 teacher; full-sequence "
                              "logits for both models; loss over completion tokens"))


# ---------------------------------------------------------------- (c) plain lower bound


def run_plain(a) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(a.work)
    cuda = a.device.startswith("cuda")
    tok = AutoTokenizer.from_pretrained(work / "student")
    rows = json.loads((work / "rows.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32).to(a.device).train()
    teacher = AutoModelForCausalLM.from_pretrained(
        work / "teacher",
        dtype=torch.bfloat16 if cuda else torch.float32).to(a.device).eval().requires_grad_(False)
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    clock = Clock(a.device)
    clock.mark()
    losses, vocab = [], student.config.vocab_size
    for step in range(WARMUP + STEPS):
        batch = rows[step * BATCH:(step + 1) * BATCH]
        p = tok([r["prompt"] for r in batch])["input_ids"]
        c = tok([r["completion"] for r in batch], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([x + y + [tok.eos_token_id] for x, y in zip(p, c, strict=True)], device=a.device)
        # logits for the positions that predict the completion (+1 unused)
        keep = ids.shape[1] - len(p[0]) + 1
        opt.zero_grad(set_to_none=True)
        with autocast:
            with torch.no_grad():
                teacher(input_ids=ids, use_cache=False, logits_to_keep=keep)
            logits = student(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, len(p[0]):].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        clock.mark()
    emit(a, clock.result("plain: student CE fwd+bwd + no-grad teacher fwd", BATCH * 512, BATCH * 384,
                         loss_first=losses[0], loss_last=losses[-1],
                         note="same autocast/dtypes and logits_to_keep as paced; torch AdamW (foreach), clip "
                              "1.0"))


# ---------------------------------------------------------------- report


def report(a) -> None:
    results = [json.loads(x) for x in Path(a.out).read_text().splitlines() if x.strip()]
    lines = ["| method | tokens/s (all 512/row) | completion tokens/s | step ms (min-max) | peak GiB "
             "(reserved) |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['method']} | {r['tokens_per_s']} | {r['completion_tokens_per_s']} | "
                     f"{r['step_ms']} "
                     f"({r['step_ms_min']}-{r['step_ms_max']}) | {r.get('peak_gib')} "
                     f"({r.get('peak_reserved_gib')}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.table:
        Path(a.table).write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["setup", "paced", "trl", "plain", "report"])
    p.add_argument("--work", default="/tmp/g2work")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="results.jsonl")
    p.add_argument("--table", default=None)
    p.add_argument("--loss-path", default="fused", choices=["fused", "logits"])
    a = p.parse_args(argv)
    {"setup": setup, "paced": run_paced, "trl": run_trl, "plain": run_plain, "report": report}[a.what](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
