"""
Speed, measured side by side in one run: training steps of every layout (per layer application, against AB
and against a plain model with the same applications; MFU on a GPU), the LM head + loss's memory, and
greedy decoding eager uncached, eager cached and compiled, each decode row with what proves what ran
(compile_s, tokens_agree, cudagraph_skips, the attention kept, errors). Machines are noisy, so the variants are
timed interleaved, several rounds each, and the median is reported; --out_dir/bench.json keeps it all, rewritten
after every part and every decode row.

    python bench.py                                   # CPU: 4 layers x 96, batch 32 x 64
    python bench.py --compile --repeats 3 --max_new_tokens 128
    python bench.py --only decode --compile           # the decode rows again, the training rows kept
    bash .ci/gpu                                      # on a GPU: GPT-2 small, the goals in the README

No data is needed: the models are random and the batches random tokens, as speed does not depend on them.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import rins
from data.prepare import write_atomic
from report import check_device, check_flags, text_table
from rins import GPT, GPTConfig


def main(argv=None):
    return bench(build_parser().parse_args(argv))

def build_parser():
    """The bench's flags: the model's shape (GPT-2 small in .ci/gpu), the batch, the machine."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=96)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--vocab", type=int, default=65, help="vocabulary of the bench models")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per measurement")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens decoded per call at batch 1")
    p.add_argument("--long_prompt", type=int, default=64, help="the batch-64 decode row's prompt (.ci/gpu: 512, "
                   "so that arithmetic, not kernel launches, bounds an uncached step)")
    p.add_argument("--long_new_tokens", type=int, default=32, help="tokens decoded per call at batch 64")
    p.add_argument("--compiled_rows", choices=["all", "goals"], default="all",
                   help="decode rows with a compiled step (--compile): all, or the one a goal reads (AB, batch 1)")
    p.add_argument("--only", choices=["train", "decode"], help="one part; bench.json keeps the other's rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks and the decoding step")
    p.add_argument("--out_dir", default="out", help="where bench.json goes")
    return p


BENCH_VARIANTS = ["AB", "A2B", "A3B", "ABAB", "(A3B)2", "A3B:p_skip=0.5"]
DECODE_VARIANTS = ["AB", "A3B", "A3B:share_kv=1"]
BENCH_STEPS = 5    # training steps back to back between two synchronisations, as training runs them
MIN_DRAWS = 20     # a stochastic row is timed over at least this many draws of its rounds
DECODE_REPEATS = 3

def bench(args):
    """Training steps (per layer application, MFU, the loss's memory) and decoding speed; bench.json."""
    device = check_device(args.device)
    check_flags(args, ("batch_size", "block_size", "repeats", "vocab", "n_head", "max_new_tokens", "long_prompt",
                       "long_new_tokens"), [
        ("n_layer", args.n_layer >= 4 and args.n_layer % 4 == 0, "4, 8, ... (for (A3B)2)"),
        ("n_embd", args.n_head >= 1 and args.n_embd % args.n_head == 0, "a multiple of --n_head")])
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    path = os.path.join(args.out_dir, "bench.json")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    kept = json.load(open(path)) if args.only and os.path.exists(path) else {}  # the other part's rows
    out = dict(kept, device=name, torch=torch.__version__, cuda=torch.version.cuda, compile=args.compile,
               batch=[args.batch_size, args.block_size], n_layer=args.n_layer, n_embd=args.n_embd, vocab=args.vocab,
               peak_flops=rins.peak_flops(device))
    # written after every part and every decode row: if a row fails or the stage runs out of time (.ci/gpu's
    # time-out), what was measured before it is already on disk
    save = lambda: write_atomic(path, json.dumps(out, indent=1).encode())
    print({k: v for k, v in out.items() if k not in ("train", "loss", "decode")})  # what ran where
    if args.only != "decode":
        print(f"median of {args.repeats} interleaved rounds of {BENCH_STEPS} training steps "
              f"(forward, backward, clip, AdamW, zero_grad) between synchronisations")
        out["train"], out["loss"] = bench_train(args, device)
        print_table(out["train"])
        print(f"stochastic rows: the mean over {out['train'][-1]['draws']} draws of the rounds, in rounds of "
              f"{out['train'][-1]['draws'] // args.repeats} steps\n{out['loss']['text']}")
        save()
    if args.only != "train":
        out["decode"] = []
        save()  # no earlier run's decode rows left to read as this one's, should this one be cut off
        bench_decode(args, device, out["decode"], save)
    save()
    print(f"wrote {path}")
    return out

