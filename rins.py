"""
RINS: Recursive INference Scaling (Alabdulmohsin & Zhai, arXiv 2502.07503, NeurIPS 2025), in one file.

Split a model's layers into an early block A and a late block B. RINS feeds A its own output r
times, then applies B once: x1 = A(x0), x2 = A(x1), ..., y = B(xr). The parameters stay the same;
the compute per token grows. A *signature* names the layout ("AB" plain, "A3B" RINS with r = 3,
"ABAB" repeat-all-over) and everything that makes a variant different is its *layer schedule*:
the list of layer indices in execution order, which the forward pass just walks.

Where each definition lives (the README's "Definitions" section says the same with examples):
  signature, degree and schedule       -> parse_signature, signature_units, layer_schedule
  the recursive block and `rounds`     -> recursive_block, Transformer.plan
  stochastic RINS                      -> Transformer.plan
  linear adapters                      -> Adapter, adapter_rank
  KV cache and KV sharing              -> KVCache, Transformer.forward, GPT.decoding_cache, decode_step
  sampling without a host sync         -> next_token
  compute accounting and the budget    -> expected_counts, cost_per_token, plan_budget, flops_per_token
  variants "A3B:p_skip=0.5:adapters=1" -> parse_variant
  learning-rate schedule and AdamW     -> learning_rate, adamw (shared by train.py and eval_siglip.py)
Choices the paper leaves open are marked [our choice]. The model follows nanoGPT's model.py
(GPT-2 architecture, initialisation and weight tying).
"""

import inspect
import math
import re

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

MAX_APPLICATIONS = 10_000  # layer applications per forward: a bound that turns a typo like A99999B into an error
MAX_DEGREE = 16

# -----------------------------------------------------------------------------
# Signatures, degree and schedules

def parse_signature(signature):
    """Return (letters, degree): repeats expanded ("A3B" -> "AAAB"), degree 1 unless "(...)d".

    Grammar: a signature is a string of block letters A, B, C, ..., each followed by an optional
    repeat count (ASCII digits, >= 1); the n distinct letters used must be exactly the first n
    letters of the alphabet. "(SIG)d" applies SIG inside its own blocks d times (the paper's
    degree, its Figure 1); a bare signature has degree 1. Groups cannot nest and must enclose the
    whole signature. Anything else raises ValueError naming the problem and its 0-based position.
    """
    check_signature(signature)  # from here on the signature is well formed
    grouped = signature.startswith("(")
    body, _, degree = signature[1:].partition(")") if grouped else (signature, "", "")
    letters = "".join(letter * int(count or 1) for letter, count in re.findall(r"([A-Z])([0-9]*)", body))
    return letters, int(degree or 1)

def check_signature(s):
    """Raise ValueError at the first thing in s that the grammar of parse_signature does not allow, naming
    it and its 0-based position (read left to right, so the message points where a reader looks first)."""
    if not isinstance(s, str) or not s.strip():
        raise ValueError(f"empty signature {s!r} at position 0: write blocks as letters, e.g. 'A3B'")
    grouped = s[0] == "("
    close = s.find(")") if grouped else len(s)
    if close == -1:
        raise ValueError(f"signature {s!r}: '(' at position 0 is never closed")
    if grouped and close == 1:
        raise ValueError(f"signature {s!r}: empty group '()' at position 0")
    body_start, length = (1 if grouped else 0), 0
    for m in re.finditer(r"([A-Z])([0-9]*)|(.)", s[body_start:close], re.DOTALL):
        pos = body_start + m.start()
        if m.group(3) is not None:
            raise ValueError(f"signature {s!r}: unexpected {m.group(3)!r} at position {pos}: "
                             f"{unexpected_character(m.group(3), grouped)}")
        count = int(m.group(2) or 1)
        if count == 0:
            raise ValueError(f"signature {s!r}: repeat count 0 at position {pos + 1}: every block runs at least once")
        length += count  # checked as it grows: "A99999999999B" stops here, before any expansion
        if length > MAX_APPLICATIONS:
            raise ValueError(f"signature {s!r}: more than {MAX_APPLICATIONS} blocks by position {pos}: "
                             f"use a smaller repeat count")
    if grouped:
        digits = re.match(r"[0-9]*", s[close + 1:]).group()
        pos = close + 1 + len(digits)
        if pos < len(s):
            raise ValueError(f"signature {s!r}: unexpected {s[pos]!r} at position {pos}: "
                             f"nothing may follow the degree of '(...)d'")
        if not 1 <= int(digits or 1) <= MAX_DEGREE:
            raise ValueError(f"signature {s!r}: degree {int(digits)} at position {close + 1}: "
                             f"the degree must be in 1..{MAX_DEGREE}")
    k = len(set(re.findall(r"[A-Z]", s[body_start:close])))
    for m in re.finditer(r"[A-Z]", s):
        if ord(m.group()) - ord("A") >= k:
            raise ValueError(f"signature {s!r}: letter {m.group()!r} at position {m.start()}: with {k} "
                             f"distinct blocks the letters must be A..{chr(ord('A') + k - 1)}, no gaps")

