"""Generation backends on a real tiny Llama: the same behaviour from vLLM and transformers.

Tests taking the `backend` fixture run once per backend; the vLLM ones are marked `vllm` and
share one engine per session (conftest.py). A random-init model writes gibberish from the
character vocabulary, which is all these tests need.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from paced.backends import SamplingConfig, default_backend_name, derive_seed, load_backend, model_id
from paced.backends.base import cut_at_stop
from paced.errors import InputError

PROMPTS = ["1=", "12+345=", "7-4=", "9999+1=", "30-8=", "5="]  # different lengths: padding


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from paced.backends.hf_backend import HFBackend

    with HFBackend(tiny_model_dir, batch_size=12) as backend:
        yield backend


@pytest.fixture(params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def backend(request, hf):
    return hf if request.param == "transformers" else request.getfixturevalue("vllm_backend")


def _decode(backend, completion) -> str:
    return backend.tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)


# --- the shared nouns ------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "message"), [
    ("n", 0, "`n` must be >= 1, got 0"),
    ("temperature", -1, "`temperature` must be >= 0, got -1"),
    ("top_p", 0, "`top_p` must be in (0, 1], got 0"),
    ("top_p", 1.5, "`top_p` must be in (0, 1], got 1.5"),
    ("max_new_tokens", 0, "`max_new_tokens` must be >= 1, got 0"),
    ("stop", ("",), "`stop` must be non-empty strings"),
])
def test_sampling_config_rejects_bad_values_saying_what_to_fix(field, value, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingConfig(**{field: value})


def test_sampling_hash_is_stable_and_changes_with_every_field():
    base = SamplingConfig()
    assert base.hash() == "9b3384c0f526"  # stable across processes and releases
    assert SamplingConfig(stop=["+"]).stop == ("+",)  # lists become tuples: hashable, frozen
    changed = [SamplingConfig(n=4), SamplingConfig(temperature=0.7), SamplingConfig(top_p=0.9),
               SamplingConfig(max_new_tokens=8), SamplingConfig(seed=1), SamplingConfig(stop=("+",)),
               SamplingConfig(chat_template=True)]
    hashes = {c.hash() for c in changed} | {base.hash()}
    assert len(hashes) == len(changed) + 1


def test_derive_seed_is_stable_and_keyed():
    assert derive_seed(0, "p-1") == 1926579927730023020
    assert derive_seed(7, 3) == 1232913860685451959
    assert derive_seed(7, 3) != derive_seed(7, 4) != derive_seed(8, 4)


def test_model_id_changes_with_weights_and_not_with_location(tmp_path, tiny_model_dir):
    from paced.tasks.models import build_random_model

    first = model_id(tiny_model_dir)
    assert first.startswith("m-") and len(first) == 14
    assert model_id(tiny_model_dir) == first
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    (copy / "README.md").write_text("notes do not change outputs")
    assert model_id(copy) == first
    build_random_model(copy, seed=1)  # same config and tokenizer, new weights
    assert model_id(copy) != first


def test_missing_or_incomplete_model_dir_is_an_input_error_naming_the_path(tmp_path):
    for name in ("transformers", "vllm", None):
        with pytest.raises(InputError, match="model directory not found: .*nowhere"):
            load_backend(name, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json in model directory: .*empty"):
        load_backend("transformers", tmp_path / "empty")
    with pytest.raises(InputError, match="no config.json"):
        model_id(tmp_path / "empty")


def test_unknown_backend_name_is_an_input_error(tiny_model_dir):
    with pytest.raises(InputError, match="unknown backend 'tgi'"):
        load_backend("tgi", tiny_model_dir)


def test_auto_picks_vllm_when_installed():
    installed = importlib.util.find_spec("vllm") is not None
    assert default_backend_name() == ("vllm" if installed else "transformers")


# --- both backends ---------------------------------------------------------------------------

def test_n_completions_per_prompt_in_order_whatever_the_batch(backend):
    params = SamplingConfig(n=3, max_new_tokens=10, seed=5)
    seeds = [derive_seed(5, f"p{i}") for i in range(len(PROMPTS))]
    together = backend.generate(PROMPTS, params, seeds=seeds)
    assert [len(c) for c in together] == [3] * len(PROMPTS)
    for i in (0, 3, 5):  # each prompt alone, and with other neighbours, gives the same samples
        assert backend.generate([PROMPTS[i]], params, seeds=[seeds[i]])[0] == together[i]
    reordered = backend.generate(PROMPTS[::-1], params, seeds=seeds[::-1])
    assert reordered[::-1] == together
    assert len({c.text for cs in together for c in cs}) > 10  # samples differ from each other


def test_rerun_is_identical_and_default_seeds_follow_the_prompt_index(backend):
    params = SamplingConfig(n=4, max_new_tokens=12, seed=11)
    first = backend.generate(PROMPTS, params)
    assert backend.generate(PROMPTS, params) == first
    assert backend.generate([PROMPTS[2]], params, seeds=[derive_seed(11, 2)])[0] == first[2]
    other = backend.generate(PROMPTS, SamplingConfig(n=4, max_new_tokens=12, seed=12))
    assert other != first


def test_max_new_tokens_bounds_every_completion_and_counts_agree(backend):
    eos = backend.tokenizer.eos_token_id
    out = backend.generate(PROMPTS, SamplingConfig(n=8, max_new_tokens=5))
    flat = [c for cs in out for c in cs]
    assert all(1 <= c.tokens <= 5 and c.tokens == len(c.token_ids) for c in flat)
    assert {c.finish_reason for c in flat} == {"stop", "length"}
    for c in flat:
        assert c.text == _decode(backend, c)
        if c.finish_reason == "length":
            assert c.tokens == 5 and eos not in c.token_ids
        else:
            assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]


def test_stop_strings_cut_the_text_and_end_the_completion(backend):
    params = SamplingConfig(n=8, max_new_tokens=16, stop=("+", "00"))
    flat = [c for cs in backend.generate(PROMPTS, params) for c in cs]
    by_stop = [c for c in flat if cut_at_stop(_decode(backend, c), params.stop)[1]]
    assert len(by_stop) > 10
    for c in flat:
        assert "+" not in c.text and "00" not in c.text
        assert c.text == cut_at_stop(_decode(backend, c), params.stop)[0]
    for c in by_stop:  # the last token completed the stop string: nothing generated after it
        assert c.finish_reason == "stop"
        before = backend.tokenizer.decode(list(c.token_ids[:-1]), skip_special_tokens=True)
        assert not cut_at_stop(before, params.stop)[1]


def test_greedy_repeats_one_completion_and_a_tiny_nucleus_is_greedy(backend):
    greedy = backend.generate(PROMPTS, SamplingConfig(n=3, temperature=0, max_new_tokens=12))
    assert all(cs[0] == cs[1] == cs[2] for cs in greedy)
    nucleus = backend.generate(PROMPTS, SamplingConfig(n=3, top_p=1e-4, max_new_tokens=12, seed=3))
    assert nucleus == greedy


def test_first_token_frequencies_match_the_models_tempered_nucleus(backend, hf):
    """2000 one-token samples against softmax(logits / T) cut to the top-p nucleus."""
    import torch

    ids = torch.tensor([hf.tokenizer("12+3=")["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(hf.model(ids).logits[0, -1] / 0.5, dim=-1)
    ranked = probs.argsort(descending=True)
    cumulative = probs[ranked].cumsum(0)
    top_p = float(cumulative[2] + cumulative[3]) / 2  # the top 4 tokens under either convention
    expected = {int(t): float(probs[t] / cumulative[3]) for t in ranked[:4]}
    params = SamplingConfig(n=2000, temperature=0.5, top_p=top_p, max_new_tokens=1, seed=1)
    counts: dict[int, int] = {}
    for c in backend.generate(["12+3="], params)[0]:
        counts[c.token_ids[0]] = counts.get(c.token_ids[0], 0) + 1
    assert set(counts) <= set(expected)
    tv = sum(abs(counts.get(t, 0) / 2000 - p) for t, p in expected.items()) / 2
    assert tv < 0.05, (counts, expected)


def test_completions_end_at_the_models_context(backend):
    greedy = backend.generate(["1"], SamplingConfig(n=1, temperature=0, max_new_tokens=500))[0][0]
    assert (greedy.tokens, greedy.finish_reason) == (62, "length")  # BOS + "1" + 62 = 64
    with pytest.raises(InputError, match="prompt 1 is 65 tokens; the model's context is 64"):
        backend.generate(["1=", "1" * 64], SamplingConfig(n=1))


def test_chat_template_renders_each_prompt_as_one_user_turn(backend):
    params = SamplingConfig(n=2, max_new_tokens=8, seed=2)
    with pytest.raises(InputError, match="no chat template"):
        backend.generate(["1="], SamplingConfig(chat_template=True))
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}" \
               "{% if add_generation_prompt %}={% endif %}"
    backend.tokenizer.chat_template = template
    try:
        chat = backend.generate(["12+3", "7"], SamplingConfig(n=2, max_new_tokens=8, seed=2,
                                                              chat_template=True))
    finally:
        backend.tokenizer.chat_template = None
    assert chat == backend.generate(["12+3=", "7="], params)


def test_seeds_must_match_the_prompts(backend):
    with pytest.raises(InputError, match="got 1 seeds for 2 prompts"):
        backend.generate(["1=", "2="], SamplingConfig(n=1), seeds=[3])


# --- transformers only -----------------------------------------------------------------------

def test_from_model_matches_the_loaded_backend_and_restores_train_mode(hf):
    from transformers import AutoModelForCausalLM

    from paced.backends.hf_backend import HFBackend

    model = AutoModelForCausalLM.from_pretrained(hf.model.name_or_path).train()
    params = SamplingConfig(n=4, max_new_tokens=10)
    with HFBackend.from_model(model, hf.tokenizer, batch_size=8) as wrapped:
        assert wrapped.generate(PROMPTS, params) == hf.generate(PROMPTS, params)
    assert model.training
    with pytest.raises(InputError, match="closed"):
        wrapped.generate(PROMPTS, params)


# --- vLLM only -------------------------------------------------------------------------------

@pytest.mark.vllm
def test_vllm_and_transformers_agree_on_greedy_text(vllm_backend, hf):
    assert str(vllm_backend.llm.llm_engine.model_config.dtype) == "torch.float32"  # as saved
    params = SamplingConfig(n=1, temperature=0, max_new_tokens=20)
    assert vllm_backend.generate(PROMPTS, params) == hf.generate(PROMPTS, params)


RESTART_SCRIPT = """
import json, sys
from paced.backends import SamplingConfig, load_backend
prompts, seeds = json.loads(sys.argv[2]), json.loads(sys.argv[3])
params = SamplingConfig(n=3, max_new_tokens=12)
runs = []
for _ in range(2):  # start, generate, close; then again in the same process
    with load_backend("vllm", sys.argv[1]) as backend:
        runs.append([[c.text for c in cs] for cs in backend.generate(prompts, params, seeds)])
print(json.dumps(runs))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_a_restarted_engine_in_a_new_process_gives_the_same_samples(vllm_backend, tiny_model_dir):
    seeds = [derive_seed(9, i) for i in range(len(PROMPTS))]
    proc = subprocess.run(
        [sys.executable, "-c", RESTART_SCRIPT, str(tiny_model_dir), json.dumps(PROMPTS),
         json.dumps(seeds)], capture_output=True, text=True, timeout=600, check=True,
    )
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    here = vllm_backend.generate(PROMPTS, SamplingConfig(n=3, max_new_tokens=12), seeds)
    assert first == second == [[c.text for c in cs] for cs in here]


@pytest.mark.vllm
def test_vllm_refuses_an_unsupported_head_size_in_one_line(tmp_path):
    pytest.importorskip("vllm")  # after the session's engine, only the config check costs time
    from paced.backends import load_backend
    from paced.errors import InputError
    from paced.tasks.models import ModelSize, build_random_model

    model = build_random_model(tmp_path / "m", ModelSize(hidden_size=48, num_heads=2))  # head size 24
    with pytest.raises(InputError, match="head size is 24") as info:
        load_backend("vllm", model)
    assert "\n" not in str(info.value) and "--backend transformers" in str(info.value)