def bench_train(args, device):
    """Training steps of every variant, of a plain model with twice the layers (the same applications
    as A3B, twice the parameters) and of AB's two plain forms; rows, and the LM head + loss's memory."""
    B, T, ctx, n = args.batch_size, args.block_size, rins.autocast(device), args.n_layer
    x, y = (torch.randint(0, args.vocab, (B, T), device=device) for _ in range(2))
    models = {v: bench_model(args, v, device, T) for v in BENCH_VARIANTS}
    models[f"AB, {2 * n} layers"] = bench_model(args, "AB", device, T, n_layer=2 * n)
    losses = {v: lambda m=m: m(x, y)[1] for v, m in models.items()}
    losses["AB, plain loop"] = lambda: plain_loop_loss(models["AB"], x, y)
    losses["AB, whole logits"] = lambda: whole_logits_loss(models["AB"], x, y)
    model_of = lambda v: models.get(v, models["AB"])
    steps = {v: train_step_fn(model_of(v), loss, ctx) for v, loss in losses.items()}
    stochastic = {v for v in steps if model_of(v).config.p_skip}
    n_steps = {v: max(BENCH_STEPS, -(-MIN_DRAWS // args.repeats)) if v in stochastic else BENCH_STEPS
               for v in steps}
    memory, times = {}, {v: [] for v in steps}
    for v, step in steps.items():  # warm-up (and compilation); the memory a step adds to what is allocated
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        step(), step()
        memory[v] = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else None
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits all alike
        for v, step in steps.items():
            times[v].append(timed(step, device, n_steps[v]))
    return bench_rows(args, models, times, memory, n_steps, x, y, device), loss_memory(args, memory, device)

def bench_rows(args, models, times, memory, n_steps, x, y, device):
    """One row per timed step: time per layer application against AB and against the plain model with
    the same applications (AB at n_layer or 2 n_layer layers), MFU of the executed FLOPs."""
    B, T, n, peak, rows = args.batch_size, args.block_size, args.n_layer, rins.peak_flops(device), []
    plain, model_of = {n: "AB", 2 * n: f"AB, {2 * n} layers"}, lambda v: models.get(v, models["AB"])
    apps = {v: rins.expected_applications(model_of(v).config) for v in times}
    # a stochastic row's step time is the mean over all its draws; the others', the median of the rounds
    step_time = {v: (statistics.fmean if model_of(v).config.p_skip else statistics.median)(ts)
                 for v, ts in times.items()}
    per_app = {v: t / apps[v] for v, t in step_time.items()}
    for v, t in step_time.items():
        model = model_of(v)
        with torch.no_grad(), rins.autocast(device):
            model(x, y)  # counts the executed FLOPs of one forward
        mfu = model.flops_per_token(T) * B * T / t / peak if peak and not model.config.p_skip else None
        rows.append(dict(variant=v, layer_applications=apps[v], ms_per_step=t * 1e3, tokens_per_s=B * T / t,
                         per_app_vs_ab=per_app[v] / per_app["AB"],
                         per_app_vs_plain=per_app[v] / per_app[plain[apps[v]]] if apps[v] in plain else None,
                         mfu=mfu, step_memory_gib=memory[v], draws=len(times[v]) * n_steps[v]))
    rows.sort(key=lambda r: r["draws"])  # the stochastic rows last
    return rows

def loss_memory(args, memory, device):
    """The LM head + loss's float32 logits whole and per chunk of rins.LOSS_CHUNK positions (bytes, by
    arithmetic), and on CUDA the measured memory of AB's step with and without the chunks."""
    positions = args.batch_size * args.block_size
    whole, chunk = (p * args.vocab * 4 for p in (positions, min(positions, rins.LOSS_CHUNK)))
    text = (f"LM head + loss: float32 logits {whole / 2**20:,.1f} MiB whole, {chunk / 2**20:,.1f} MiB per chunk of "
            f"{rins.LOSS_CHUNK} positions (arithmetic); ")
    if device.type != "cuda":
        return dict(whole_logits_bytes=whole, chunk_logits_bytes=chunk, text=text + "memory not measured on the CPU")
    saved = memory["AB, whole logits"] - memory["AB"]
    return dict(whole_logits_bytes=whole, chunk_logits_bytes=chunk, step_memory_saved_gib=saved,
                text=text + f"measured: AB's step takes {saved:.2f} GiB less than with whole logits")

def bench_decode(args, device, rows, save):
    """Greedy decoding at batch 1 (--max_new_tokens after 16 tokens) and 64 (--long_new_tokens after
    --long_prompt), eager uncached, eager cached and (with --compile) compiled cached, from a bf16 copy of the
    model on CUDA; each row added to rows and saved as soon as it is measured."""
    shapes = [(1, 16, args.max_new_tokens), (64, args.long_prompt, args.long_new_tokens)]
    print(f"decoding: median of {DECODE_REPEATS} interleaved rounds; compile_s: the compiled step's warm-up "
          f"(compiling, recording the CUDA graph); tokens_agree: the greedy prefix compiled and eager cached share")
    for v in DECODE_VARIANTS:
        for batch, prompt_len, n in shapes:
            torch._dynamo.reset()  # every row compiles afresh: no graph, shape or CUDA graph pool carried over
            model = bench_model(args, v, device, prompt_len + n, compile=False).eval()
            model = model.to(torch.bfloat16) if device.type == "cuda" else model  # no cast of every weight per step
            compiled = args.compile and (args.compiled_rows == "all" or (v, batch) == ("AB", 1))
            prompt = torch.randint(0, args.vocab, (batch, prompt_len), device=device)
            rows.append(dict(model=v, batch=batch, prompt=prompt_len, new_tokens=n,
                             **decode_row(model, prompt, n, device, compiled)))
            print_table(rows[-1:])
            save()
    return rows

def decode_row(model, prompt, n, device, compiled):
    """One decode row's measurements. Each way runs in its own try: an error is recorded, the others still run.
    The compiled step is tried with the default attention and with MATH's, and the faster kept."""
    ways = {"eager uncached": dict(use_cache=False), "eager cached": {}}
    if compiled:
        ways.update({f"compiled, {name}": dict(step=rins.compile_decode_step(device, step))
                     for name, step in COMPILED_ATTENTION.items()})
    run = lambda kw, tokens: model.generate(prompt, tokens, temperature=0, **kw)
    warmup, times, out, errors = {}, {way: [] for way in ways}, {}, {}
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    for way, kw in ways.items():  # warm-up: compiling and recording the CUDA graph, for a compiled step
        warmup[way] = attempt(way, errors, lambda: timed(lambda: run(kw, 8), device))
    for _ in range(DECODE_REPEATS):
        for way, kw in ways.items():
            if way not in errors:
                times[way].append(attempt(way, errors, lambda: timed(lambda: out.update({way: run(kw, n)}), device)))
    tok_s = {way: prompt.size(0) * n / statistics.median(ts) for way, ts in times.items() if way not in errors}
    compiled_ways = [w for w in tok_s if w.startswith("compiled")]
    best = max(compiled_ways, key=tok_s.get, default=None)
    ratio = lambda a, b: tok_s[a] / tok_s[b] if a in tok_s and b in tok_s else None
    row = {f"{w} tok/s": tok_s.get(w) for w in ("eager uncached", "eager cached")}
    row.update({"compiled cached tok/s": tok_s.get(best), "attention": best and best.split(", ")[1],
                "other attention tok/s": next((tok_s[w] for w in compiled_ways if w != best), None),
                "cached_vs_uncached": ratio("eager cached", "eager uncached"),
                "compiled_vs_uncached": ratio(best, "eager uncached"),
                "compiled_vs_eager_cached": ratio(best, "eager cached"),
                "compile_s": warmup.get(best), "tokens_agree": agreeing_prefix(out, best, prompt.size(1)),
                "cudagraph_skips": torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips})
    return dict(row, errors=errors or None)

# the compiled step with the attention of the eager path (the first of flash, memory-efficient, math that fits)
# and held to MATH's, whose attention inductor generates itself: at one query per sequence it may be faster
COMPILED_ATTENTION = {"default": rins.decode_step, "math": rins.decode_step_math_attention}

def attempt(way, errors, fn):
    """fn(), or None with the error recorded under way (a row keeps what its other ways measured)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure of one way is reported in the row, not raised
        errors[way] = f"{type(e).__name__}: {e}"[:500]

def agreeing_prefix(out, best, start):
    """How many new tokens the compiled and eager cached greedy outputs share from the first one, in every
    sequence of the batch (None without both)."""
    if best not in out or "eager cached" not in out:
        return None
    same = (out[best][:, start:] == out["eager cached"][:, start:]).all(dim=0)
    return int(same.long().cumprod(dim=0).sum())

def bench_model(args, variant, device, block_size, compile=True, n_layer=None):
    """A bench model of one variant, seeded: every variant starts from the same draws, as in a comparison."""
    signature, settings = rins.parse_variant(variant, rins.MODEL_KEYS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=args.vocab, n_layer=n_layer or args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd, signature=signature,
                          share_kv=settings.get("share_kv", False), p_skip=settings.get("p_skip", 0.0))).to(device)
    for block in model.transformer.h if args.compile and compile else []:
        block.compile()  # the blocks, not the walk, as in training
    return model

def train_step_fn(model, loss_fn, ctx):
    """A training step as train() runs one: forward, backward, clip, AdamW, zero_grad."""
    optimizer = rins.adamw(model, 0.1, 1e-4, (0.9, 0.99), next(model.parameters()).device.type)

    def step():
        with ctx:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step

def plain_loop_loss(model, x, y):
    """The same blocks walked by a plain nanoGPT loop (for block in h), without the schedule machinery:
    what the schedule walk's Python overhead is measured against."""
    h = model.wte(x) + model.wpe(torch.arange(x.size(1), device=x.device))
    for block in model.transformer.h:
        h = block(h)[0]
    return rins.lm_head_loss(model.transformer.ln_f(h), model.lm_head.weight, y, rins.LOSS_CHUNK)

def whole_logits_loss(model, x, y):
    """AB's loss over the whole batch's logits at once (nanoGPT's): what the chunked loss is measured against."""
    logits = model.lm_head(model.transformer(model.wte(x) + model.wpe(torch.arange(x.size(1), device=x.device))))
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

def timed(fn, device, n=1):
    """Wall time per call of n calls of fn back to back, the GPU's queued work included."""
    # CUDA runs asynchronously: without a synchronisation the clock would time the launches, not the work;
    # n steps between two synchronisations, as training runs them, so the launch gaps are timed too
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n

def print_table(rows):
    cell = lambda k, v: ("-" if v is None else f"{v:.1%}" if k == "mfu" else f"{v:,.3f}" if type(v) is float
                         else str(v))
    print(text_table([list(rows[0])] + [[cell(k, v) for k, v in row.items()] for row in rows]))


if __name__ == "__main__":
    main()