def unexpected_character(c, grouped):
    """Why a character that is not a letter with its repeat count cannot stand where it stands."""
    if c.isdigit():
        return "a repeat count is ASCII digits after a letter"
    if c == "(":
        return "groups cannot be nested" if grouped else "a group '(...)d' must enclose the whole signature"
    if c == ")":
        return "')' without a matching '('"
    return "blocks are capital letters A, B, C, ... followed by an optional repeat count"

def signature_units(signature, n_layer):
    """The signature's top-level units: one list of layer indices per letter, in execution order.

    The n_layer layers are cut into n equal consecutive chunks, A first; a letter that appears
    again reuses its chunk's weights. For degree d each unit is itself the signature applied
    (d - 1 times) inside that letter's chunk:

        expand(layers, d) = layers                                   if d == 0
                          = concat(expand(chunk(letter), d - 1) for letter in letters)

    so "(A3B)2" over 12 layers has units A', A', A', B' with A' = [0,1,2] x 3 + [3,4,5] and
    B' = [6,7,8] x 3 + [9,10,11]. Degree d needs n_layer divisible by n^d.
    """
    letters, degree = parse_signature(signature)
    k = len(set(letters))
    if n_layer % k ** degree != 0:
        raise ValueError(f"signature {signature!r}: n_layer={n_layer} is not divisible by "
                         f"{k}^{degree} = {k ** degree} ({k} blocks, degree {degree})")
    length = n_layer * (len(letters) / k) ** degree  # the schedule's length, before building it
    if length > MAX_APPLICATIONS:
        raise ValueError(f"signature {signature!r}: its schedule has {length:.3g} layer applications over "
                         f"{n_layer} layers, more than {MAX_APPLICATIONS}: use fewer repeats or a lower degree")

    def chunk(layers, letter):  # A: the first k-th of the layers, B: the second, ...
        size, j = len(layers) // k, ord(letter) - ord("A")
        return layers[j * size:(j + 1) * size]

    def expand(layers, d):
        if d == 0:
            return list(layers)
        return [i for c in letters for i in expand(chunk(layers, c), d - 1)]

    return [expand(chunk(range(n_layer), c), degree - 1) for c in letters]

def layer_schedule(signature, n_layer):
    """Layer indices in execution order, e.g. layer_schedule("A2B", 4) == [0, 1, 0, 1, 2, 3]."""
    return [i for unit in signature_units(signature, n_layer) for i in unit]

def recursive_block(units):
    """(start, r) of the one run of r >= 2 identical consecutive units, or None.

    That run is the *recursive block* whose rounds `rounds` sets at inference: A in A3B (0, 3),
    B in AB3 (1, 3), A' in (A3B)2 (0, 3). AB, ABAB and A2B2C (two runs) have none.
    """
    runs, start = [], 0
    for i in range(1, len(units) + 1):
        if i == len(units) or units[i] != units[start]:
            if i - start >= 2:
                runs.append((start, i - start))
            start = i
    return runs[0] if len(runs) == 1 else None

# -----------------------------------------------------------------------------
# Variants: "A3B:p_skip=0.5:adapters=1", one syntax for train.py and eval_siglip.py

def zero_or_one(text):
    """A boolean override: exactly 0 or 1."""
    if text not in ("0", "1"):
        raise ValueError(f"write 0 or 1, not {text!r}")
    return text == "1"

# the keys a variant may override in every script, with their parsers; a script adds its own
MODEL_KEYS = {"p_skip": float, "adapters": zero_or_one, "adapter_rank": int, "share_kv": zero_or_one}

