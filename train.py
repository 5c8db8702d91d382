"""
Train RINS language models at the same training compute, compare them, and sample from them.
nanoGPT's train.py, with the budget counted in executed layer applications x tokens (RINS.md §3).

    python data/prepare.py && python train.py --compare        # CPU default: AB, A3B, ABAB, ~10 minutes
    python train.py --signature A3B --p_skip 0.5 --adapters     # one run
    python train.py --variants "AB,A2B,A3B,ABAB,(A3B)2,A3B:p_skip=0.5:adapters=1,AB:block_size=512:batch_size=8" \\
        --budget_steps 1000,2000 --seeds 0,1,2 --out_dir results/sweep
    python train.py --sample --ckpt out/A3B_b1200_s0/ckpt.pt --rounds 1
    python train.py --report results/lm --variants AB,A3B --plot a3b.png   # tables again, no training
    torchrun --standalone --nproc_per_node=8 train.py ...       # DDP: NCCL on GPUs, gloo on CPU

A variant is a signature with optional overrides "SIG:key=value:..." (keys: VARIANT_KEYS), so
"AB:block_size=512:batch_size=8" is the long-context baseline at the same tokens per step. Every
run gets the same budget: --budget_steps steps of the baseline (n_layer applications) at the
base batch. A run plans its steps from its expected schedule length, lays its LR schedule on its
own length and stops when its executed cost reaches the budget. After training it is evaluated
at several inference depths (rounds 1, r, r+1 for the A^rB family).

Outputs in --out_dir: <run>/ckpt.pt and <run>/run.json per run; results.csv and results.json
(one row per run x eval depth), curves.json (val loss vs cost), loss_vs_cost.png (if matplotlib).
--report DIR rebuilds them from the run.json files in DIR, e.g. after runs on several machines;
with --variants or --budget_steps it prints and plots only those runs, leaving DIR's results files.
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import rins
from data.prepare import gpt2_encoding, prepare_command
from rins import GPT, GPTConfig

CPU_DEFAULT_VARIANTS = "AB,A3B,ABAB"
EVAL_SEED = 1234  # validation batches are the same for every evaluation of every run
# overrides a variant may carry, with their parsers: "A3B:p_skip=0.5:adapters=1"
VARIANT_KEYS = {"p_skip": float, "adapters": lambda v: bool(int(v)), "adapter_rank": int,
                "share_kv": lambda v: bool(int(v)), "block_size": int, "batch_size": int, "learning_rate": float}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true", help=f"train --variants (default {CPU_DEFAULT_VARIANTS})")
    mode.add_argument("--sample", action="store_true", help="generate text from --ckpt")
    mode.add_argument("--bench", action="store_true", help="measure speed side by side (no data needed)")
    mode.add_argument("--report", metavar="DIR", help="tables and plot again from the finished runs in DIR")
    # data
    p.add_argument("--dataset", default="shakespeare_char", help="a folder under --data_dir made by data/prepare.py")
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    # model (defaults: the CPU char-level model)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=96)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    # RINS (single run; --variants overrides)
    p.add_argument("--signature", default="AB", help="RINS.md §2, e.g. AB, A3B, ABAB, (A3B)2")
    p.add_argument("--p_skip", type=float, default=0.0, help="stochastic RINS, RINS.md §4")
    p.add_argument("--adapters", action="store_true", help="linear adapters, RINS.md §5")
    p.add_argument("--adapter_rank", type=int, default=0, help="0: automatic (under 1%% of the parameters)")
    p.add_argument("--share_kv", action="store_true", help="KV sharing, RINS.md §6")
    # comparison
    p.add_argument("--variants", help="comma-separated variants, e.g. 'AB,A3B,A3B:p_skip=0.5:adapters=1'")
    p.add_argument("--budget_steps", help="budget in steps of the baseline (default 1200); a list sweeps budgets")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; a seed makes a CPU run reproducible")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32, help="sequences per micro-batch per process")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--learning_rate", type=float, default=5e-3)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--grad_clip", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--warmup_frac", type=float, default=0.05,
                   help="warm-up steps as a fraction of --budget_steps: the same number of steps for every variant")
    p.add_argument("--cooldown_frac", type=float, default=0.2, help="of the run's own budget")
    # evaluation, logging, checkpoints
    p.add_argument("--eval_points", type=int, default=10, help="evaluations (and checkpoints) per run, evenly in cost")
    p.add_argument("--eval_iters", type=int, default=20, help="validation batches per evaluation")
    p.add_argument("--log_interval", type=int, default=10, help="steps between logged train losses")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs, reuse finished ones")
    # system
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    # report
    p.add_argument("--plot", help="--report: where to draw the plot (default DIR/loss_vs_cost.png, or DIR/report.png for a subset)")
    # sampling
    p.add_argument("--ckpt", help="checkpoint to sample from")
    p.add_argument("--start", default="\n", help="prompt")
    p.add_argument("--rounds", type=int, help="rounds of the recursive block at inference (default: as trained)")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    # benchmark
    p.add_argument("--bench_vocab", type=int, default=65, help="vocabulary of --bench models (65: char Shakespeare)")
    p.add_argument("--bench_repeats", type=int, default=10, help="timed rounds per measurement in --bench")
    args = p.parse_args(argv)
    if args.report:  # --variants and --budget_steps select runs; left out, they keep every run in DIR
        args.variants = args.variants and [v.strip() for v in args.variants.split(",")]
        args.budget_steps = args.budget_steps and int_list(args.budget_steps, "--budget_steps")
        return args
    if args.compare and not args.variants:
        args.variants = CPU_DEFAULT_VARIANTS
    args.variants = [v.strip() for v in (args.variants or variant_of_flags(args)).split(",")]
    args.budget_steps = int_list(args.budget_steps or "1200", "--budget_steps")
    args.seeds = int_list(args.seeds, "--seeds")
    return args


def variant_of_flags(args):
    """The single run's variant string, from --signature and the RINS flags."""
    return args.signature + "".join(f":{k}={int(v) if isinstance(v, bool) else v}" for k, v in (
        ("p_skip", args.p_skip), ("adapters", args.adapters), ("adapter_rank", args.adapter_rank),
        ("share_kv", args.share_kv)) if v)


