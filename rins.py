"""
RINS: Recursive INference Scaling (Alabdulmohsin & Zhai, arXiv 2502.07503), in one file.

A GPT whose layers are cut into blocks A, B, ... by a *signature*. "AB" is the plain model;
"A3B" runs block A three times and then B once: more compute per token, the same parameters.
Everything that makes a variant different is its *layer schedule*, the list of layer indices
in execution order; the forward pass just walks it. The exact semantics are in RINS.md:
  section 2 signatures, degree and schedules   -> parse_signature, layer_schedule
  section 3 compute accounting                 -> expected_applications, steps_for_budget
  section 4 stochastic RINS                    -> Transformer.plan
  section 5 linear adapters                    -> Adapter
  section 6 KV cache and KV sharing            -> KVCache, Transformer.forward
The model itself follows nanoGPT's model.py (GPT-2 architecture, init and weight tying).
"""

import inspect
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# Signatures: "A3B" -> letters "AAAB"; "(A3B)2" -> letters "AAAB", degree 2 (RINS.md §2)

def parse_signature(signature):
    """Return (letters, degree): repeats expanded ("A3B" -> "AAAB"), degree 1 unless "(...)d".

    Raises ValueError naming the problem and its 0-based position in the string.
    """
    if not isinstance(signature, str) or not signature.strip():
        raise ValueError(f"empty signature {signature!r} at position 0: write blocks as letters, e.g. 'A3B'")
    s = signature
    grouped = s[0] == "("
    close = s.find(")") if grouped else len(s)
    if close == -1:
        raise ValueError(f"signature {s!r}: '(' at position 0 is never closed")
    body_start = 1 if grouped else 0
    if grouped and close == 1:
        raise ValueError(f"signature {s!r}: empty group '()' at position 0")
    letters = ""
    for m in re.finditer(r"([A-Z])(\d*)|(.)", s[body_start:close], re.DOTALL):
        pos = body_start + m.start()
        if m.group(3) is not None:
            c = m.group(3)
            if c.isdigit():
                problem = "a repeat count must follow a letter"
            elif c == "(":
                problem = ("groups cannot be nested" if grouped else
                           "a group '(...)d' must enclose the whole signature")
            elif c == ")":
                problem = "')' without a matching '('"
            else:
                problem = "blocks are capital letters A, B, C, ... followed by an optional repeat count"
            raise ValueError(f"signature {s!r}: unexpected {c!r} at position {pos}: {problem}")
        if m.group(2) and int(m.group(2)) == 0:
            raise ValueError(f"signature {s!r}: repeat count 0 at position {pos + 1}: "
                             f"every block runs at least once")
        letters += m.group(1) * int(m.group(2) or 1)
    degree = 1
    if grouped:
        tail = s[close + 1:]
        degree_text = re.match(r"\d*", tail).group()
        if tail[len(degree_text):]:
            pos = close + 1 + len(degree_text)
            raise ValueError(f"signature {s!r}: unexpected {s[pos]!r} at position {pos}: "
                             f"nothing may follow the degree of '(...)d'")
        degree = int(degree_text or 1)
        if degree == 0:
            raise ValueError(f"signature {s!r}: degree 0 at position {close + 1}: degree must be >= 1")
    # the k distinct letters must be exactly A, B, ..., the k-th letter (RINS.md §2)
    k = len(set(letters))
    for m in re.finditer(r"[A-Z]", s):
        if ord(m.group()) - ord("A") >= k:
            raise ValueError(f"signature {s!r}: letter {m.group()!r} at position {m.start()}: with {k} "
                             f"distinct blocks the letters must be A..{chr(ord('A') + k - 1)}, no gaps")
    return letters, degree