def parse_variant(spec, keys):
    """'A3B:p_skip=0.5:adapters=1' -> ('A3B', {'p_skip': 0.5, 'adapters': True}).

    keys: the allowed override keys and their parsers. Raises ValueError naming the bad part.
    """
    signature, *overrides = spec.strip().split(":")
    settings = {}
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            settings[key] = keys[key](value)
        except (KeyError, ValueError) as e:
            why = f"keys are {', '.join(keys)}" if key not in keys else str(e)
            raise ValueError(f"variant {spec!r}: bad override {override!r} ({why}); write SIG:key=value:...") from None
    return signature, settings

def variant_name(signature, settings, defaults):
    """The canonical variant string: the signature and every setting that differs from its default,
    in the order of `defaults` ("A3B:p_skip=0.5:adapters=1"). Runs are grouped by it in reports."""
    changed = [(k, settings[k]) for k in defaults if settings[k] != defaults[k]]
    return signature + "".join(f":{k}={int(v) if isinstance(v, bool) else v}" for k, v in changed)

# -----------------------------------------------------------------------------
# Model

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # bias in Linears and LayerNorms, like GPT-2
    signature: str = "AB"    # "AB" plain, "A3B" RINS r=3, "ABAB" repeat-all-over, "(A3B)2" degree 2
    p_skip: float = 0.0      # stochastic RINS: skip probability of every unit between the first and the last
    adapters: bool = False   # a linear adapter after each unit but the last
    adapter_rank: int = 0    # 0: full rank if all fit in 1% of the block stack's parameters, else the largest that does
    share_kv: bool = False   # later applications of a layer reuse its first application's K, V
    causal: bool = True      # False: bidirectional encoder (SigLIP towers)

    def __post_init__(self):
        """Reject a bad configuration before any compute, with a message that says what to change;
        parse the signature once: its units and its recursive block (None for AB, ABAB)."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.p_skip <= 1.0:
            raise ValueError(f"p_skip must be in [0, 1], got {self.p_skip}")
        if not 0 <= self.adapter_rank <= self.n_embd:
            raise ValueError(f"adapter_rank must be in [0, n_embd={self.n_embd}], got {self.adapter_rank}")
        # derived, so not dataclass fields (make a new config rather than change a field of this one)
        self.units = signature_units(self.signature, self.n_layer)
        self.recursive = recursive_block(self.units)

class SelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.causal = config.causal

    def forward(self, x, kv=None, cache=None, pos=None):
        """Attend from x; returns (output, (k, v)) so a later application can share k, v.

        kv: keys and values from this layer's first application (KV sharing); then only the
            queries are computed here. cache: this schedule position's LayerCache; pos (T,): the
            positions of x's tokens, where the cache stores their k, v.
        """
        B, T, C = x.size()
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv is None:
            q, k, v = map(heads, self.c_attn(x).split(C, dim=2))
            if cache is not None:
                k, v = cache.update(k, v, pos)
        else:
            bias = None if self.c_attn.bias is None else self.c_attn.bias[:C]
            q = heads(F.linear(x, self.c_attn.weight[:C], bias))
            k, v = kv
        # with a cache, k and v span the whole preallocated block: the mask lets the token at position p
        # see positions 0..p only, which hides both the future and the slots not written yet
        mask = None if pos is None else torch.arange(k.size(2), device=x.device) <= pos[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0,
                                           is_causal=self.causal and mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)

class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv=None, cache=None, pos=None):
        a, kv = self.attn(self.ln_1(x), kv, cache, pos)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv

class Adapter(nn.Module):
    """x -> x + W x after a unit of the schedule (a round of the recursive block). The paper adds
    linear adapters under 1% of the parameters; [our choice] one per unit but the last,
    zero-initialised W (an untrained adapter is the identity), no bias. Full rank W (d x d) when all
    adapters fit in 1% of the block stack, else W = U V with U zero and V random, so the map starts
    at zero but U still receives gradients.
    """

    def __init__(self, n_embd, rank):
        super().__init__()
        self.down = nn.Linear(n_embd, rank, bias=False) if rank < n_embd else None
        self.up = nn.Linear(rank, n_embd, bias=False)

    def forward(self, x):
        return x + self.up(x if self.down is None else self.down(x))

def adapter_rank(d, n_adapters, n_params):
    """The largest adapter rank that keeps n_adapters adapters under 1% of n_params: full rank (d)
    if d x d maps fit, else low rank, each of U, V costing rank x d."""
    budget = 0.01 * n_params / max(1, n_adapters)
    return d if d * d <= budget else max(1, int(budget // (2 * d)))

class LayerCache:
    """Keys and values of one schedule position, (batch, n_head, max_len, head size), preallocated to block_size:
    a decoding step then has the same shapes at every position, so a compiled step is traced once (and
    captured as one CUDA graph)."""

    def __init__(self, shape, dtype, device):
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")
        for t in (self.k, self.v):  # written in place at a fixed address: CUDA graphs may keep it
            torch._dynamo.mark_static_address(t)

    def update(self, k, v, pos):
        """Write the new tokens' k, v at positions pos (T,); return the whole buffers (the attention mask
        hides the positions not written yet)."""
        if k.size(0) != self.k.size(0):
            raise ValueError(f"KV cache made for batch {self.k.size(0)}, used at batch {k.size(0)}: "
                             f"make one with new_cache({k.size(0)})")
        if k.dtype != self.k.dtype:
            raise ValueError(f"KV cache holds {self.k.dtype}, the forward computes {k.dtype} keys (autocast or "
                             f"the weights' dtype): make one with new_cache(batch, rounds, {k.dtype})")
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v

class KVCache:
    """The KV cache of a recursive model is keyed by *schedule position*, not by layer: a layer
    that runs three times has three caches (A3B with A = half the layers: 2x the baseline's
    memory). With KV sharing there is one slot per distinct layer, the baseline's memory.
    Allocated whole for one batch, length and dtype (new_cache); reset() empties it in place, so the
    buffers, and a compiled step's graph of them, serve every generate call after (GPT.decoding_cache)."""

    def __init__(self, n_slots, shape, dtype, device):
        self.slots = [LayerCache(shape, dtype, device) for _ in range(n_slots)]
        self.max_len = shape[2]

    def check(self, n_slots, max_len):
        """Refuse a cache made for another model or other rounds, naming which (batch and dtype: update)."""
        if self.max_len != max_len:
            raise ValueError(f"KV cache of length {self.max_len}, the model's block_size is {max_len}: "
                             f"make one with this model's new_cache")
        if len(self.slots) != n_slots:
            raise ValueError(f"KV cache of {len(self.slots)} schedule positions, these rounds run {n_slots}: "
                             f"make one with new_cache(batch, rounds)")

    def reset(self):
        for s in self.slots:
            s.k.zero_()
            s.v.zero_()

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for s in self.slots for t in (s.k, s.v))