def int_list(text, flag):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {flag} takes comma-separated integers, got {text!r}")

# -----------------------------------------------------------------------------
# Runs: everything that defines one, checked before any compute


def plan_runs(args, meta, n_train, n_val, world_size):
    """One run per budget x seed x variant, each a dict {"name", "variant", "model", "train"}."""
    check_training_flags(args)
    runs = [make_run(args, spec, budget_steps, seed, meta, world_size)
            for budget_steps in args.budget_steps for seed in args.seeds for spec in args.variants]
    names = [run["name"] for run in runs]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: variants repeat a run: {sorted(n for n in set(names) if names.count(n) > 1)}")
    for run in runs:
        T = run["model"]["block_size"]
        if min(n_train, n_val) <= T:
            raise SystemExit(f"error: {run['name']}: block_size {T} needs more tokens than the data has "
                             f"(train {n_train}, val {n_val})")
        saved = saved_run(os.path.join(args.out_dir, run["name"]))
        if saved:
            if not args.resume:
                raise SystemExit(f"error: {saved[0]} exists: pass --resume to continue or reuse it, or choose another --out_dir")
            check_same_run(*saved, run)
    return runs


def saved_run(run_dir):
    """(path, run) of what run_dir already holds, a finished record or a checkpoint; None if nothing."""
    record, ckpt = os.path.join(run_dir, "run.json"), os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(record):
        with open(record) as f:
            return record, json.load(f)["run"]
    if os.path.exists(ckpt):
        return ckpt, torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["run"]
    return None


def check_training_flags(args):
    positive = ("batch_size", "grad_accum", "eval_points", "eval_iters", "log_interval")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {getattr(args, name)}")
    if min(args.budget_steps) < 1:
        raise SystemExit(f"error: --budget_steps must be >= 1, got {min(args.budget_steps)}")
    if not (0 < args.warmup_frac < 1 and 0 < args.cooldown_frac < 1):
        raise SystemExit(f"error: need 0 < --warmup_frac < 1 and 0 < --cooldown_frac < 1, "
                         f"got {args.warmup_frac} and {args.cooldown_frac}")


def variant_settings(args, spec):
    """(signature, settings): the flags' values with the variant's overrides, "A3B:p_skip=0.5"."""
    signature, *overrides = spec.split(":")
    settings = {k: getattr(args, k) for k in VARIANT_KEYS}
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            settings[key] = VARIANT_KEYS[key](value)
        except (KeyError, ValueError):
            raise SystemExit(f"error: variant {spec!r}: bad override {override!r}; write key=value with keys "
                             f"{', '.join(VARIANT_KEYS)} (booleans as 0/1)")
    return signature, settings


def model_config(args, spec, vocab_size):
    """The GPTConfig of a variant; a bad signature or setting stops here, before any compute."""
    signature, settings = variant_settings(args, spec)
    try:
        return GPTConfig(block_size=settings["block_size"], vocab_size=vocab_size,
                         n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                         bias=args.bias, signature=signature, p_skip=settings["p_skip"],
                         adapters=settings["adapters"], adapter_rank=settings["adapter_rank"],
                         share_kv=settings["share_kv"])
    except ValueError as e:
        raise SystemExit(f"error: variant {spec!r}: {e}")


def make_run(args, spec, budget_steps, seed, meta, world_size):
    _, settings = variant_settings(args, spec)
    config = model_config(args, spec, padded_vocab_size(meta))
    if settings["batch_size"] < 1:
        raise SystemExit(f"error: variant {spec!r}: batch_size must be >= 1")
    # RINS.md §3: the budget is the baseline's (n_layer applications) for budget_steps steps at the
    # base batch, in layer applications x tokens; the same for every variant of the comparison
    base_tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world_size
    train = dict(dataset=args.dataset, batch_size=settings["batch_size"], grad_accum=args.grad_accum,
                 world_size=world_size, learning_rate=settings["learning_rate"], weight_decay=args.weight_decay,
                 beta1=args.beta1, beta2=args.beta2, grad_clip=args.grad_clip,
                 warmup_steps=max(1, round(args.warmup_frac * budget_steps)), cooldown_frac=args.cooldown_frac, seed=seed, budget_steps=budget_steps,
                 budget=budget_steps * args.n_layer * base_tokens_per_step, eval_points=args.eval_points,
                 eval_iters=args.eval_iters, log_interval=args.log_interval)
    name = f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', spec).strip('_')}_b{budget_steps}_s{seed}"
    steps = rins.steps_for_budget(train["budget"], config, settings["batch_size"] * settings["block_size"]
                                  * args.grad_accum * world_size)
    if train["warmup_steps"] / steps + args.cooldown_frac > 1:
        raise SystemExit(f"error: {name}: {train['warmup_steps']} warm-up steps and a cool-down of "
                         f"{args.cooldown_frac:.0%} do not fit its {steps} steps: lower --warmup_frac or --cooldown_frac")
    return {"name": name, "variant": spec, "model": asdict(config), "train": train}