def signature_units(signature, n_layer):
    """The signature's top-level units: one list of layer indices per letter, in order.

    For degree d each unit is itself the signature applied (d-1 times) inside that letter's chunk,
    so "(A3B)2" over 12 layers has units A',A',A',B' with A' = [0,1,2]*3 + [3,4,5] (RINS.md §2).
    """
    letters, degree = parse_signature(signature)
    k = len(set(letters))
    if n_layer % k ** degree != 0:
        raise ValueError(f"signature {signature!r}: n_layer={n_layer} is not divisible by "
                         f"{k}^{degree} = {k ** degree} ({k} blocks, degree {degree})")

    def expand(layers, d):
        if d == 0:
            return list(layers)
        size = len(layers) // k
        chunks = [layers[i * size:(i + 1) * size] for i in range(k)]
        return [i for c in letters for i in expand(chunks[ord(c) - ord("A")], d - 1)]

    size = n_layer // k
    chunks = [list(range(i * size, (i + 1) * size)) for i in range(k)]
    return [expand(chunks[ord(c) - ord("A")], degree - 1) for c in letters]


def layer_schedule(signature, n_layer):
    """Layer indices in execution order, e.g. layer_schedule("A2B", 4) == [0, 1, 0, 1, 2, 3]."""
    return [i for unit in signature_units(signature, n_layer) for i in unit]


def recursive_run(signature):
    """(start, r) of the one run of a repeated letter ("A3B" -> (0, 3)), the block `rounds` sets.

    Only signatures with exactly one such run (A^rB, AB3, A2BC, (A3B)2, ...) have a recursive block.
    """
    letters, _ = parse_signature(signature)
    runs = [(m.start(), len(m.group())) for m in re.finditer(r"(.)\1+", letters)]
    if len(runs) != 1:
        raise ValueError(f"rounds needs a signature with exactly one repeated block, like 'A3B'; "
                         f"{signature!r} has {len(runs)}")
    return runs[0]

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
    signature: str = "AB"    # RINS.md §2: "AB" plain, "A3B" RINS r=3, "ABAB" repeat-all-over, "(A3B)2"
    p_skip: float = 0.0      # RINS.md §4: skip probability of the units between first and last
    adapters: bool = False   # RINS.md §5: a linear adapter after each unit but the last
    adapter_rank: int = 0    # 0: full rank if all adapters fit in 1% of the parameters, else the largest that does
    share_kv: bool = False   # RINS.md §6: later applications of a layer reuse its first application's K, V
    causal: bool = True      # False: bidirectional encoder (SigLIP towers)

    def __post_init__(self):
        """Reject a bad configuration before any compute, with a message that says what to change."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.p_skip <= 1.0:
            raise ValueError(f"p_skip must be in [0, 1], got {self.p_skip}")
        if not 0 <= self.adapter_rank <= self.n_embd:
            raise ValueError(f"adapter_rank must be in [0, n_embd={self.n_embd}], got {self.adapter_rank}")
        signature_units(self.signature, self.n_layer)  # raises ValueError on a bad signature


class SelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.causal = config.causal

    def forward(self, x, kv=None, cache=None):
        """Attend from x; returns (output, (k, v)) so a later application can share k, v.

        kv: keys and values from this layer's first application (KV sharing, RINS.md §6); then
            only the queries are computed here. cache: this schedule position's LayerCache.
        """
        B, T, C = x.size()
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv is None:
            q, k, v = map(heads, self.c_attn(x).split(C, dim=2))
            if cache is not None:
                k, v = cache.update(k, v)
        else:
            bias = None if self.c_attn.bias is None else self.c_attn.bias[:C]
            q = heads(F.linear(x, self.c_attn.weight[:C], bias))
            k, v = kv
        # T == 1 with a cache: the new token attends to every cached position, no mask needed
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0,
                                           is_causal=self.causal and T > 1)
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

    def forward(self, x, kv=None, cache=None):
        a, kv = self.attn(self.ln_1(x), kv, cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class Adapter(nn.Module):
    """x -> x + W x, W zero-initialised so an untrained adapter is the identity (RINS.md §5).

    Full rank W (d x d) when it fits the budget, else W = U V with U zero and V random, so the
    map starts at zero but U still receives gradients.
    """

    def __init__(self, n_embd, rank):
        super().__init__()
        self.down = nn.Linear(n_embd, rank, bias=False) if rank < n_embd else None
        self.up = nn.Linear(rank, n_embd, bias=False)

    def forward(self, x):
        return x + self.up(x if self.down is None else self.down(x))


class LayerCache:
    """Keys and values of one schedule position, preallocated to block_size (RINS.md §6)."""

    def __init__(self, max_len):
        self.max_len, self.length, self.k, self.v = max_len, 0, None, None

    def update(self, k, v):
        """Append the new tokens' k, v; return k, v of every position so far."""
        if self.k is None:
            # preallocated, not torch.cat per token: appending stays O(1) per token
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        T = k.size(2)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class KVCache:
    """One LayerCache per schedule position, or per distinct layer with KV sharing (RINS.md §6)."""

    def __init__(self, n_slots, max_len):
        self.slots = [LayerCache(max_len) for _ in range(n_slots)]

    @property
    def length(self):
        return self.slots[0].length

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for s in self.slots for t in (s.k, s.v) if t is not None)