class Transformer(nn.Module):
    """The stack of blocks, walked in the order the signature's schedule gives, then LayerNorm.

    Input and output are (B, T, n_embd): the caller embeds tokens (GPT) or patches (SigLIP).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        n_adapters = len(config.units) - 1 if config.adapters else 0  # after each unit but the last
        rank = config.adapter_rank or adapter_rank(config.n_embd, n_adapters, self.num_params())
        self.adapters = nn.ModuleList([Adapter(config.n_embd, rank) for _ in range(n_adapters)])
        # stochastic rounds draw from their own generator: identical on every DDP rank, saved in checkpoints
        self.skip_rng = torch.Generator().manual_seed(torch.initial_seed())
        # what the last forward executed (layer applications, K/V reuses, adapters run), for cost accounting.
        # [our choice] left on the module by forward rather than returned: GPT.forward keeps nanoGPT's
        # (logits, loss), and SigLIP's towers call this module directly. Readers (train.step, train.evaluate,
        # eval_siglip.step_cost and evaluate, flops_per_token's default) read it right after their forward
        self.applications = self.kv_reuses = self.adapters_run = 0

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def plan(self, rounds=None):
        """The units to run now, as (layers, adapter index or None) pairs.

        rounds: run the recursive block this many times (1 = the baseline's cost, > r extrapolates;
            [our choice] an extrapolated round has no adapter of its own, nor the last round of a block
            that ends the schedule, as in training).
        Stochastic RINS: in training with p_skip > 0, every unit but the first and the last is
            skipped with probability p_skip, so A^rB runs 1 + Binomial(r - 1, 1 - p_skip) rounds of
            A. [our choice] One draw per forward (per training micro-batch), not per example, so a
            skipped unit really saves its compute; a skipped round skips its adapter too.
        Otherwise every unit runs: evaluation is deterministic.
        """
        units = [(layers, u if u < len(self.adapters) else None) for u, layers in enumerate(self.config.units)]
        if rounds is not None:
            if self.config.recursive is None:
                raise ValueError(f"rounds needs a signature with exactly one repeated block, like 'A3B'; "
                                 f"{self.config.signature!r} has none")
            if not isinstance(rounds, int) or rounds < 1:
                raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
            start, r = self.config.recursive
            block = units[start][0]
            rounds_run = [(block, units[start + j][1] if j < r else None) for j in range(rounds)]
            if start + r == len(units):  # a block that ends the schedule feeds ln_f with no adapter, as in training
                rounds_run[-1] = (block, None)
            return units[:start] + rounds_run + units[start + r:]
        if self.training and self.config.p_skip > 0 and len(units) > 2:
            keep = torch.rand(len(units) - 2, generator=self.skip_rng) >= self.config.p_skip
            return [units[0]] + [u for u, k in zip(units[1:-1], keep.tolist()) if k] + [units[-1]]
        return units

    def flops_per_token(self, seq_len, counts=None):
        """Training FLOPs per token (forward + backward = 3 x forward) of a forward that ran `counts`
        = (layer applications, adapters run, K/V reuses); default: what the last forward ran, as it left
        its counts on this module (the attributes forward sets).

        Counted at 2 FLOPs per multiply-add: every weight matrix a token passes through, 12 n_embd^2
        per layer application (QKV 3, output projection 1, MLP 8), less the 2 n_embd^2 of K and V for
        an application that reuses shared K, V; each adapter's matrices; attention's scores and
        weighted sum, 4 n_embd seq_len per application [our choice: nanoGPT's and PaLM's count, the
        whole context, no halving for the causal mask]. Not counted: biases, LayerNorms, GELU,
        softmax, embeddings (O(n_embd) per token, the same for every layout of a width).
        """
        applications, adapters_run, kv_reuses = counts or (self.applications, self.adapters_run, self.kv_reuses)
        C = self.config.n_embd
        layer = sum(m.weight.numel() for m in self.h[0].modules() if isinstance(m, nn.Linear))
        adapter = sum(p.numel() for p in self.adapters[0].parameters()) if len(self.adapters) else 0
        matmul = layer * applications - 2 * C * C * kv_reuses + adapter * adapters_run
        return 6 * matmul + 12 * C * seq_len * applications

    def new_cache(self, batch, rounds=None, dtype=torch.float32, device="cpu"):
        """An empty KV cache for generation at this batch with this many rounds, its keys and values in dtype
        (the model must be in eval mode)."""
        c = self.config
        shape = (batch, c.n_head, c.block_size, c.n_embd // c.n_head)
        return KVCache(self.cache_slots(self.plan(rounds)), shape, dtype, device)

    def cache_slots(self, plan):
        """The cache's schedule positions for a plan: one per layer application, one per layer with KV sharing."""
        return self.config.n_layer if self.config.share_kv else sum(len(layers) for layers, _ in plan)

    def forward(self, x, rounds=None, cache=None, pos=None):
        """Walk the plan. KV sharing [our choice]: every later application of a layer attends with the
        keys and values its *first* application computed in this forward (later rounds compute
        queries only), the same rule with and without a cache, so both give the same logits.
        pos (T,): the positions of x's tokens, with a cache."""
        if cache is not None and self.training:
            raise ValueError("cached generation needs model.eval(): the plan must not change between tokens")
        plan = self.plan(rounds)
        if cache is not None:
            cache.check(self.cache_slots(plan), self.config.block_size)
        first_kv = {}  # layer -> (k, v) of its first application
        applications = reuses = adapters_run = 0
        for layers, adapter in plan:
            for layer in layers:
                shared = first_kv.get(layer) if self.config.share_kv else None
                slot = None
                if cache is not None and shared is None:
                    slot = cache.slots[layer if self.config.share_kv else applications]
                x, kv = self.h[layer](x, shared, slot, pos)
                first_kv.setdefault(layer, kv)
                applications += 1
                reuses += shared is not None
            if adapter is not None:
                x = self.adapters[adapter](x)
                adapters_run += 1
        self.applications, self.kv_reuses, self.adapters_run = applications, reuses, adapters_run
        return self.ln_f(x)