def padded_vocab_size(meta):
    """GPT-2's 50257 padded to 50304 as nanoGPT does: a multiple of 64 keeps the LM head fast on GPUs.
    Character vocabularies stay exact, so sampling never draws an id that has no character."""
    return meta["vocab_size"] if meta["tokenizer"] == "char" else -(-meta["vocab_size"] // 64) * 64


def check_same_run(path, saved, run):
    if saved != run:
        diff = [f"{k}: {saved[part].get(k)!r} -> {run[part].get(k)!r}" for part in ("model", "train")
                for k in sorted(set(saved[part]) | set(run[part])) if saved[part].get(k) != run[part].get(k)]
        raise SystemExit(f"error: {path} was written by a run with another configuration "
                         f"({'; '.join(diff) or 'variant ' + saved['variant']}): resume with its flags or use another --out_dir")

# -----------------------------------------------------------------------------
# Data


def load_data(data_dir, dataset):
    folder = os.path.join(data_dir, dataset)
    if not all(os.path.exists(os.path.join(folder, f)) for f in ("train.bin", "val.bin", "meta.json")):
        raise SystemExit(f"error: no prepared data in {folder}: run `{prepare_command(dataset)}` first")
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    load = lambda split: np.memmap(os.path.join(folder, f"{split}.bin"), dtype=np.uint16, mode="r")
    return load("train"), load("val"), meta


def get_batch(data, ix, block_size, device):
    """Inputs and next-token targets for the sequences starting at positions ix."""
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y

# -----------------------------------------------------------------------------
# Training


def learning_rate(progress, warmup, t):
    """LR when a fraction `progress` of the run's own budget has executed (RINS.md §3: the schedule
    is laid on each run's own length). [our choice] Linear warm-up over the fraction `warmup` (the
    same number of steps for every variant), inverse-square-root decay, linear cool-down that
    reaches zero exactly at the end of the budget (big_vision's "rsqrt")."""
    lr = t["learning_rate"] * min(1.0, progress / warmup)
    lr *= math.sqrt(warmup / max(progress, warmup))
    return lr * max(0.0, min(1.0, (1 - progress) / t["cooldown_frac"]))


@torch.no_grad()
def evaluate(model, data, block_size, batch_size, eval_iters, ctx, rounds=None):
    """(mean val loss, layer applications per forward) over fixed batches: the same text at every
    evaluation of every run with this batch shape, so curves and variants compare like for like."""
    model.eval()
    rng = torch.Generator().manual_seed(EVAL_SEED)
    device = next(model.parameters()).device
    losses = []
    for _ in range(eval_iters):
        x, y = get_batch(data, torch.randint(len(data) - block_size, (batch_size,), generator=rng), block_size, device)
        with ctx:
            losses.append(model(x, y, rounds=rounds)[1])
    model.train()
    return torch.stack(losses).mean().item(), model.transformer.applications


def train(run, run_dir, train_data, val_data, device, ddp, compile):
    """Train one run to its budget; returns its record (on the master process) or None."""
    m, t = run["model"], run["train"]
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    config = GPTConfig(**m)
    # the same seed on every rank: identical initial weights, and identical stochastic-skip draws
    # (model.transformer.skip_rng), so all ranks run the same units and no rank waits for another
    torch.manual_seed(t["seed"])
    model = GPT(config).to(device)
    optimizer = model.configure_optimizers(t["weight_decay"], t["learning_rate"], (t["beta1"], t["beta2"]), device.type)
    data_rng = torch.Generator().manual_seed(t["seed"])  # the data position: batch starts, drawn for all ranks
    state = dict(step=0, cost=0, tokens=0, flops=0, train_time=0.0, train_log=[], curve=[])
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(ckpt_path):  # plan_runs has checked that --resume is set and the run is the same
        state = load_checkpoint(ckpt_path, model, optimizer, data_rng)
    if compile:
        for block in model.transformer.h:  # the blocks, not the walk: stochastic skips do not recompile
            block.compile()
    # a skipped unit (p_skip) leaves its layers or adapter without gradient on that step
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=config.p_skip > 0) if ddp else model
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    B, T, accum = t["batch_size"], m["block_size"], t["grad_accum"]
    tokens_per_step = B * T * accum * world
    steps = rins.steps_for_budget(t["budget"], config, tokens_per_step)
    # the budget rounded to whole planned steps; the run stops when its executed cost reaches it
    target = steps * rins.expected_applications(config) * tokens_per_step
    warmup = t["warmup_steps"] / steps  # the warm-up as a fraction of this run's own budget
    if master:
        tqdm.write(f"{run['name']}: schedule {rins.layer_schedule(config.signature, config.n_layer)}, "
                   f"{steps} planned steps x {tokens_per_step} tokens = {steps * tokens_per_step / len(train_data):.2f} "
                   f"epochs, budget {target:.3e} layer-application tokens")
    finite = torch.ones((), dtype=torch.bool, device=device)
    pbar = tqdm(total=steps, initial=state["step"], desc=run["name"], disable=not master, dynamic_ncols=True)
    model.train()
    clock = time.perf_counter()  # training time runs between evaluations
    while state["cost"] < target:
        # one draw of B x accum x world starts per step; micro-batch a of rank r takes its slice, so the
        # global batch does not depend on how it is split over processes and micro-batches
        ix = torch.randint(len(train_data) - T, (accum * world * B,), generator=data_rng)
        step_cost, step_flops, loss_sum = 0, 0, 0.0
        for a in range(accum):
            x, y = get_batch(train_data, ix[(a * world + rank) * B:(a * world + rank + 1) * B], T, device)
            if ddp:
                train_model.require_backward_grad_sync = a == accum - 1  # all-reduce once per step
            with ctx:
                _, loss = train_model(x, y)
            # RINS.md §3: count what executed (skips included), the same on every rank
            step_cost += model.transformer.applications * B * T * world
            step_flops += model.flops_per_token(T) * B * T * world
            (loss / accum).backward()
            loss_sum += loss.detach()
        lr = learning_rate((state["cost"] + step_cost / 2) / target, warmup, t)  # at the middle of this step
        for group in optimizer.param_groups:
            group["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"] or math.inf)
        finite &= torch.isfinite(norm) & torch.isfinite(loss_sum)  # checked at log points: no GPU sync per step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["cost"] += step_cost
        state["tokens"] += tokens_per_step
        state["flops"] += step_flops
        pbar.update()

        done = state["cost"] >= target
        eval_now = done or state["cost"] * t["eval_points"] >= (len(state["curve"]) + 1) * target
        if eval_now or state["step"] % t["log_interval"] == 0:
            train_loss = log_step(state, loss_sum / accum, finite, lr, ddp, ckpt_path)
            pbar.set_postfix(loss=f"{train_loss:.4f}")
        if eval_now and master:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the GPU's queued steps belong to training time
            state["train_time"] += time.perf_counter() - clock
            val_loss, _ = evaluate(model, val_data, T, B, t["eval_iters"], ctx)
            if not math.isfinite(val_loss):  # the last update broke the weights: do not save them
                stop_not_finite(state["step"], ckpt_path)
            state["curve"].append(dict(step=state["step"], tokens=state["tokens"], cost=state["cost"], val_loss=val_loss))
            tqdm.write(f"{run['name']} step {state['step']}: cost {state['cost']:.3e}, train {train_loss:.4f}, val {val_loss:.4f}")
            save_checkpoint(ckpt_path, run, model, optimizer, state, data_rng)
            clock = time.perf_counter()
    pbar.close()
    if not master:
        return None
    return finish(run, model, state, steps, target, val_data, len(train_data), ctx, device, world)