class Transformer(nn.Module):
    """The stack of blocks, walked in the order the signature's schedule gives, then LayerNorm.

    Input and output are (B, T, n_embd): the caller embeds tokens (GPT) or patches (SigLIP).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.units = signature_units(config.signature, config.n_layer)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # one adapter after each unit but the last, so after each round of A in A^rB (RINS.md §5)
        n_adapters = len(self.units) - 1 if config.adapters else 0
        rank = config.adapter_rank or adapter_rank(config.n_embd, n_adapters, self.num_params())
        self.adapters = nn.ModuleList([Adapter(config.n_embd, rank) for _ in range(n_adapters)])
        # stochastic rounds draw from their own generator: identical on every DDP rank, saved in checkpoints
        self.skip_rng = torch.Generator().manual_seed(torch.initial_seed())
        # what the last forward executed, for cost accounting (RINS.md §3)
        self.applications = self.kv_reuses = self.adapters_run = 0

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def plan(self, rounds=None):
        """The units to run now, as (layers, adapter index or None) pairs.

        rounds: run the recursive block this many times (1 = the baseline's cost, > r extrapolates).
        Else in training with p_skip > 0 every unit but the first and the last is skipped with
        probability p_skip, drawn once per forward, so a skipped unit costs nothing (RINS.md §4).
        """
        units = [(layers, u if u < len(self.adapters) else None) for u, layers in enumerate(self.units)]
        if rounds is not None:
            if not isinstance(rounds, int) or rounds < 1:
                raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
            start, r = recursive_run(self.config.signature)
            block = units[start][0]
            # an extrapolated round (beyond r) has no adapter of its own [our choice]
            rounds_run = [(block, units[start + j][1] if j < r else None) for j in range(rounds)]
            return units[:start] + rounds_run + units[start + r:]
        if self.training and self.config.p_skip > 0 and len(units) > 2:
            keep = torch.rand(len(units) - 2, generator=self.skip_rng) >= self.config.p_skip
            return [units[0]] + [u for u, k in zip(units[1:-1], keep.tolist()) if k] + [units[-1]]
        return units

    def new_cache(self, rounds=None):
        """An empty KV cache for generation with this many rounds (the model must be in eval mode)."""
        n_slots = self.config.n_layer if self.config.share_kv else sum(len(l) for l, _ in self.plan(rounds))
        return KVCache(n_slots, self.config.block_size)

    def forward(self, x, rounds=None, cache=None):
        if cache is not None and self.training:
            raise ValueError("cached generation needs model.eval(): the plan must not change between tokens")
        first_kv = {}  # layer -> (k, v) of its first application, for KV sharing (RINS.md §6)
        applications = reuses = adapters_run = 0
        for layers, adapter in self.plan(rounds):
            for layer in layers:
                shared = first_kv.get(layer) if self.config.share_kv else None
                slot = None
                if cache is not None and shared is None:
                    slot = cache.slots[layer if self.config.share_kv else applications]
                x, kv = self.h[layer](x, shared, slot)
                first_kv.setdefault(layer, kv)
                applications += 1
                reuses += shared is not None
            if adapter is not None:
                x = self.adapters[adapter](x)
                adapters_run += 1
        self.applications, self.kv_reuses, self.adapters_run = applications, reuses, adapters_run
        return self.ln_f(x)


def adapter_rank(d, n_adapters, n_params):
    """The largest adapter rank that keeps n_adapters adapters under 1% of n_params (RINS.md §5):
    full rank (d) if d x d maps fit, else low rank, each of U, V costing rank x d."""
    budget = 0.01 * n_params / max(1, n_adapters)
    return d if d * d <= budget else max(1, int(budget // (2 * d)))


def init_gpt2(model, n_layer):
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by
    1/sqrt(2 n_layer) (GPT-2 paper); adapters zeroed so they start as the identity (RINS.md §5)."""
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

    def get_num_params(self, non_embedding=True):
        """Parameters of the model without the adapters; the same for every signature.

        non_embedding: leave out the position embeddings, as nanoGPT (the token embeddings are
        tied to the LM head and so are counted).
        """
        n = sum(p.numel() for p in self.parameters()) - self.num_adapter_params()
        return n - self.wpe.weight.numel() if non_embedding else n

    def num_adapter_params(self):
        return sum(p.numel() for p in self.transformer.adapters.parameters())

    def forward(self, idx, targets=None, rounds=None, cache=None):
        """(logits, loss) as nanoGPT: all positions with targets, the last one alone without.

        cache: a KVCache from new_cache(); idx then holds only the tokens not yet cached.
        """
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size={self.config.block_size}")
        if cache is not None and start > 0 and T > 1:
            raise ValueError("after the prompt, a cache takes one token at a time")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        x = self.transformer(x, rounds=rounds, cache=cache)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position is needed
            loss = None
        return logits, loss

    def new_cache(self, rounds=None):
        return self.transformer.new_cache(rounds)

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, rounds=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T), with a KV cache unless use_cache=False.

        Once the sequence outgrows block_size, each step re-reads the last block_size tokens
        without the cache, exactly as the uncached loop does, so both give the same logits.
        """
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache or idx.size(1) > self.config.block_size:
                logits, _ = self(idx[:, -self.config.block_size:], rounds=rounds)
            elif cache is None:
                cache = self.new_cache(rounds)
                logits, _ = self(idx, rounds=rounds, cache=cache)
            else:
                logits, _ = self(idx[:, -1:], rounds=rounds, cache=cache)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only, fused on CUDA (nanoGPT)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward) of the last forward, counted on what ran.

        nanoGPT's 6N + 12LCT with L = executed layer applications (RINS.md §3), not n_layer; an
        application that reuses shared K, V skips the 2 C^2 key/value projection.
        """
        C, t = self.config.n_embd, self.transformer
        per_layer = sum(p.numel() for p in t.h[0].parameters())
        per_adapter = self.num_adapter_params() // max(1, len(t.adapters))
        matmul_params = (per_layer * t.applications - 2 * C * C * t.kv_reuses
                         + per_adapter * t.adapters_run + self.lm_head.weight.numel())
        return 6 * matmul_params + 12 * C * seq_len * t.applications

# -----------------------------------------------------------------------------
# Compute accounting (RINS.md §3): cost = layer applications x tokens

def expected_applications(config):
    """Expected layer applications per training forward: every unit but the first and the last
    runs with probability 1 - p_skip (RINS.md §4); without p_skip, the schedule's length."""
    units = signature_units(config.signature, config.n_layer)
    if len(units) <= 2:
        return float(sum(map(len, units)))
    middle = sum(len(u) for u in units[1:-1])
    return len(units[0]) + len(units[-1]) + (1 - config.p_skip) * middle


def steps_for_budget(budget, config, tokens_per_step):
    """Steps a run plans under a budget of layer applications x tokens (A3B: half the AB steps)."""
    return max(1, round(budget / (expected_applications(config) * tokens_per_step)))


# dense bf16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                   "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device):
    """The device's dense bf16 peak, for MFU; None on CPU or for an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