def init_gpt2(model, n_layer):
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by
    1/sqrt(2 n_layer) (GPT-2 paper); adapters zeroed so they start as the identity."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
    for m in model.modules():
        if isinstance(m, Adapter):
            torch.nn.init.zeros_(m.up.weight)

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        init_gpt2(self, config.n_layer)
        self.held_cache = None  # (batch, rounds, dtype, device), KVCache: generate's (decoding_cache)

    def get_num_params(self):
        """Parameters of the model without the adapters and, as nanoGPT counts, without the position
        embeddings (the token embeddings are tied to the LM head and so are counted); the same for
        every signature."""
        return sum(p.numel() for p in self.parameters()) - self.num_adapter_params() - self.wpe.weight.numel()

    def num_adapter_params(self):
        return sum(p.numel() for p in self.transformer.adapters.parameters())

    def forward(self, idx, targets=None, rounds=None, cache=None, pos=None):
        """(logits, loss): without targets, the last position's logits alone (inference); in training,
        the loss alone, computed in chunks so the whole batch's float32 logits never exist (lm_head_loss);
        in evaluation, nanoGPT's logits at every position and the loss.

        cache: a KVCache from new_cache(); pos (T,): the positions of idx's tokens in it (default
        0..T-1, a prompt); a decoding step passes its position as a tensor (decode_step).
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device) if pos is None else pos
        x = self.drop(self.wte(idx) + self.wpe(pos))
        x = self.transformer(x, rounds=rounds, cache=cache, pos=None if cache is None else pos)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # a slice: a list index would copy it to the device first
        if self.training:
            return None, lm_head_loss(x, self.lm_head.weight, targets, LOSS_CHUNK)
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def new_cache(self, batch, rounds=None, dtype=None):
        """An empty KVCache for batch sequences at these rounds, on the model's device, in dtype (default the
        weights'; under autocast, autocast's: the dtype the keys are computed in)."""
        weight = self.lm_head.weight
        return self.transformer.new_cache(batch, rounds, dtype or weight.dtype, weight.device)

    def decoding_cache(self, batch, rounds, dtype):
        """The KV cache generate decodes with, emptied in place. [our choice] The model holds it, as gpt-fast
        does, and allocates it again only for another batch, rounds, dtype or device: every generate call of
        one batch reuses the same buffers, so a compiled step compiles once and its CUDA graph is recorded
        once. (torch <= 2.9 guards a static-address tensor by identity: a new cache per call compiled the
        step again at every call, and with fullgraph failed at the 9th.)"""
        key = (batch, rounds, dtype, self.lm_head.weight.device)
        if self.held_cache is None or self.held_cache[0] != key:
            self.held_cache = None  # the old buffers freed before the new ones are allocated
            self.held_cache = (key, self.new_cache(batch, rounds, dtype))
        cache = self.held_cache[1]
        cache.reset()
        return cache

    # cuDNN attention builds a plan for every new sequence length, and the uncached loop and the prompt
    # make a new one every call: generation leaves it out (the other kernels need no plan)
    @torch.inference_mode()
    @sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, rounds=None, use_cache=True,
                 step=None):
        """Sample max_new_tokens after idx (B, T), with a KV cache unless use_cache=False.

        temperature 0 is greedy decoding (the most likely token). step: the cached one-token step,
        decode_step or a compiled one (compile_decode_step). The cache is the model's own
        (decoding_cache), one per batch, rounds and dtype, reused by every call. No step waits for the
        device: positions are made on it, and next_token samples without a host synchronisation.
        [our choice] Once the sequence outgrows block_size, each step re-reads the last block_size tokens
        without the cache, exactly as the uncached loop does, so both give the same logits.
        """
        device = idx.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lm_head.weight.dtype
        cache = self.decoding_cache(idx.size(0), rounds, dtype) if use_cache and max_new_tokens else None
        prompt, step = True, step or decode_step
        for _ in range(max_new_tokens):
            T = idx.size(1)
            if cache is None or T > self.config.block_size:
                logits, _ = self(idx[:, -self.config.block_size:], rounds=rounds)
            elif prompt:  # the prompt fills the cache in one forward
                logits, _ = self(idx, rounds=rounds, cache=cache)
                prompt = False
            else:  # then the last token alone, its position T - 1 a tensor so that the shapes stay static
                logits = step(self, token, torch.full((1,), T - 1, device=idx.device), cache, rounds)
            token = next_token(logits[:, -1, :], temperature, top_k)  # (B, 1), contiguous: static strides
            idx = torch.cat((idx, token), dim=1)
        return idx

    def flops_per_token(self, seq_len, counts=None):
        """Training FLOPs per token of a forward that ran `counts` (default: the last forward's, read off
        self.transformer, where Transformer.forward leaves them):
        the blocks and adapters (Transformer.flops_per_token) and the LM head, 2 x vocab_size x n_embd
        per token forward, 3x that with the backward."""
        return self.transformer.flops_per_token(seq_len, counts) + 6 * self.lm_head.weight.numel()

def next_token(logits, temperature, top_k):
    """The next token (B, 1) from the last position's logits: the argmax at temperature 0, else a draw
    from the softmax at that temperature over the top_k most likely tokens.

    Without a host synchronisation (gpt-fast's way): the top_k cut by torch.where, and the draw by an
    exponential race: token i arrives at E_i / p_i with E_i ~ Exp(1) independent, an exponential time of
    rate p_i, and the first of independent exponentials to arrive is the i-th with probability p_i / sum p.
    (torch.multinomial and a boolean-mask assignment each wait for the device.)
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[:, -1:], -float("inf"), logits)
    probs = F.softmax(logits, dim=-1)
    # a draw of exactly 0 would make p / E infinite, or NaN for a token cut by top_k: the smallest float instead
    race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1, keepdim=True)