def log_step(state, loss, finite, lr, ddp, ckpt_path):
    """Record the train loss (averaged over ranks); stop cleanly if any loss or gradient was not finite."""
    stats = torch.stack([loss.float(), (~finite).float()])
    if ddp:
        dist.all_reduce(stats)
        stats[0] /= dist.get_world_size()
    loss, bad = stats.tolist()
    if bad:
        stop_not_finite(state["step"], ckpt_path)
    state["train_log"].append(dict(step=state["step"], loss=loss, lr=lr, cost=state["cost"]))
    return loss


def stop_not_finite(step, ckpt_path):
    saved = (f"the last good checkpoint {ckpt_path} is intact" if os.path.exists(ckpt_path)
             else "no checkpoint was written")
    raise SystemExit(f"error: the loss became nan/inf by step {step}; {saved}; try a lower --learning_rate")


def save_checkpoint(path, run, model, optimizer, state, data_rng):
    """Everything a resumed run needs to continue exactly: weights, optimizer, progress, RNG states."""
    rng = {"torch": torch.get_rng_state(), "data": data_rng.get_state(), "skip": model.transformer.skip_rng.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    ckpt = {"run": run, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state, "rng": rng}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a kill while writing leaves the previous checkpoint intact


def load_checkpoint(path, model, optimizer, data_rng):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    data_rng.set_state(ckpt["rng"]["data"])
    model.transformer.skip_rng.set_state(ckpt["rng"]["skip"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["state"]

# -----------------------------------------------------------------------------
# Results: evaluation at several depths, scaling-law fit, table, files


def eval_depths(signature):
    """Inference depths to evaluate: rounds 1 (the baseline's cost), r (as trained) and r + 1
    (extrapolation) for a signature with a recursive block; as trained (None) for the others."""
    try:
        _, r = rins.recursive_run(signature)
    except ValueError:  # no single repeated block (AB, ABAB): rounds has no meaning
        return [None]
    return [1, r, r + 1]


def finish(run, model, state, steps, target, val_data, n_train, ctx, device, world):
    """Evaluate the trained run at each depth, fit its scaling law, write and return its record."""
    t = run["train"]
    evals = []
    for rounds in eval_depths(run["model"]["signature"]):
        val_loss, applications = evaluate(model, val_data, run["model"]["block_size"], t["batch_size"],
                                          t["eval_iters"], ctx, rounds)
        evals.append(dict(rounds=rounds, eval_applications=applications, val_loss=val_loss))
    # fit on the points after warm-up: the law describes training, not the first steps
    points = [p for p in state["curve"] if p["cost"] > t["warmup_steps"] / steps * target]
    fit = fit_scaling_law([p["cost"] for p in points], [p["val_loss"] for p in points]) if len(points) >= 4 else None
    peak = rins.peak_flops(device)
    record = dict(run=run, steps=state["step"], planned_steps=steps, tokens=state["tokens"],
                  epochs=state["tokens"] / n_train, tokens_per_param=state["tokens"] / model.get_num_params(), cost=state["cost"], target=target,
                  wall_s=state["train_time"], tokens_per_s=state["tokens"] / state["train_time"],
                  mfu=state["flops"] / state["train_time"] / (peak * world) if peak else None,
                  n_params=model.get_num_params(), n_adapter_params=model.num_adapter_params(),
                  evals=evals, fit=fit, curve=state["curve"], train_log=state["train_log"])
    return record


def fit_scaling_law(x, y):
    """Least-squares fit of loss = beta * x^(-c) + eps_inf with numpy only (RINS.md §8).

    For a fixed eps_inf the law is a line in log-log space, log(loss - eps_inf) = log(beta) - c log(x),
    fitted exactly; eps_inf in [0, min(loss)) is chosen as the one whose line fits the losses best
    (squared error), on a grid refined by golden-section search. Keeping eps_inf in that range is
    what makes the fit well posed on short curves (else c -> 0 with beta and -eps_inf -> infinity).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def fit(eps):
        slope, intercept = np.polyfit(np.log(x), np.log(y - eps), 1)
        beta, c = math.exp(intercept), -float(slope)
        return float(np.sum((beta * x ** -c + eps - y) ** 2)), beta, c

    grid = y.min() * (1 - np.logspace(-6, 0, 300))  # from just below min(loss) down to 0
    i = int(np.argmin([fit(eps)[0] for eps in grid]))
    lo, hi = grid[min(i + 1, len(grid) - 1)], grid[max(i - 1, 0)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        e1, e2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if fit(e1)[0] < fit(e2)[0]:
            hi = e2
        else:
            lo = e1
    eps_inf = (lo + hi) / 2
    sse, beta, c = fit(eps_inf)
    return dict(beta=beta, c=c, eps_inf=float(eps_inf), rmse=math.sqrt(sse / len(x)))


def budget_fits(records, n_boot=200):
    """The law fitted across budgets, for each variant run at three budgets or more: one point per
    run, its executed cost and its final val loss as trained. Unlike the per-run fits, every point
    ends a full LR schedule. Uncertainty: the std over a bootstrap that resamples each budget's runs
    (its seeds) with replacement."""
    by_variant = {}
    for r in records:
        trained = r["evals"][1] if len(r["evals"]) == 3 else r["evals"][0]  # eval_depths: [1, r, r+1] or [as trained]
        by_budget = by_variant.setdefault(r["run"]["variant"], {})
        by_budget.setdefault(r["run"]["train"]["budget_steps"], []).append((r["cost"], trained["val_loss"]))
    rng = np.random.default_rng(0)
    fits = []
    for variant, by_budget in by_variant.items():
        if len(by_budget) < 3:
            continue
        points = [p for runs in by_budget.values() for p in runs]
        fit = fit_scaling_law(*zip(*points))
        boot = []
        for _ in range(n_boot):  # each budget keeps its number of runs, drawn with replacement
            sample = [runs[i] for runs in by_budget.values() for i in rng.integers(len(runs), size=len(runs))]
            boot.append(fit_scaling_law(*zip(*sample)))
        fits.append(dict(variant=variant, budgets=sorted(by_budget), runs=len(points), beta=fit["beta"], c=fit["c"],
                         eps_inf=fit["eps_inf"], c_std=float(np.std([b["c"] for b in boot])),
                         eps_inf_std=float(np.std([b["eps_inf"] for b in boot]))))
    return fits


def budget_fits_table(fits):
    lines = ["law across budgets: loss = beta * cost^(-c) + eps_inf (± bootstrap std over seeds)"]
    lines += [f"  {f['variant']}: budgets {','.join(map(str, f['budgets']))} ({f['runs']} runs), "
              f"c {f['c']:.3f} ± {f['c_std']:.3f}, eps_inf {f['eps_inf']:.3f} ± {f['eps_inf_std']:.3f}" for f in fits]
    return "\n".join(lines)


def result_rows(records):
    """One row per run x eval depth, the columns of results.csv."""
    rows = []
    for r in records:
        run, m, t, fit = r["run"], r["run"]["model"], r["run"]["train"], r["fit"] or {}
        for e in r["evals"]:
            rows.append(dict(
                run=run["name"], variant=run["variant"], signature=m["signature"], p_skip=m["p_skip"],
                adapters=m["adapters"], share_kv=m["share_kv"], block_size=m["block_size"],
                batch_size=t["batch_size"], seed=t["seed"], budget_steps=t["budget_steps"], budget=t["budget"],
                rounds=e["rounds"], eval_applications=e["eval_applications"], steps=r["steps"],
                planned_steps=r["planned_steps"], tokens=r["tokens"], epochs=r["epochs"],
                tokens_per_param=r["tokens"] / r["n_params"], cost=r["cost"],
                val_loss=e["val_loss"], wall_s=r["wall_s"], tokens_per_s=r["tokens_per_s"], mfu=r["mfu"],
                n_params=r["n_params"], n_adapter_params=r["n_adapter_params"],
                fit_beta=fit.get("beta"), fit_c=fit.get("c"), fit_eps_inf=fit.get("eps_inf")))
    return rows


def summary_table(rows):
    """Rows grouped over seeds: mean (± std with several seeds) of the val loss and of the fitted law,
    per variant, budget and depth. The spread of c and eps_inf over seeds is their uncertainty."""
    groups = {}
    for row in rows:
        groups.setdefault((row["variant"], row["budget_steps"], row["rounds"]), []).append(row)
    lines = [("variant", "budget", "rounds", "apps", "seeds", "steps", "tokens", "epochs", "tok/param", "val_loss",
              "c", "eps_inf", "wall_s", "MFU")]
    for (variant, budget, rounds), g in groups.items():
        lines.append((variant, str(budget), "-" if rounds is None else str(rounds), str(g[0]["eval_applications"]),
                      str(len(g)), mean_std(g, "steps", ".0f", std=False), mean_std(g, "tokens", ".3g", std=False),
                      mean_std(g, "epochs", ".3f", std=False), mean_std(g, "tokens_per_param", ".1f", std=False),
                      mean_std(g, "val_loss", ".4f"),
                      mean_std(g, "fit_c", ".3f"), mean_std(g, "fit_eps_inf", ".3f"),
                      mean_std(g, "wall_s", ".0f", std=False), mean_std(g, "mfu", ".1%", std=False)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines)


def mean_std(group, key, spec, std=True):
    """'mean ± std' of a column over seeds ('-' where a run has no value)."""
    values = [r[key] for r in group]
    if any(v is None for v in values):
        return "-"
    text = format(statistics.fmean(values), spec)
    if std and len(values) > 1:
        text += " ± " + format(statistics.stdev(values), spec)
    return text


def write_results(out_dir, records, plot_path=None):
    rows = result_rows(records)
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(rows, indent=1))
    with open(os.path.join(out_dir, "results.csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(os.path.join(out_dir, "results.csv.tmp"), os.path.join(out_dir, "results.csv"))
    curves = {r["run"]["name"]: dict(variant=r["run"]["variant"], seed=r["run"]["train"]["seed"],
                                     budget_steps=r["run"]["train"]["budget_steps"], fit=r["fit"], points=r["curve"])
              for r in records}
    write_atomic(os.path.join(out_dir, "curves.json"), json.dumps(curves, indent=1))
    fits = budget_fits(records)
    write_atomic(os.path.join(out_dir, "budget_fits.json"), json.dumps(fits, indent=1))
    plot_curves(records, plot_path or os.path.join(out_dir, "loss_vs_cost.png"))
    print(f"wrote {out_dir}/results.csv, results.json, curves.json, budget_fits.json")
    return fits


def report(args):
    """Results files, table and plot again from the finished runs of a results folder, without training."""
    paths = glob.glob(os.path.join(args.report, "*", "run.json"))
    if not paths:
        raise SystemExit(f"error: no finished runs (<run>/run.json) in {args.report}")
    records = []
    for path in paths:
        with open(path) as f:
            records.append(json.load(f))
    variants = args.variants or sorted({r["run"]["variant"] for r in records})
    budgets = args.budget_steps or sorted({r["run"]["train"]["budget_steps"] for r in records})
    records = [r for r in records if r["run"]["variant"] in variants and r["run"]["train"]["budget_steps"] in budgets]
    records.sort(key=lambda r: (variants.index(r["run"]["variant"]), r["run"]["train"]["budget_steps"],
                                r["run"]["train"]["seed"]))
    found_variants = {r["run"]["variant"] for r in records}
    found_budgets = {r["run"]["train"]["budget_steps"] for r in records}
    missing = [v for v in variants if v not in found_variants] + [f"budget {b}" for b in budgets if b not in found_budgets]
    if missing:
        raise SystemExit(f"error: no finished runs of {', '.join(missing)} in {args.report}")
    if args.variants or args.budget_steps:  # a subset: DIR's results files keep every run
        plot_curves(records, args.plot or os.path.join(args.report, "report.png"))
        fits = budget_fits(records)
    else:
        fits = write_results(args.report, records, args.plot)
    print_summary(records, fits)
    return records


def print_summary(records, fits):
    print(summary_table(result_rows(records)))
    if fits:
        print(budget_fits_table(fits))


def plot_curves(records, path):
    """Two panels, means over seeds (band and bars: ± std). Left: val loss vs training cost, one colour
    per variant (with several budgets, one curve each). Right: final val loss vs inference cost, at each
    evaluated depth: a recursive model run at rounds=1 sits at the baseline's cost (claim 3, "no regret"),
    at rounds=r+1 beyond its training depth (claim 7). Needs the optional matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib for loss_vs_cost.png)")
        return
    groups = {}  # (variant, budget) -> the runs over seeds
    for r in records:
        groups.setdefault((r["run"]["variant"], r["run"]["train"]["budget_steps"]), []).append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {}
    for (variant, budget), runs in groups.items():
        label = None if variant in styles else variant
        i = styles.setdefault(variant, len(styles))
        style = dict(color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3])
        n = min(len(r["curve"]) for r in runs)  # stochastic runs may log a point more or less
        cost = np.mean([[p["cost"] for p in r["curve"][:n]] for r in runs], axis=0)
        loss = np.array([[p["val_loss"] for p in r["curve"][:n]] for r in runs])
        left.plot(cost, loss.mean(0), marker="o", ms=3, label=label, **style)
        if len(runs) > 1:
            left.fill_between(cost, loss.mean(0) - loss.std(0, ddof=1), loss.mean(0) + loss.std(0, ddof=1),
                              color=style["color"], alpha=0.15)
        apps = [e["eval_applications"] for e in runs[0]["evals"]]
        final = np.array([[e["val_loss"] for e in r["evals"]] for r in runs])
        right.errorbar(apps, final.mean(0), yerr=final.std(0, ddof=1) if len(runs) > 1 else None,
                       marker="o", ms=4, capsize=3, **style)
        if len(apps) == 1:  # a model without rounds: a level line to read the others against
            right.axhline(final.mean(), color=style["color"], linewidth=0.8, linestyle=":")
    left.set_xscale("log")
    left.set_xlabel("training cost (layer applications x tokens)")
    left.set_ylabel("validation loss")
    left.legend(fontsize=8)
    right.set_xlabel("inference cost (layer applications per token): rounds 1, r, r+1")
    right.set_ylabel("final validation loss")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def print_run(record):
    mfu = "n/a (no peak known for this device)" if record["mfu"] is None else f"{record['mfu']:.1%}"
    losses = ", ".join(f"{e['val_loss']:.4f} (rounds {e['rounds'] or 'as trained'})" for e in record["evals"])
    print(f"{record['run']['name']}: {record['steps']} steps ({record['planned_steps']} planned), "
          f"{record['tokens']:,} tokens = {record['epochs']:.3f} epochs = {record['tokens'] / record['n_params']:.1f} "
          f"tokens per parameter, executed cost {record['cost']:.4e} "
          f"(budget {record['target']:.4e}), {record['wall_s']:.1f} s training, "
          f"{record['tokens_per_s']:,.0f} tokens/s, MFU {mfu}; val loss {losses}")

# -----------------------------------------------------------------------------
# Sampling


def tokenizer(meta):
    """(encode, decode) for a prepared dataset's vocabulary."""
    if meta["tokenizer"] == "gpt2":
        enc = gpt2_encoding()
        # ids of the padded vocabulary past GPT-2's 50257 have no text
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"}),
                lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]))
    itos = meta["itos"]
    stoi = {c: i for i, c in enumerate(itos)}

    def encode(s):
        missing = sorted(set(s) - set(stoi))
        if missing:
            raise SystemExit(f"error: the prompt has characters outside the vocabulary: {missing}")
        return [stoi[c] for c in s]
    return encode, lambda ids: "".join(itos[i] for i in ids if i < len(itos))


def sample(args):
    """Generate from a checkpoint with the KV cache, at --rounds rounds of the recursive block."""
    if not args.ckpt or not os.path.exists(args.ckpt):
        raise SystemExit(f"error: --sample needs --ckpt PATH of a run's ckpt.pt, got {args.ckpt!r}")
    if not args.start:
        raise SystemExit("error: --start must not be empty")
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    run = ckpt["run"]
    if args.rounds is not None:
        try:
            rins.recursive_run(run["model"]["signature"])
        except ValueError as e:
            raise SystemExit(f"error: --rounds: {e}")
        if args.rounds < 1:
            raise SystemExit(f"error: --rounds must be >= 1, got {args.rounds}")
    encode, decode = tokenizer(load_data(args.data_dir, run["train"]["dataset"])[2])
    device = torch.device(args.device)
    model = GPT(GPTConfig(**run["model"]))
    model.load_state_dict(ckpt["model"])
    model.eval().to(device)
    torch.manual_seed(args.seeds[0])
    x = torch.tensor([encode(args.start)], dtype=torch.long, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for _ in tqdm(range(args.num_samples), desc="samples", leave=False):
        with ctx:
            y = model.generate(x, args.max_new_tokens, args.temperature, args.top_k, rounds=args.rounds)
        tqdm.write(decode(y[0].tolist()) + "\n" + "-" * 40)

# ----------------------------------------------------------------------------- benchmark mode
# python train.py --bench: ratios measured side by side in one run (issue 6). Machines are noisy,
# so variants are timed interleaved, several rounds, and the median is reported.

BENCH_SIGNATURES = ["AB", "A2B", "A3B", "ABAB", "(A3B)2", "A3B:p_skip=0.5"]


def bench_model(args, variant, device, **overrides):
    config = model_config(args, variant, args.bench_vocab)
    torch.manual_seed(0)
    return GPT(replace(config, dropout=0.0, **overrides)).to(device)


def timed(fn, device):
    """Wall time of one call of fn, with the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def train_step_fn(model, x, y, ctx):
    def step():
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def plain_loop_step_fn(model, x, y, ctx):
    """The same blocks walked by a plain nanoGPT loop (for block in h), no schedule machinery:
    what the schedule walk's Python overhead is measured against."""
    def step():
        with ctx:
            B, T = x.size()
            h = model.wte(x) + model.wpe(torch.arange(T, device=x.device))
            for block in model.transformer.h:
                h = block(h)[0]
            logits = model.lm_head(model.transformer.ln_f(h))
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def bench(args):
    device = torch.device(args.device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    B, T = args.batch_size, args.block_size
    x = torch.randint(0, args.bench_vocab, (B, T), device=device)
    y = torch.randint(0, args.bench_vocab, (B, T), device=device)
    print(f"device: {device_name(device)}; n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} "
          f"vocab={args.bench_vocab} batch={B}x{T}; median of {args.bench_repeats} interleaved rounds")

    # 1. training steps: time per executed layer application relative to AB
    models = {v: bench_model(args, v, device) for v in BENCH_SIGNATURES}
    steps = {v: train_step_fn(m, x, y, ctx) for v, m in models.items()}
    steps["AB, plain loop"] = plain_loop_step_fn(models["AB"], x, y, ctx)
    times = {v: [] for v in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.bench_repeats):  # interleaved, so drift in machine speed hits all alike
        for v, fn in steps.items():
            times[v].append(timed(fn, device))
    median = {v: statistics.median(ts) for v, ts in times.items()}
    applications = {v: rins.expected_applications(m.config) for v, m in models.items()}
    applications["AB, plain loop"] = applications["AB"]
    peak = rins.peak_flops(device)
    rows = []
    for v, t in median.items():
        model = models.get(v, models["AB"])
        with torch.no_grad(), ctx:
            model(x, y)  # counts the executed FLOPs of one forward
        deterministic = model.config.p_skip == 0  # a stochastic step's FLOPs vary with its draw
        mfu = model.flops_per_token(T) * B * T / t / peak if peak and deterministic else None
        rows.append([v, f"{applications[v]:g}", f"{t * 1e3:.1f}", f"{B * T / t:,.0f}",
                     f"{t / applications[v] / (median['AB'] / applications['AB']):.3f}",
                     "-" if mfu is None else f"{mfu:.1%}"])
    print_table(["variant", "layer apps", "ms/step", "tokens/s", "time per app / AB", "MFU"], rows)

    # 2. torch.compile of the blocks, not the walk: a new draw of rounds must reuse the graphs
    if args.compile:
        import torch._dynamo as dynamo
        rows = []
        for v in ["AB", "A3B", "A3B:p_skip=0.5"]:
            model = bench_model(args, v, device)
            for block in model.transformer.h:
                block.compile()
            fn = train_step_fn(model, x, y, ctx)
            fn()  # compiles
            graphs = dynamo.utils.counters["stats"]["unique_graphs"]
            t = statistics.median(timed(fn, device) for _ in range(args.bench_repeats))
            recompiles = dynamo.utils.counters["stats"]["unique_graphs"] - graphs
            rows.append([v, f"{median[v] * 1e3:.1f}", f"{t * 1e3:.1f}", f"{median[v] / t:.2f}x", str(recompiles)])
        print_table(["variant", "eager ms", "compiled ms", "speed-up",
                     f"graphs compiled in {args.bench_repeats} more steps"], rows)

    # 3. generation: tokens/s with and without the KV cache, cache bytes relative to AB
    rows = []
    prompt = torch.randint(0, args.bench_vocab, (1, 16), device=device)
    for new_tokens in (128, 512):
        for v, share_kv in [("AB", False), ("A3B", False), ("A3B", True)]:
            model = bench_model(args, v, device, share_kv=share_kv, block_size=16 + new_tokens).eval()
            gen = {use_cache: lambda use_cache=use_cache: model.generate(prompt, new_tokens, use_cache=use_cache)
                   for use_cache in (True, False)}
            with ctx:
                model.generate(prompt, 8)  # warm-up
                t = {use_cache: timed(fn, device) for use_cache, fn in gen.items()}
            cache = model.new_cache()
            with torch.no_grad(), ctx:
                model(prompt, cache=cache)
            if v == "AB":
                ab_bytes = cache.nbytes
            rows.append([v + (" share_kv" if share_kv else ""), new_tokens, f"{new_tokens / t[True]:,.0f}",
                         f"{new_tokens / t[False]:,.0f}", f"{t[False] / t[True]:.1f}x", f"{cache.nbytes / ab_bytes:.2f}"])
    print_table(["model", "new tokens", "tok/s cached", "tok/s uncached", "speed-up", "cache bytes / AB"], rows)
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    print()

# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.sample:
        return sample(args)
    if args.bench:
        return bench(args)
    if args.report:
        return report(args)
    ddp = "RANK" in os.environ  # launched by torchrun
    train_data, val_data, meta = load_data(args.data_dir, args.dataset)
    runs = plan_runs(args, meta, len(train_data), len(val_data), int(os.environ.get("WORLD_SIZE", 1)))
    device = torch.device(args.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    master = not ddp or dist.get_rank() == 0
    records = []
    for run in runs:
        run_dir = os.path.join(args.out_dir, run["name"])
        record_path = os.path.join(run_dir, "run.json")
        if os.path.exists(record_path):  # finished earlier (plan_runs checked --resume and the configuration)
            with open(record_path) as f:
                record = json.load(f)
        else:
            os.makedirs(run_dir, exist_ok=True)
            record = train(run, run_dir, train_data, val_data, device, ddp, args.compile)
            if master:
                write_atomic(record_path, json.dumps(record))
        if master:
            print_run(record)
        records.append(record)
    if master:
        print_summary(records, write_results(args.out_dir, records))
    if ddp:
        dist.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