def decode_step(model, token, pos, cache, rounds=None):
    """One cached decoding step: token (B, 1) at position pos (a (1,) tensor) -> logits (B, 1, vocab).
    Every shape is the same at every position (the cache is block_size long, pos a tensor), so a
    compiled step is traced once."""
    return model(token, rounds=rounds, cache=cache, pos=pos)[0]

def decode_step_math_attention(model, token, pos, cache, rounds=None):
    """decode_step held to PyTorch's own attention (SDPBackend.MATH): compiled, inductor then writes the
    attention itself, which at one query per sequence may beat the fused kernels (bench.py keeps the faster)."""
    with sdpa_kernel(SDPBackend.MATH):
        return decode_step(model, token, pos, cache, rounds)

def compile_decode_step(device, step=decode_step):
    """A decoding step (decode_step) compiled whole. On CUDA "reduce-overhead" replays it as one CUDA graph:
    at batch 1 a small model's step is bound by kernel launches (about 20 per layer), not by arithmetic."""
    return torch.compile(step, fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else None)

# positions per chunk of the LM head + loss in training: at GPT-2's 50,304 tokens a chunk's float32
# logits take 0.8 GB, where a 16 x 1024 batch's take 3.3 GB; the CPU's small batches fit in one chunk
LOSS_CHUNK = 4096

def lm_head_loss(x, weight, targets, chunk):
    """Mean cross-entropy of the logits x @ weight.T (float32) against targets, ignore_index -1, without
    the logits of all positions at once: chunk positions at a time, each chunk's logits recomputed in
    the backward (checkpoint) rather than kept. A batch that fits in one chunk takes the plain path."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if x.size(0) <= chunk:
        return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-1)
    total = sum(checkpoint(chunk_loss, xc, weight, tc, use_reentrant=False)
                for xc, tc in zip(x.split(chunk), targets.split(chunk)))
    return total / (targets != -1).sum()

def chunk_loss(x, weight, targets):
    """The summed cross-entropy of one chunk of positions; float32 logits, as F.cross_entropy under
    autocast computes them."""
    return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-1, reduction="sum")

# -----------------------------------------------------------------------------
# Compute accounting: every variant of a comparison gets the same training budget
#
# The budget is what the baseline AB costs in budget_steps steps, in one of two units:
#   "flops" (the default): the FLOPs of what executed, LM head and attention included (flops_per_token)
#   "applications": layer applications x tokens, the paper's "layer x step" (the studies before the
#       FLOP unit; it leaves out the LM head, so a recursive model's step looks cheaper relative to AB)
# A run whose step costs more gets fewer steps (A3B about half of AB's), so recursive models see fewer
# tokens. A run stops when its *executed* cost reaches the budget (stochastic rounds skip compute).

BUDGET_UNITS = ("flops", "applications")

def expected_counts(config):
    """(layer applications, adapters run, K/V reuses) expected of one training forward.

    Every unit but the first and the last runs with probability 1 - p_skip, independently
    (Transformer.plan); an adapter runs with its unit. With share_kv, an application reuses K, V
    when an earlier application of its layer ran in the same forward. Without p_skip: exact counts.
    """
    units = config.units
    keep = [1.0] + [1.0 - config.p_skip] * (len(units) - 2) + [1.0] if len(units) > 2 else [1.0] * len(units)
    n_adapters = len(units) - 1 if config.adapters else 0
    applications = adapters = reuses = 0.0
    not_yet = {}  # layer -> probability that no unit run so far applied it
    for i, (layers, p) in enumerate(zip(units, keep)):
        applications += p * len(layers)
        adapters += p * (i < n_adapters)
        if config.share_kv:
            seen = set()
            for layer in layers:  # a layer repeated inside a unit (degree 2) reuses its first application
                reuses += p * (1.0 if layer in seen else 1.0 - not_yet.get(layer, 1.0))
                seen.add(layer)
            for layer in seen:
                not_yet[layer] = not_yet.get(layer, 1.0) * (1.0 - p)
    return applications, adapters, reuses

def expected_applications(config):
    """Expected layer applications per training forward (A3B with p_skip 0.5: 2 + 0.5 * 2 * 2 + 2 at 4 layers)."""
    return expected_counts(config)[0]

def cost_per_token(model, unit, seq_len, counts=None):
    """A training token's cost in `unit` for a forward that ran `counts` (applications, adapters run,
    K/V reuses; default: the expected counts, for planning). model: a GPT or a Transformer (a tower)."""
    counts = counts or expected_counts(model.config)
    return counts[0] if unit == "applications" else model.flops_per_token(seq_len, counts)

def plan_budget(budget, step_cost, budget_steps, warmup_frac):
    """(steps, target, warmup_steps) of a run: the one budget rule of both scripts.

    steps: the budget over the run's expected cost per step (step_cost), [our choice] rounded to whole
    steps; target: the budget so rounded, at which the run stops. warmup_steps: a fraction of the
    *baseline's* steps, the same for every variant, so a run that takes fewer steps is not given a
    shorter warm-up (RESULTS.md: measured)."""
    steps = max(1, round(budget / step_cost))
    return steps, steps * step_cost, max(1, round(warmup_frac * budget_steps))

# -----------------------------------------------------------------------------
# Optimisation, shared by train.py and eval_siglip.py

def learning_rate(peak, progress, warmup, cooldown):
    """The LR when a fraction `progress` of the run's own budget has executed.

    [our choice] big_vision's "rsqrt" schedule laid on each run's own length: linear warm-up to `peak`
    over the fraction `warmup`, inverse-square-root decay after it, and a linear cool-down over the last
    fraction `cooldown` that reaches zero exactly at the end of the budget.
    """
    lr = peak * min(1.0, progress / warmup)
    lr *= math.sqrt(warmup / max(progress, warmup))
    return lr * max(0.0, min(1.0, (1 - progress) / cooldown))

def adamw(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices only (not biases, LayerNorms, scalars), fused on CUDA (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

def autocast(device):
    """bf16 autocast on a GPU; on the CPU plain float32 (bf16 matmuls are slow there). Both scripts use it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

def parse_device(name):
    """torch.device(name) for cpu or an available cuda device; ValueError naming the fix otherwise."""
    try:
        d = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device: use cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"{name!r}: only cpu and cuda are supported")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name!r}: CUDA is not available here: use cpu")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA devices, numbered from 0")
    return d

# dense bf16 tensor-core peaks in FLOP/s (NVIDIA's datasheets, half the figures "with sparsity"), by a substring of
# torch.cuda.get_device_name(). The first that matches counts, so the specific names come first: "NVIDIA H100 PCIe"
# and "NVIDIA H100 NVL" are slower boards than the SXM one ("NVIDIA H100 80GB HBM3"), as "NVIDIA H200 NVL" than "H200"
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12,
                   "RTX 3090": 71e12}  # V100, T4: no bf16 tensor cores

def peak_flops(device):
    """The device's dense bf16 peak, for MFU; None on CPU or for an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
