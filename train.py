"""
Train RINS language models at the same training compute, compare them, and sample from them:
nanoGPT's train.py with the budget counted in executed FLOPs (or layer applications x tokens).

    python train.py --compare                              # CPU default: AB, A3B, ABAB, ~10 minutes
    python train.py --variants "AB,A3B,A3B:p_skip=0.5:adapters=1" --budget_steps 1500,3000 --seeds 0,1
    python train.py --report out | --sample --ckpt out/A3B_b1200_s0/ckpt.pt | --bench
    torchrun --standalone --nproc_per_node=8 train.py ...  # DDP: NCCL on GPUs, gloo on CPU

A variant is "SIG:key=value:..." (keys: VARIANT_KEYS); the flags give what it does not override. The
README's Definitions (compute accounting) say how runs are planned.
"""

import argparse
import csv
import errno
import fcntl
import glob
import io
import json
import math
import os
import re
import signal
import statistics
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import rins
from data.prepare import codec, load_prepared, read_json, write_atomic
from rins import GPT, GPTConfig

DEFAULT_VARIANTS = "AB,A3B,ABAB"
BASELINE = "AB"  # --baseline's default: a comparison without it has a table but no effective-compute ratio
EVAL_SEED = 1234  # validation batches are the same for every evaluation of every run
VARIANT_KEYS = {**rins.MODEL_KEYS, "block_size": int, "batch_size": int, "learning_rate": float}
LOCKS = []  # the open lock files of this process's runs: a lock lives as long as its file is open

# How one `--compare` run flows through this file, top to bottom:
#   main            reads the flags (never changes them) and the grid: variants x budgets x seeds
#   compare         loads the data once, plans every run, then trains each one (or reuses it) in turn
#   plan_runs       checks every flag and earlier run before any compute, then locks each run's folder
#   make_run        turns a variant and a budget into a Run: its model (GPTConfig) and its TrainConfig
#   plan            the budget rule (rins.plan_budget): a run's steps, the cost it stops at, its warm-up
#   train           one run: builds it (start), then loops over step(), evaluating and checkpointing
#   step            one optimisation step: draw, forward, backward, clip, update, count what executed
#   finish          scores the trained run at every depth and returns its record (run.json)
#   write_results   the comparison's table, results.csv and plot, from the records

def build_parser():
    """nanoGPT's flags (data, model, optimisation) and RINS's (the layout and its options). Every default
    runs on a laptop's CPU in minutes; a variant in --variants overrides some of them for itself alone."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true", help=f"train --variants (default {DEFAULT_VARIANTS})")
    mode.add_argument("--sample", action="store_true", help="generate text from --ckpt")
    mode.add_argument("--bench", action="store_true", help="measure speed side by side (no data needed)")
    mode.add_argument("--report", metavar="DIR", nargs="+",
                      help="the table and plot again from the runs in DIR; several: the headline figure (--plot)")
    # data and model (the defaults: the CPU char-level model)
    p.add_argument("--dataset", default="shakespeare_char", help="made by data/prepare.py")
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=96)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.0)
    # RINS: the defaults of every variant
    p.add_argument("--signature", default="AB", help="e.g. AB, A3B, ABAB, (A3B)2 (README: Definitions)")
    p.add_argument("--p_skip", type=float, default=0.0, help="stochastic RINS: skip probability")
    p.add_argument("--adapters", action="store_true", help="a linear adapter after each unit but the last")
    p.add_argument("--adapter_rank", type=int, default=0, help="0: automatic (under 1%% of the block stack)")
    p.add_argument("--share_kv", action="store_true", help="later rounds reuse round 1's keys and values")
    add_comparison_flags(p)
    # sampling and the benchmark
    p.add_argument("--ckpt", help="checkpoint to sample from")
    p.add_argument("--start", default="\n", help="prompt")
    p.add_argument("--rounds", type=int, help="rounds of the recursive block (default: as trained)")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--bench_vocab", type=int, default=65, help="vocabulary of --bench models")
    p.add_argument("--bench_repeats", type=int, default=10, help="timed rounds per measurement in --bench")
    return p

def add_comparison_flags(p):
    """The flags of the comparison: its grid, its optimisation, its evaluations, files and machine."""
    p.add_argument("--variants", help="comma-separated variants, e.g. 'AB,A3B,A3B:p_skip=0.5:adapters=1'")
    p.add_argument("--budget_steps", help="in steps of the baseline AB (default 1200)")
    p.add_argument("--budget_unit", default="flops", choices=rins.BUDGET_UNITS,
                   help="what the budget counts: executed FLOPs, or layer applications x tokens (older studies)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0; --report: every seed); a seed makes a CPU "
                   "run reproducible")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per micro-batch per process")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--learning_rate", type=float, default=5e-3)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--grad_clip", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--warmup_frac", type=float, default=0.2, help="warm-up, of --budget_steps (RESULTS.md: measured)")
    p.add_argument("--cooldown_frac", type=float, default=0.2, help="of the run's own budget")
    # evaluation, checkpoints, results, the machine
    p.add_argument("--eval_points", type=int, default=10, help="evaluations and checkpoints per run")
    p.add_argument("--eval_iters", type=int, default=20, help="validation batches per evaluation")
    p.add_argument("--log_interval", type=int, default=10, help="steps between logged train losses")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs, reuse finished ones")
    p.add_argument("--baseline", help=f"the variant effective compute is measured against (default {BASELINE}; "
                   "named: the runs must have it)")
    p.add_argument("--plot", help="--report: where the plot goes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks")

@dataclass
class Grid:
    """The comma-separated flags, read once: the runs a comparison trains (variants x budget_steps x seeds),
    or the runs --report selects. Kept apart from the parsed flags, which keep the text the user typed."""
    variants: list      # variant specs as written, "A3B:p_skip=0.5"; None: --report keeps every variant
    budget_steps: list  # in steps of the baseline AB; empty: --report keeps every budget
    seeds: list         # empty: --report keeps every seed

def main(argv=None):
    """The command line: --compare (the default: train the variants, then the table), --report, --sample or
    --bench. Returns what the mode returns (the comparison's records), so tests and notebooks can call it.

    A bad flag, file or setting stops with one line "error: ..." (SystemExit) before any compute; Ctrl-C and
    SIGTERM stop with one line that says how to resume."""
    args = build_parser().parse_args(argv)
    # one run from the flags, or the listed variants; --report keeps every run unless they select some
    variants = args.variants or (DEFAULT_VARIANTS if args.compare else None if args.report else args.signature)
    grid = Grid(variants=variants and [v.strip() for v in variants.split(",")],
                budget_steps=int_list(args.budget_steps or ("" if args.report else "1200"), "--budget_steps"),
                seeds=int_list(args.seeds or ("" if args.report else "0"), "--seeds"))
    # torchrun, kill and job schedulers stop a process with SIGTERM: it ends like Ctrl-C, with the resume hint
    # below instead of a traceback (the previous handler comes back, for a caller that is not a script)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        if args.bench:
            return bench(args)
        return (sample if args.sample else report if args.report else compare)(args, grid)
    except KeyboardInterrupt:  # checkpoints are written atomically, so the last one is whole
        raise SystemExit(f"\ninterrupted: finished runs and the current run's last checkpoint are in "
                         f"{args.out_dir}/; run the same command with --resume to continue")
    finally:
        signal.signal(signal.SIGTERM, previous)

def interrupt(signum, frame):
    """SIGTERM's handler: raise what Ctrl-C raises, so that both stop the same way."""
    raise KeyboardInterrupt

def int_list(text, flag):
    """"1200,2400" -> [1200, 2400]; a value given twice would train (or report) the same run twice."""
    require(re.fullmatch(r"(-?[0-9]+(,-?[0-9]+)*)?", text.replace(" ", "")),
            f"{flag} takes comma-separated integers, got {text!r}")
    values = [int(x) for x in text.split(",") if x.strip()]
    require(len(set(values)) == len(values), f"{flag} repeats a value: {text!r}")
    return values

def require(ok, message):
    """Bad input stops here, before any compute, with one line that says what to change."""
    if not ok:
        raise SystemExit(f"error: {message}")

def check_flags(args, positive, rules):
    """The flags named in `positive` must be >= 1; each rule is (flag, whether it holds, what it must be)."""
    for name, ok, rule in [(k, getattr(args, k) >= 1, ">= 1") for k in positive] + rules:
        require(ok, f"--{name} must be {rule}, got {getattr(args, name)}")

# -----------------------------------------------------------------------------
# The comparison: plan and check every run, train each to its budget, write the results
#
# The question RINS asks is whether a recursive layout beats the plain model *at the same training
# compute*. So every variant of a comparison gets the same budget, what the baseline AB costs in
# --budget_steps steps, and spends it its own way: A3B's step runs 8 layer applications to AB's 4, so it
# takes about half the steps and sees half the tokens. Everything else (data, seed, batch, optimiser, the
# warm-up steps, the evaluation batches) stays the same, so that the layout is the only difference.

@dataclass
class TrainConfig:
    """A run's training settings, beside its GPTConfig. Saved with the run; --resume refuses a change."""
    dataset: str
    data_fingerprint: str  # of meta.json: a dataset prepared again from other text is another run
    seed: int
    budget_steps: int      # the budget in steps of the baseline AB at the flags' batch ...
    budget: int            # ... and in budget_unit, the same for every variant
    batch_size: int        # sequences per micro-batch per process
    grad_accum: int        # micro-batches per step: a step sees batch_size x grad_accum x world_size sequences
    world_size: int        # processes (torchrun): each takes its slice of one global batch
    learning_rate: float   # the peak of the schedule (rins.learning_rate)
    weight_decay: float    # AdamW's, on weight matrices only (rins.adamw)
    beta1: float
    beta2: float
    grad_clip: float       # the largest gradient norm; 0: no clipping
    warmup_frac: float     # of budget_steps: the rule that makes warmup_steps ...
    warmup_steps: int      # ... the same for every variant of a comparison
    cooldown_frac: float   # of the run's own budget
    eval_points: int       # evaluations (and checkpoints) per run, at even fractions of its budget
    eval_iters: int        # validation batches per evaluation
    log_interval: int      # steps between logged train losses
    budget_unit: str = "applications"  # a run.json without it was made before FLOPs became the unit

@dataclass
class Run:
    """One run of a comparison: a variant at one budget and one seed. Its folder is out_dir/name; run.json
    and ckpt.pt save it as asdict(run), and read_run makes the same Run again from what they saved."""
    name: str
    variant: str  # canonical: "A3B:p_skip=0.5:learning_rate=0.0025" (make_run)
    model: GPTConfig
    train: TrainConfig

# A Run is written as plain data (asdict: dicts, strings, numbers), so that run.json is readable by anyone and
# ckpt.pt loads with torch.load(weights_only=True), which refuses arbitrary Python objects
# the settings the oldest committed runs (results/lm, results/warmup) did not record: unknown, not guessed
UNRECORDED = dict(data_fingerprint=None, warmup_steps=None)

def read_run(saved):
    """The Run of a run.json or checkpoint: a field an older version did not write takes its default."""
    train = TrainConfig(**{**UNRECORDED, **saved["train"]})
    return Run(saved["name"], saved["variant"], GPTConfig(**saved["model"]), train)

class Record(dict):
    """A finished run's record: the dict run.json holds (results read as record["evals"], record["cost"]), and
    its settings read once into .run, the Run it was made from, so that the report reads record.run.variant,
    record.run.train.seed and never the nested dicts. A fresh run's, a reused run's and report's are all one."""
    def __init__(self, saved):
        super().__init__(saved)
        self.run = read_run(self["run"])

@dataclass
class Setup:
    """What every run of one invocation shares: the data, the device, and this process's place among the
    processes torchrun started (one process, rank 0 of 1, without it)."""
    train_data: np.ndarray  # token memmaps (data/prepare.py): read from disk as batches are drawn
    val_data: np.ndarray
    meta: dict              # the dataset's meta.json: vocabulary, fingerprint, entropy floor
    device: torch.device
    ddp: bool               # launched by torchrun: gradients are averaged over the processes every step
    rank: int               # 0 is the master: it alone evaluates, checkpoints and writes
    world: int
    compile: bool

def compare(args, grid):
    """The main job: train every variant x budget x seed (or reuse finished runs), then the table."""
    device = check_device(args.device)
    # the token files are memory-mapped: a dataset larger than memory is read batch by batch
    train_data, val_data, meta = load_prepared(args.data_dir, args.dataset)
    world = int(os.environ.get("WORLD_SIZE", 1))
    # every run is planned and checked before the first step: a mistake in the last one stops it all
    runs = plan_runs(args, grid, meta, len(train_data), len(val_data), world)
    # torchrun starts one process per device and tells each its rank; they meet in one process group, whose
    # all-reduce averages the gradients (NCCL between GPUs, gloo between CPU processes)
    ddp = "RANK" in os.environ  # launched by torchrun
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_float32_matmul_precision("high")  # on GPUs, TF32 for what autocast leaves in float32
    setup = Setup(train_data, val_data, meta, device, ddp, dist.get_rank() if ddp else 0, world, args.compile)
    # one run after the other, each to the end of its budget: a run's record is written when it is finished,
    # so a folder's run.json files are exactly its finished runs
    records = []
    for run in runs:
        path = os.path.join(args.out_dir, run.name, "run.json")
        saved = read_json(path)  # a finished run is reused: --resume continues a comparison where it stopped
        if saved is None:
            record = train(run, os.path.dirname(path), setup)
            if setup.rank == 0:
                write_atomic(path, json.dumps(record).encode())
        else:
            record = Record(saved)
        records.append(record)
    if setup.rank == 0:
        baseline = args.baseline or BASELINE
        print_summary(records, write_results(args.out_dir, records, None, baseline), baseline)
        print(f"{outcome(records, baseline)}\nresults: {args.out_dir}/results.csv, plot: "
              f"{args.out_dir}/loss_vs_cost.png\nwhat the repository's studies found: RESULTS.md")
    if ddp:
        dist.destroy_process_group()
    return records

def plan_runs(args, grid, meta, n_train, n_val, world_size):
    """One Run per budget x seed x variant, every flag, setting and file checked before any compute; then
    this process holds the lock of each run's folder."""
    # the flags every run shares; a variant's own settings are checked by make_run and GPTConfig
    check_flags(args, ("batch_size", "grad_accum", "eval_points", "eval_iters", "log_interval"), [
        ("budget_steps", min(grid.budget_steps, default=0) >= 1, ">= 1"),
        ("seeds", min(grid.seeds, default=-1) >= 0, ">= 0"), ("warmup_frac", 0 < args.warmup_frac < 1, "in (0, 1)"),
        ("cooldown_frac", 0 < args.cooldown_frac < 1, "in (0, 1)"), ("weight_decay", args.weight_decay >= 0, ">= 0"),
        ("grad_clip", args.grad_clip >= 0, ">= 0 (0: off)"), ("beta1", 0 <= args.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= args.beta2 < 1, "in [0, 1)")])
    runs = [make_run(args, spec, budget_steps, seed, meta, world_size)
            for budget_steps in grid.budget_steps for seed in grid.seeds for spec in grid.variants]
    # a run's folder is its name: "A3B" and "A3B:p_skip=0" are the same run, and would share one folder
    names = [run.name for run in runs]
    require(len(set(names)) == len(names), f"two variants make the same run: {names}")
    variants = sorted({run.variant for run in runs})
    require(args.baseline in variants + [None], f"--baseline {args.baseline} is none of the variants "
            f"({', '.join(variants)}): add it to --variants or name one of them")
    for run in runs:
        require(min(n_train, n_val) > run.model.block_size, f"{run.name}: block_size {run.model.block_size} "
                f"needs more tokens than the data has (train {n_train}, val {n_val})")
        check_earlier_run(run, os.path.join(args.out_dir, run.name), args.resume)
    lock_runs(runs, args.out_dir)
    return runs

def check_earlier_run(run, run_dir, resume):
    """A folder that holds the run already (finished: run.json, or interrupted: ckpt.pt) is continued only
    with --resume, and only if it was the same run: a resumed run must be the run it claims to be."""
    path = next((p for p in (f"{run_dir}/run.json", f"{run_dir}/ckpt.pt") if os.path.exists(p)), None)
    if path is None:
        return
    require(resume, f"{path} exists: pass --resume to continue it, or use another --out_dir")
    saved = read_run(read_json(path)["run"] if path.endswith(".json") else read_checkpoint(path)["run"])
    # every setting that changed, "name: old -> new", so the user sees which flag to give back
    diff = [f"{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
            for old, new in ((saved.model, run.model), (saved.train, run.train))
            for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]
    require(saved == run, f"{path} was written by a run with another configuration "
                          f"({'; '.join(diff)}): resume with its flags or use another --out_dir")

def lock_runs(runs, out_dir):
    """The master holds a lock on each run's folder: two processes training one run would write the same
    checkpoint in turns, each resuming from the other's. The OS releases a lock when its process ends,
    even by kill -9, so a lock is never left behind; several processes may share an out_dir if their
    runs differ."""
    while LOCKS:  # those of an earlier call in this process (tests, notebooks) are released first
        LOCKS.pop().close()
    try:
        for run in runs if os.environ.get("RANK", "0") == "0" else []:
            run_dir = os.path.join(out_dir, run.name)
            os.makedirs(run_dir, exist_ok=True)
            LOCKS.append(open(os.path.join(run_dir, "lock"), "w"))
            fcntl.flock(LOCKS[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            # with the lock held this process is the folder's only writer, so a temporary file in it is not a
            # write in progress: it is what a kill -9 in the middle of write_atomic left behind
            for tmp in glob.glob(os.path.join(glob.escape(run_dir), "*.tmp")):
                os.remove(tmp)
    except BlockingIOError:
        require(False, f"{LOCKS[-1].name} is held by another process: wait for it or use another --out_dir")
    except OSError as e:
        require(False, f"--out_dir {out_dir}: {e.strerror}: choose another folder")

def make_run(args, spec, budget_steps, seed, meta, world_size):
    """A variant's settings over the flags' values; a bad signature or setting stops here."""
    # "A3B:p_skip=0.5:learning_rate=0.0025": the overrides replace the flags' values for this run only. The
    # width and depth stay the flags', the same for every variant: RINS compares layouts of the same layers
    try:
        signature, overrides = rins.parse_variant(spec, VARIANT_KEYS)
        s = {**{k: getattr(args, k) for k in VARIANT_KEYS}, **overrides}
        model = GPTConfig(block_size=s["block_size"], vocab_size=vocab_size(meta), n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                          signature=signature, p_skip=s["p_skip"], adapters=s["adapters"],
                          adapter_rank=s["adapter_rank"], share_kv=s["share_kv"])
    except ValueError as e:
        raise SystemExit(f"error: variant {spec!r}: {e}")
    require(s["batch_size"] >= 1 and s["learning_rate"] > 0, f"variant {spec!r}: batch_size must be >= 1 and "
            f"learning_rate > 0, got {s['batch_size']} and {s['learning_rate']}")
    # the budget is the baseline's, whatever this variant overrides: that is what makes the comparison fair
    budget = baseline_budget(args, vocab_size(meta), budget_steps, world_size)
    train = TrainConfig(
        dataset=args.dataset, data_fingerprint=meta["fingerprint"], seed=seed, budget_steps=budget_steps,
        budget=budget, budget_unit=args.budget_unit, batch_size=s["batch_size"], grad_accum=args.grad_accum,
        world_size=world_size, learning_rate=s["learning_rate"], log_interval=args.log_interval,
        weight_decay=args.weight_decay, beta1=args.beta1, beta2=args.beta2, grad_clip=args.grad_clip,
        warmup_frac=args.warmup_frac, warmup_steps=0,  # set below, by the one budget rule (plan)
        cooldown_frac=args.cooldown_frac, eval_points=args.eval_points, eval_iters=args.eval_iters)
    # the variant's name shows its RINS settings that differ from the plain model's and the other settings
    # that differ from the flags', so a run's folder says what makes it different within a comparison
    plain = {k: getattr(GPTConfig, k) if k in rins.MODEL_KEYS else getattr(args, k) for k in VARIANT_KEYS}
    variant = rins.variant_name(signature, s, plain)
    name = f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', variant).strip('_')}_b{budget_steps}_s{seed}"
    # the one budget rule (plan) gives the steps and the warm-up; a run whose warm-up and cool-down overlap
    # would never reach its peak learning rate, so it is refused here rather than trained
    run = Run(name, variant, model, train)
    steps, _, train.warmup_steps = plan(run)
    require(train.warmup_steps / steps + train.cooldown_frac <= 1, f"{name}: {train.warmup_steps} warm-up "
            f"steps and a {train.cooldown_frac:.0%} cool-down do not fit its {steps} steps: lower them")
    return run

def vocab_size(meta):
    """GPT-2's 50257 padded to 50304 as nanoGPT does (a multiple of 64 keeps the LM head fast on GPUs);
    other vocabularies stay exact, so sampling never draws an id that has no text."""
    return -(-meta["vocab_size"] // 64) * 64 if meta["tokenizer"] == "gpt2" else meta["vocab_size"]

def baseline_budget(args, vocab, budget_steps, world_size):
    """The budget of every variant: what the baseline AB costs in budget_steps steps at the flags' model,
    batch and context. A variant that sets its own batch or context spends the same budget its own way."""
    baseline = GPTConfig(block_size=args.block_size, vocab_size=vocab, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd)
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world_size
    return round(budget_steps * step_cost(baseline, args.budget_unit, tokens_per_step))

def step_cost(config, unit, tokens_per_step):
    """The expected cost of one training step in `unit` (rins.cost_per_token), read off the model's shapes:
    it is built on the meta device, which allocates no memory and computes nothing."""
    with torch.device("meta"):
        model = GPT(config)
    return rins.cost_per_token(model, unit, config.block_size) * tokens_per_step

def plan(run):
    """(steps, target, warmup_steps) of a run, by the one budget rule of both scripts (rins.plan_budget).

    The budget counts FLOPs (or layer applications x tokens), not steps: that is what "the same training
    compute" means when a step of A3B costs about twice a step of AB. So a run's steps are its budget over
    the expected cost of one of its steps, and it stops at target, the budget rounded to whole steps."""
    cfg, t = run.model, run.train
    tokens_per_step = t.batch_size * cfg.block_size * t.grad_accum * t.world_size
    return rins.plan_budget(t.budget, step_cost(cfg, t.budget_unit, tokens_per_step), t.budget_steps, t.warmup_frac)

def read_checkpoint(path):
    """A checkpoint's content (run, model, optimizer, state, rng), loaded on the CPU with weights_only=True:
    torch.load would otherwise run whatever code a file it is given contains."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"run", "model"} <= set(ckpt)
        return ckpt
    except Exception as e:  # a folder, an empty, truncated or foreign file: each fails its own way
        raise SystemExit(f"error: {path} is not a train.py checkpoint ({type(e).__name__}): "
                         f"point to a run's ckpt.pt, or delete it to train that run again")

def check_device(name):
    """--device as a torch.device; a device that is not there stops now, not at the first tensor."""
    try:
        return rins.parse_device(name)
    except ValueError as e:
        raise SystemExit(f"error: --device: {e}")

# dense bf16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                   "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}  # V100, T4: no bf16 tensor cores

def peak_flops(device):
    """The device's dense bf16 peak, for MFU; None on CPU or for an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)

def get_batch(data, ix, block_size, device):
    """Inputs and next-token targets for the sequences starting at positions ix of a token memmap.

    The targets are the inputs shifted by one token: every position of every sequence is a prediction
    (nanoGPT). The memmap's uint16 tokens become int64, the type embeddings and cross-entropy take."""
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    if device.type == "cuda":  # pinned memory: the copy to the GPU overlaps with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y

# -----------------------------------------------------------------------------
# One run, from its first step to its record
#
# start builds the model and optimizer (or loads them from the run's checkpoint), the loop in train calls
# step until the executed cost reaches the run's target, evaluating and checkpointing at eval_points even
# marks of it, and finish scores the trained model at every depth. Under torchrun every process runs all of
# this on its slice of each batch; DDP averages the gradients, so the weights stay the same everywhere and
# the master alone evaluates, checkpoints and writes.

@dataclass
class Training:
    """One run in training: what its steps update and its checkpoints save, and its plan."""
    model: GPT
    train_model: torch.nn.Module  # what a step calls: the model, or under torchrun the model in DDP
    optimizer: torch.optim.Optimizer
    data_rng: torch.Generator     # the data position: the batch starts drawn so far
    progress: dict                # step, cost, tokens, flops, train_time, train_log, curve: the checkpoint's "state"
    steps: int                    # planned: the budget over the expected cost of a step
    target: float                 # the budget rounded to whole planned steps: the run stops when its cost reaches it

def train(run, run_dir, setup):
    """Train one run to its budget; returns its record (on the master process) or None."""
    t, master = run.train, setup.rank == 0
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    tr = start(run, setup, ckpt_path)
    if master:
        tqdm.write(f"{run.name}: schedule {rins.layer_schedule(run.model.signature, run.model.n_layer)}, "
                   f"{tr.steps} planned steps, {tr.steps * tokens_per_step(run) / tr.model.get_num_params():.1f} "
                   f"tokens per parameter")
    # evaluate (and checkpoint) when the cost crosses the next of eval_points even marks of the target: at the
    # same fractions of the budget in every variant, so their curves compare at equal compute; every rank
    # counts the same cost, so all ranks take part in the same all-reduces
    marks = lambda cost: cost * t.eval_points // tr.target
    # a nan/inf loss or gradient is remembered on the device and checked only when a loss is logged: reading
    # it every step would wait for the GPU every step
    finite = torch.ones((), dtype=torch.bool, device=setup.device)
    pbar = tqdm(total=tr.steps, initial=tr.progress["step"], desc=run.name, disable=not master, dynamic_ncols=True)
    clock = time.perf_counter()  # training time runs between evaluations
    try:
        while tr.progress["cost"] < tr.target:  # the executed cost, not the step count, ends the run
            cost_before = tr.progress["cost"]
            loss, lr, step_finite = step(run, setup, tr)
            finite &= step_finite
            pbar.update()
            eval_now = marks(cost_before) < marks(tr.progress["cost"])
            if eval_now or tr.progress["step"] % t.log_interval == 0:
                train_loss = log_step(tr.progress, loss, finite, lr, setup.ddp, ckpt_path)
                pbar.set_postfix(loss=f"{train_loss:.4f}")
            # the master alone evaluates and saves: DDP keeps every rank's weights the same as its own
            if eval_now and master:
                if setup.device.type == "cuda":
                    torch.cuda.synchronize(setup.device)  # the GPU's queued steps belong to training time
                tr.progress["train_time"] += time.perf_counter() - clock
                evaluate_and_save(run, setup, tr, train_loss, ckpt_path)
                clock = time.perf_counter()
    finally:
        pbar.close()  # before any error message, so that the bar is not redrawn after it
    return finish(run, tr, setup) if master else None

def start(run, setup, ckpt_path):
    """The run's model, optimizer and data position: new, or as its checkpoint left them (--resume)."""
    cfg, t = run.model, run.train
    # the same seed on every rank: identical initial weights, and identical stochastic-skip draws
    # (model.transformer.skip_rng), so all ranks run the same units and no rank waits for another
    torch.manual_seed(t.seed)
    model = GPT(cfg).to(setup.device)
    # the same optimiser for every layout: AdamW with weight decay on matrices only (rins.adamw); its LR is set
    # at every step by the schedule (step)
    optimizer = rins.adamw(model, t.weight_decay, t.learning_rate, (t.beta1, t.beta2), setup.device.type)
    # the batch starts come from a generator of their own, not from torch's global one: dropout and the
    # initialisation draw from that, and the data must not shift when they do (with --compile, say); as
    # its state is checkpointed, a resumed run reads exactly the batches it would have read
    data_rng = torch.Generator().manual_seed(t.seed)
    steps, target, _ = plan(run)
    # the plan is computed again from the run, not stored: the same Run always gives the same plan
    tr = Training(model, model, optimizer, data_rng, dict(step=0, cost=0, tokens=0, flops=0, train_time=0.0,
                                                        train_log=[], curve=[]), steps, target)
    if os.path.exists(ckpt_path):  # plan_runs has checked that --resume is set and the run is the same
        load_checkpoint(ckpt_path, tr)
    if setup.compile:
        for block in model.transformer.h:  # the blocks, not the walk: stochastic skips do not recompile
            block.compile()
    if setup.ddp:  # a skipped unit (p_skip) leaves its layers or adapter without gradient on that step
        tr.train_model = DDP(model, device_ids=[setup.device.index] if setup.device.type == "cuda" else None,
                             find_unused_parameters=cfg.p_skip > 0)
    model.train()
    return tr

def tokens_per_step(run):
    """Tokens of one optimisation step, over all micro-batches and processes."""
    return run.train.batch_size * run.model.block_size * run.train.grad_accum * run.train.world_size

def step(run, setup, tr):
    """One optimisation step: draw the global batch, forward and backward each micro-batch, clip, update,
    and count the cost that executed. Returns (mean loss, LR, whether the loss and gradient were finite),
    the loss and the flag as tensors on the device, so that nothing waits for the GPU here."""
    t, B, T, accum = run.train, run.train.batch_size, run.model.block_size, run.train.grad_accum
    # one draw of B x accum x world batch starts per step; micro-batch a of rank r takes its slice, so the
    # global batch does not depend on how it is split over processes and micro-batches (DDP == one process)
    ix = torch.randint(len(setup.train_data) - T, (accum * setup.world * B,), generator=tr.data_rng)
    cost, flops, loss_sum = 0, 0, 0.0
    for a in range(accum):
        first = (a * setup.world + setup.rank) * B
        x, y = get_batch(setup.train_data, ix[first:first + B], T, setup.device)
        if setup.ddp:
            tr.train_model.require_backward_grad_sync = a == accum - 1  # all-reduce once per step
        with rins.autocast(setup.device):
            _, loss = tr.train_model(x, y)
        # the budget is spent on what executed, not on the plan: a stochastic forward (p_skip) skips
        # rounds, so its cost is only known now. The forward leaves its counts on the Transformer
        # (rins.Transformer.forward), as GPT.forward returns only (logits, loss); every rank draws the
        # same skips, so every rank counts the same cost
        counts = (tr.model.transformer.applications, tr.model.transformer.adapters_run,
                  tr.model.transformer.kv_reuses)
        cost += rins.cost_per_token(tr.model, t.budget_unit, T, counts) * B * T * setup.world
        flops += tr.model.flops_per_token(T, counts) * B * T * setup.world  # for MFU, in either unit
        # gradients add up over micro-batches: each loss divided by accum makes the sum the mean over the step
        (loss / accum).backward()
        loss_sum += loss.detach()
    # the LR of the schedule laid over the run's own budget, taken at the middle of this step: the cost of
    # a stochastic step is only known after its forwards, and the middle is fair to a step of any length.
    # The warm-up is the same number of steps in every variant (rins.plan_budget): as a fraction of the
    # run's own steps it is longer for a run that takes fewer, more expensive steps
    lr = rins.learning_rate(t.learning_rate, (tr.progress["cost"] + cost / 2) / tr.target,
                            t.warmup_steps / tr.steps, t.cooldown_frac)
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    # clip the norm of all gradients together (nanoGPT); with grad_clip 0 the norm is still measured, as the
    # nan/inf check reads it
    norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), t.grad_clip or math.inf)
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    p = tr.progress
    p.update(step=p["step"] + 1, cost=p["cost"] + cost, tokens=p["tokens"] + tokens_per_step(run),
             flops=p["flops"] + flops)
    return loss_sum / accum, lr, torch.isfinite(norm) & torch.isfinite(loss_sum)

def log_step(progress, loss, finite, lr, ddp, ckpt_path):
    """Record the train loss (averaged over ranks); stop cleanly if any loss or gradient was not finite.

    Reading a value from the GPU waits for every step queued before it, so this runs only every
    log_interval steps; every rank calls it at the same steps, as its all-reduce needs all of them."""
    stats = torch.stack([loss.float(), (~finite).float()])
    if ddp:
        dist.all_reduce(stats)
        stats[0] /= dist.get_world_size()
    loss, bad = stats.tolist()
    if bad:
        stop_not_finite(progress["step"], ckpt_path)
    progress["train_log"].append(dict(step=progress["step"], loss=loss, lr=lr, cost=progress["cost"]))
    return loss

def evaluate_and_save(run, setup, tr, train_loss, ckpt_path):
    """A point of the loss curve (validation loss at the cost so far), then a checkpoint; the master only."""
    val_loss, _ = evaluate(tr.model, setup.val_data, run.model.block_size, run.train.batch_size,
                           run.train.eval_iters, rins.autocast(setup.device))
    if not math.isfinite(val_loss):  # the last update broke the weights: do not save them
        stop_not_finite(tr.progress["step"], ckpt_path)
    p = tr.progress
    p["curve"].append(dict(step=p["step"], tokens=p["tokens"], cost=p["cost"], val_loss=val_loss))
    tqdm.write(f"{run.name} step {p['step']}: cost {p['cost']:.3e}, train {train_loss:.4f}, val {val_loss:.4f}")
    save_checkpoint(ckpt_path, run, tr)

def stop_not_finite(step, ckpt_path):
    """Stop before a broken model is saved: the checkpoint on disk is the last one with finite weights."""
    saved = f"the last good checkpoint {ckpt_path} is intact" if os.path.exists(ckpt_path) else "none saved"
    raise SystemExit(f"error: the loss became nan/inf by step {step}; {saved}; try a lower --learning_rate")

@torch.no_grad()
def evaluate(model, data, block_size, batch_size, eval_iters, ctx, rounds=None):
    """(mean val loss, layer applications per forward) over fixed batches: the same text at every
    evaluation of every run with this batch shape, so curves and variants compare like for like."""
    # eval mode: no dropout, and every round runs (no stochastic skips), so a loss measures the model itself
    model.eval()
    rng, device, losses = torch.Generator().manual_seed(EVAL_SEED), next(model.parameters()).device, []
    for _ in range(eval_iters):
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=rng)
        with ctx:
            losses.append(model(*get_batch(data, ix, block_size, device), rounds=rounds)[1])
    model.train()
    # the applications of the last forward, which the Transformer leaves on itself (rins.Transformer.forward);
    # in eval mode every forward at these rounds runs the same units
    return torch.stack(losses).mean().item(), model.transformer.applications

def save_checkpoint(path, run, tr):
    """Everything a resumed run needs to continue exactly: weights, optimizer, progress, RNG states.

    Written at every evaluation, so a stop loses at most a 1/eval_points of the run; the optimizer's state
    (Adam's moment estimates) is saved too, as a resumed run restarted without it would train differently."""
    # every source of randomness, so that a resumed run draws what the uninterrupted one would have drawn:
    # torch's global generator (dropout), the batch starts (data_rng) and the stochastic skips (skip_rng)
    rng = dict(torch=torch.get_rng_state(), data=tr.data_rng.get_state(),
               skip=tr.model.transformer.skip_rng.get_state())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    ckpt = {"run": asdict(run), "model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
            "state": tr.progress, "rng": rng}
    write_atomic(path, lambda tmp: write_checkpoint(tmp, ckpt, path))  # a kill while writing: the last one is whole

def write_checkpoint(tmp, ckpt, path):
    """torch.save to a file object: given a path, torch writes with its own writer and reports a full disk as
    an internal error ("enforce fail at inline_container.cc"); through Python's file, as OSError ENOSPC."""
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise SystemExit(f"error: could not write {path} (the disk is full: {e.strerror}): the previous checkpoint, "
                         f"if any, is intact; free some space and run the same command with --resume")

def load_checkpoint(path, tr):
    """The run as save_checkpoint left it, into the freshly built tr: weights, optimizer, progress and every
    generator's state. On the CPU the resumed run is then bit for bit the uninterrupted one (test_rins.py)."""
    ckpt = read_checkpoint(path)
    tr.model.load_state_dict(ckpt["model"])
    tr.optimizer.load_state_dict(ckpt["optimizer"])
    tr.progress = ckpt["state"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    tr.data_rng.set_state(ckpt["rng"]["data"])
    tr.model.transformer.skip_rng.set_state(ckpt["rng"]["skip"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])

def finish(run, tr, setup):
    """Evaluate the trained run at every rounds from 1 (the baseline's cost, "1x") through r (as trained)
    to r + 1 (extrapolation), or as trained (rounds None) without a recursive block; return its record.
    Every depth, because a stochastic model trains on all of them (p_skip 0.8 runs A3B as A2B in 32%
    of its steps) and the shape of loss against rounds is what "more rounds at inference" is about."""
    r = run.model.recursive[1] if run.model.recursive else None
    evals = []
    for rounds in range(1, r + 2) if r else [None]:  # 1 .. r + 1
        loss, apps = evaluate(tr.model, setup.val_data, run.model.block_size, run.train.batch_size,
                              run.train.eval_iters, rins.autocast(setup.device), rounds)
        evals.append(dict(rounds=rounds, eval_applications=apps, val_loss=loss))
    # the record: what ran (steps, tokens, executed cost and FLOPs) beside what was planned; tokens per
    # parameter, the x axis of data scaling; the time spent training (evaluations left out) and the model
    # FLOPs utilisation on a GPU with a known peak; the dataset's entropy floor where it has one (grammar)
    p, peak, n_params = tr.progress, peak_flops(setup.device), tr.model.get_num_params()
    return Record(dict(run=asdict(run), trained_rounds=r, steps=p["step"], planned_steps=tr.steps,
                tokens=p["tokens"], epochs=p["tokens"] / len(setup.train_data),
                tokens_per_param=p["tokens"] / n_params, cost=p["cost"], target=tr.target, flops=p["flops"],
                wall_s=p["train_time"], tokens_per_s=p["tokens"] / p["train_time"],
                mfu=p["flops"] / p["train_time"] / (peak * setup.world) if peak else None, n_params=n_params,
                n_adapter_params=tr.model.num_adapter_params(), floor=setup.meta.get("entropy_per_token"),
                evals=evals, curve=p["curve"], train_log=p["train_log"]))

# -----------------------------------------------------------------------------
# Results: effective compute, the scaling law across budgets, the table, files and the plot
#
# When recursion pays: the effective-compute ratio (how much more compute the baseline needs to reach a
# variant's loss) and the paper's data scaling law fitted across budgets.

def fit_scaling_law(x, y):
    """Least-squares fit of loss = beta * x^(-c) + eps_inf (the paper's data scaling law) with numpy only.

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

def law_across_budgets(budgets, n_boot=200):
    """The law fitted across budgets: budgets holds, per budget, the (cost, final loss) of its runs
    (its seeds), each the end of a full LR schedule. Uncertainty: the std over a bootstrap that
    resamples each budget's runs with replacement, so it sees the spread over seeds and only it."""
    rng = np.random.default_rng(0)
    law = lambda points: fit_scaling_law(*zip(*points))
    fit = law([p for runs in budgets for p in runs])
    boot = [law([runs[i] for runs in budgets for i in rng.integers(len(runs), size=len(runs))]) for _ in range(n_boot)]
    return dict(beta=fit["beta"], c=fit["c"], eps_inf=fit["eps_inf"], c_std=float(np.std([b["c"] for b in boot])),
                eps_inf_std=float(np.std([b["eps_inf"] for b in boot])))

def effective_compute(loss, cost, baseline):
    """The effective-compute ratio: the training compute at which the baseline reaches `loss`, over `cost`.

    baseline: (budget, final loss) of the baseline's runs, several seeds at several budgets, each run
    the end of a full schedule; the losses of one budget are averaged (over seeds). The compute is interpolated
    linearly in log compute between the two budgets whose losses bracket `loss`, on the baseline's
    running best (the first budget that reaches it). Above 1: the variant beats the baseline at equal
    compute. Outside the baseline's range the ratio is only a bound: returns (the ratio at the nearest
    end, ">" or "<"), else (ratio, "").
    """
    by_cost = {}
    for c, l in baseline:
        by_cost.setdefault(c, []).append(l)
    costs = sorted(by_cost)
    best = np.minimum.accumulate([np.mean(by_cost[c]) for c in costs])
    if loss <= best[-1]:
        return costs[-1] / cost, ">" if loss < best[-1] else ""
    if loss >= best[0]:
        return costs[0] / cost, "<" if loss > best[0] else ""
    i = int(np.argmax(best <= loss))  # the first budget at or below the loss; best[i - 1] is above it
    w = (best[i - 1] - loss) / (best[i - 1] - best[i])
    return math.exp((1 - w) * math.log(costs[i - 1]) + w * math.log(costs[i])) / cost, ""


def trained_loss(record):
    return next(e["val_loss"] for e in record["evals"] if e["rounds"] == record["trained_rounds"])

def executed_flops(record):
    """The training FLOPs a run executed. Recorded since FLOPs became the unit; for an older run (budget
    in layer applications x tokens) recovered exactly from its applications (its cost) and tokens: the
    counts are linear in how often each unit ran, and only middle units, all of one length in every
    layout we ran with p_skip, may be skipped."""
    if "flops" in record:
        return record["flops"]
    config, tokens = record.run.model, record["tokens"]
    with torch.device("meta"):
        model = GPT(config)
    counts, units = rins.expected_counts(config), config.units  # exact without p_skip
    if config.p_skip > 0 and len(units) > 2:
        require(len({len(u) for u in units[1:-1]}) == 1 and not config.share_kv,
                f"{record.run.name}: its FLOPs cannot be recovered from its applications")
        middle_run = (record["cost"] / tokens - len(units[0]) - len(units[-1])) / len(units[1])
        counts = (record["cost"] / tokens, (1 + middle_run) * config.adapters, 0)
    return tokens * model.flops_per_token(config.block_size, counts)

def result_rows(records, baseline):
    """One row per run x eval depth (results.csv), with the effective-compute ratio against the
    baseline variant's final losses (mean over seeds) where it was run at two budgets or more: in the
    runs' budget unit, and in executed FLOPs (the two differ for runs budgeted in applications)."""
    base = [r for r in records if r.run.variant == baseline]
    two_budgets = len({r["target"] for r in base}) >= 2
    curve = [(r["target"], trained_loss(r)) for r in base] if two_budgets else None
    flops_curve = [(executed_flops(r), trained_loss(r)) for r in base] if two_budgets else None
    rows = []
    for r in records:
        t = r.run.train
        flops = executed_flops(r)
        for e in r["evals"]:
            ratio, bound = effective_compute(e["val_loss"], r["cost"], curve) if curve else (None, "")
            flops_ratio, flops_bound = (effective_compute(e["val_loss"], flops, flops_curve) if curve
                                        else (None, ""))
            rows.append(dict(
                run=r.run.name, variant=r.run.variant, learning_rate=t.learning_rate,
                seed=t.seed, budget_steps=t.budget_steps, rounds=e["rounds"],
                trained=e["rounds"] == r["trained_rounds"], eval_applications=e["eval_applications"],
                steps=r["steps"], tokens=r["tokens"], epochs=r["epochs"],
                tokens_per_param=r["tokens_per_param"], cost=r["cost"], val_loss=e["val_loss"],
                above_floor=None if r["floor"] is None else e["val_loss"] - r["floor"],
                effective_compute=ratio, effective_compute_bound=bound, flops=flops,
                effective_compute_flops=flops_ratio, effective_compute_flops_bound=flops_bound,
                budget_unit=t.budget_unit, wall_s=r["wall_s"], mfu=r["mfu"],
                n_params=r["n_params"]))
    return rows

def budget_fits(records, n_boot=200):
    """The law fitted across budgets for each variant run at three or more (rins.law_across_budgets)."""
    by_variant = {}
    for r in records:
        by_budget = by_variant.setdefault(r.run.variant, {})
        by_budget.setdefault(r.run.train.budget_steps, []).append((r["cost"], trained_loss(r)))
    return [dict(variant=v, budgets=sorted(b), **law_across_budgets(list(b.values()), n_boot))
            for v, b in by_variant.items() if len(b) >= 3]

NO_RATIO = "no effective-compute ratio: it needs the baseline {} at two budgets or more, and these runs have fewer"

def print_summary(records, fits, baseline):
    """The table of every variant, budget and depth over seeds (mean ± std with several seeds; an
    effective-compute ratio beyond the baseline's budgets is a bound, marked > or <), then the laws."""
    rows, cells = result_rows(records, baseline), {}
    for row in rows:
        cells.setdefault((row["variant"], row["budget_steps"]), {}).setdefault(row["rounds"], []).append(row)
    # a run scored at fewer depths (older runs: rounds 1, r, r + 1) joins the seeds of the depths it has
    groups = {(*cell, rounds): by_rounds[rounds] for cell, by_rounds in cells.items()
              for rounds in sorted(by_rounds, key=lambda rounds: rounds or 0)}
    floor, ratio = records[0]["floor"] is not None, rows[0]["effective_compute"] is not None
    in_flops = ratio and any(row["budget_unit"] != "flops" for row in rows)  # older runs: both units
    lines = [["variant", "lr", "budget", "rounds", "apps", "seeds", "steps", "epochs", "tok/param", "val_loss",
              *["above floor"] * floor, *["eff. compute"] * ratio, *["in FLOPs"] * in_flops, "wall_s", "MFU"]]
    for (variant, budget, rounds), g in groups.items():
        mean = lambda key, spec: mean_std(g, key, spec, std=False)
        bounded = lambda key: "".join(sorted({row[key + "_bound"] for row in g})) + mean_std(g, key, ".2f")
        lines.append([variant, f"{g[0]['learning_rate']:g}", str(budget), str(rounds or "-"),
                      str(g[0]["eval_applications"]), str(len(g)), mean("steps", ".0f"),
                      mean("epochs", ".3f"), mean("tokens_per_param", ".1f"), mean_std(g, "val_loss", ".4f"),
                      *[mean_std(g, "above_floor", ".4f")] * floor, *[bounded("effective_compute")] * ratio,
                      *[bounded("effective_compute_flops")] * in_flops, mean("wall_s", ".0f"), mean("mfu", ".1%")])
    print(text_table(lines))
    if not ratio:
        print(NO_RATIO.format(baseline) + " (e.g. --budget_steps 600,1200)")
    for f in fits:
        print(f"law across budgets {','.join(map(str, f['budgets']))}, loss = beta * cost^(-c) + eps_inf "
              f"(± bootstrap std over seeds): {f['variant']}: c {f['c']:.3f} ± {f['c_std']:.3f}, "
              f"eps_inf {f['eps_inf']:.3f} ± {f['eps_inf_std']:.3f}")
    print_per_token_gains(per_token_gains(records, baseline), baseline)

# a step at 1.8-2.2x the baseline's cost per token (A3B, ABAB): at budget B it sees about the baseline's tokens at B/2
TWICE_THE_COST = (1.8, 2.2)

def per_token_gains(records, baseline):
    """What the extra rounds buy per token: the baseline's final loss (as trained) at B/2 minus a variant's at B,
    same seed, in nats, for each variant whose cost per token (cost / tokens, in the folder's unit) is about twice
    the baseline's, so that the two saw about the same tokens. Positive: the rounds bought more than the tokens
    they cost. One row per variant and budget with a pair: variant, budget_steps, the baseline's tokens per
    parameter and epochs at B, gains {seed: nats}; a seed or budget whose baseline did not run at exactly B/2
    is left out."""
    base = [r for r in records if r.run.variant == baseline]
    if not base:
        return []
    key = lambda r: (r.run.variant, r.run.train.budget_steps, r.run.train.seed)
    per_token = lambda runs: statistics.fmean(r["cost"] / r["tokens"] for r in runs)
    base_loss, ref, rows = {key(r)[1:]: trained_loss(r) for r in base}, base[0], {}
    # "about twice", not exactly: in FLOPs the LM head is paid once per token, so A3B costs 1.97x AB at 4 x 48
    # and 1.71x at 4 x 16; a window around 2 keeps the comparison to layouts that see about the same tokens
    variants = {r.run.variant for r in records}
    cost = {v: per_token([r for r in records if r.run.variant == v]) / per_token(base) for v in variants}
    for r in records:
        variant, budget, seed = key(r)
        if (variant == baseline or not TWICE_THE_COST[0] <= cost[variant] <= TWICE_THE_COST[1] or budget % 2
                or (budget // 2, seed) not in base_loss):
            continue
        row = rows.setdefault((variant, budget), dict(
            variant=variant, budget_steps=budget, gains={},
            tokens_per_param=budget * ref["tokens"] / ref["steps"] / ref["n_params"],
            epochs=budget * ref["epochs"] / ref["steps"]))
        row["gains"][seed] = base_loss[(budget // 2, seed)] - trained_loss(r)
    return list(rows.values())

def print_per_token_gains(rows, baseline):
    """The table of per_token_gains, one column per seed; nothing where no variant has a pair."""
    if not rows:
        return
    seeds = sorted({seed for row in rows for seed in row["gains"]})
    lines = [["variant", "budget", f"{baseline} tok/param", f"{baseline} epochs", *[f"seed {s}" for s in seeds],
              "mean"]]
    for row in rows:
        gains = row["gains"]
        lines.append([row["variant"], str(row["budget_steps"]), f"{row['tokens_per_param']:.1f}",
                      f"{row['epochs']:.3f}", *[f"{gains[s]:+.4f}" if s in gains else "-" for s in seeds],
                      f"{statistics.fmean(gains.values()):+.4f}"])
    print(f"\nper-token gain of recursion: {baseline}'s final val loss at budget B/2 minus the variant's at B, same "
          f"seed, in nats (about the same tokens; > 0: the extra rounds bought more than their tokens cost); "
          f"variants at 1.8-2.2x {baseline}'s cost per token; tok/param and epochs: {baseline}'s at B")
    print(text_table(lines))

def mean_std(group, key, spec, std=True):
    """'mean ± std' of a column over seeds ('-' where a run has no value)."""
    values = [r[key] for r in group]
    if any(v is None for v in values):
        return "-"
    spread = f" ± {format(statistics.stdev(values), spec)}" if std and len(values) > 1 else ""
    return format(statistics.fmean(values), spec) + spread

def text_table(lines):
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)

def outcome(records, baseline):
    """What this comparison found, in two lines: who won at equal compute at its largest budget and by how much."""
    rows = [row for row in result_rows(records, baseline) if row["trained"]]
    if baseline not in {row["variant"] for row in rows}:
        return f"no {baseline} runs here: add it to --variants to compare at equal compute"
    top = max(row["budget_steps"] for row in rows if row["variant"] == baseline)
    cells = {}
    for row in rows:
        if row["budget_steps"] == top:
            cells.setdefault(row["variant"], []).append(row)
    others = [v for v in cells if v != baseline]
    if not others:
        return f"only {baseline} ran at {top} {baseline} steps: nothing to compare"
    where = f"at {top} {baseline} steps ({ab_tokens_per_param(rows, baseline, top):.0f} tokens per parameter)"
    if cells[baseline][0]["effective_compute"] is None:  # one budget: the losses at equal compute
        loss = {v: statistics.fmean(row["val_loss"] for row in g) for v, g in cells.items()}
        best = min(loss, key=loss.get)
        gaps = ", ".join(f"{v} {loss[v] - loss[baseline]:+.4f}" for v in others)
        runner_up = min((v for v in loss if v != best), key=loss.get)
        return (f"{where}, final val loss minus {baseline}'s at equal compute: {gaps} nats; {best} won by "
                f"{loss[runner_up] - loss[best]:.4f} nats over {runner_up}")
    ratio = {v: statistics.fmean(row["effective_compute_flops"] for row in cells[v]) for v in others}
    best = max(ratio, key=ratio.get)
    winner = (f"{best} won: {baseline} needs {ratio[best]:.2f}x its compute to match it" if ratio[best] > 1 else
              f"{baseline} won: it reaches the loss of the best other, {best}, with {ratio[best]:.2f}x its compute")
    listed = ", ".join(f"{v} {ratio[v]:.2f}" for v in others)
    return f"{where}, effective-compute ratio in FLOPs against {baseline} (> 1: ahead): {listed}\n{winner}"

def ab_tokens_per_param(rows, baseline, budget_steps):
    """The budget in the baseline's training tokens per parameter (the x of every ratio plot)."""
    row = next(row for row in rows if row["variant"] == baseline)
    return budget_steps * row["tokens"] / row["steps"] / row["n_params"]

def write_results(out_dir, records, plot_path, baseline):
    """results.csv (one row per run x depth), budget_fits.json (where a law was fitted) and the plot; returns
    the fits."""
    rows, fits, table = result_rows(records, baseline), budget_fits(records), io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(os.path.join(out_dir, "results.csv"), table.getvalue().encode())
    fits_path = os.path.join(out_dir, "budget_fits.json")
    if fits:
        write_atomic(fits_path, json.dumps(fits, indent=1).encode())
    elif os.path.exists(fits_path):  # an earlier, larger set of runs had one: it no longer describes these
        os.remove(fits_path)
    plot_report(records, rows, baseline, plot_path or os.path.join(out_dir, "loss_vs_cost.png"))
    return fits

def report(args, grid):
    """The results files, table and plot again from the finished runs of a folder, without training;
    --variants, --budget_steps and --seeds select runs (select_runs; plot: DIR/report.png).
    Several folders: the headline figure, one panel of effective-compute ratios per study (or their grid)."""
    if len(args.report) > 1:
        return report_folders(args)
    folder = args.report[0]
    records = select_runs(read_runs(folder), grid, args.baseline, folder)
    baseline = args.baseline or BASELINE
    subset = grid.variants or grid.budget_steps or grid.seeds
    plot = args.plot or os.path.join(folder, "report.png" if subset else "loss_vs_cost.png")
    if subset:
        fits = budget_fits(records)
        plot_report(records, result_rows(records, baseline), baseline, plot)
    else:
        fits = write_results(folder, records, plot, baseline)
    print_summary(records, fits, baseline)
    print(f"plot: {plot}")
    return records

def select_runs(records, grid, named, folder):
    """The runs --variants, --budget_steps and --seeds select, in the order of --variants. The baseline stays
    at every budget (of the selected seeds): the effective-compute ratios read its whole curve. A baseline
    named by --baseline must have runs here; the default may be missing (a learning-rate grid has none)."""
    variant, budget, seed = (lambda r: r.run.variant, lambda r: r.run.train.budget_steps,
                             lambda r: r.run.train.seed)
    names = sorted(set(map(variant, records)))
    variants = grid.variants or names
    budgets, seeds = grid.budget_steps or set(map(budget, records)), grid.seeds or set(map(seed, records))
    found = {*names, *(f"budget {budget(r)}" for r in records), *(f"seed {seed(r)}" for r in records)}
    asked = variants + [f"budget {b}" for b in grid.budget_steps] + [f"seed {s}" for s in grid.seeds]
    missing = [v for v in asked if v not in found]
    require(not missing, f"no finished runs of {', '.join(missing)} in {folder}")
    require(named in names + [None], f"--baseline {named}: {folder} has no runs of it (its variants: "
            f"{', '.join(names)})")
    check_settings(records, folder)  # the whole folder: what is missing is said first, then what conflicts
    baseline = named or BASELINE
    records = [r for r in records if seed(r) in seeds
               and (variant(r) == baseline or (variant(r) in variants and budget(r) in budgets))]
    keep = variants if baseline in variants else variants + [baseline]
    return sorted(records, key=lambda r: (keep.index(variant(r)), budget(r), seed(r)))

# what report reads of a run.json besides its Run (flops: only since FLOPs became the unit)
RECORD_KEYS = {"run", "trained_rounds", "steps", "tokens", "epochs", "tokens_per_param", "cost", "target", "wall_s",
               "mfu", "n_params", "floor", "evals"}

def read_runs(folder):
    """The records of a folder's finished runs; a run.json some other program wrote stops here, named."""
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "run.json"))):
        record = read_json(path)
        try:
            record = Record(record)
            ok = RECORD_KEYS <= set(record)
        except (TypeError, KeyError, ValueError):  # not a dict, a key missing, a setting GPTConfig refuses
            ok = False
        require(ok, f"{path} is not a train.py run record: delete it, or report another folder")
        records.append(record)
    require(records, f"no finished runs (<run>/run.json) in {folder}")
    return records

def check_settings(records, folder):
    """A variant's runs are averaged over seeds and read across budgets: they may differ in nothing else. Read
    as Runs, so that a setting an older run did not record counts as its default. And one budget unit per folder:
    a ratio reads a variant's cost on the baseline's curve, and costs in two units are not comparable."""
    runs = [r.run for r in records]
    units = sorted({run.train.budget_unit for run in runs})
    require(len(units) == 1, f"{folder} mixes budgets in {' and '.join(units)}, whose costs do not compare: "
            f"report them apart (one folder per --budget_unit)")
    settings = {}
    for run in runs:
        s = [asdict(run.model), asdict(replace(run.train, seed=0, budget_steps=0, budget=0, warmup_steps=0))]
        require(settings.setdefault(run.variant, s) == s,
                f"{folder} holds runs of {run.variant} with other settings: report them apart")

def report_folders(args):
    """Several folders: their runs at one budget varying a setting are one grid (e.g. the warm-up folders);
    else each folder is a study, and the figure is the headline: one panel of effective-compute ratios each."""
    require(args.plot, "--report with several folders needs --plot (where the figure goes)")
    require(not (args.variants or args.budget_steps or args.seeds), "--variants, --budget_steps and --seeds select "
            "runs of one folder: --report with several folders draws every run")
    studies = {folder: read_runs(folder) for folder in args.report}
    for folder, runs in studies.items():
        check_settings(runs, folder)
    records = [r for runs in studies.values() for r in runs]
    if grid_key(records):
        plot_grid(records, grid_key(records), args.plot)
    else:
        baseline = args.baseline or BASELINE
        for folder, runs in studies.items():
            require(any(r.run.variant == baseline for r in runs), f"--baseline {baseline}: {folder} has no "
                    f"runs of it: the headline compares each study with its baseline")
        plot_headline(studies, baseline, args.plot)
        for folder, runs in studies.items():
            print(f"{folder}:\n{outcome(runs, baseline)}")
    print(f"plot: {args.plot}")
    return records

# -----------------------------------------------------------------------------
# Figures: each answers one question. A layout (signature and stochastic rounds) has one colour and marker,
# the same in every figure; the variants of one layout (other adapters, rate, batch) differ in line style and
# in the marker's fill: a variant drawn as a lone point (one budget) shows no line, only its marker.

LAYOUT_STYLES = {"AB": ("black", "o"), "A2B": ("tab:blue", "s"), "A3B": ("tab:red", "^"), "A4B": ("tab:olive", ">"),
                 "ABAB": ("tab:green", "D"), "(A3B)2": ("tab:brown", "X"), "AB3": ("tab:pink", "<"),
                 "A3B p_skip 0.5": ("tab:orange", "v"), "A3B p_skip 0.8": ("tab:purple", "P")}
OTHER_STYLE = ("tab:gray", "*")
LINE_STYLES = ("-", "--", ":", "-.")
FILL_STYLES = ("full", "top", "bottom", "left")  # not "none": an open marker is a bound (plot_ratio)
GRID_KEYS = {"learning_rate": "learning rate", "warmup_frac": "warm-up (fraction of the AB budget)"}

def layout(record):
    model = record.run.model
    return model.signature + (f" p_skip {model.p_skip:g}" if model.p_skip else "")

def styles(records):
    """variant -> its layout's colour and marker, and a line style and marker fill of its own within the layout:
    solid and filled for the variant with the most runs."""
    runs, seen, out = {}, {}, {}
    for r in records:
        runs.setdefault(r.run.variant, []).append(r)
    for variant, group in sorted(runs.items(), key=lambda item: -len(item[1])):
        colour, marker = LAYOUT_STYLES.get(layout(group[0]), OTHER_STYLE)
        n = seen[layout(group[0])] = seen.get(layout(group[0]), -1) + 1
        out[variant] = dict(color=colour, marker=marker, linestyle=LINE_STYLES[n % len(LINE_STYLES)],
                            fillstyle=FILL_STYLES[n % len(FILL_STYLES)])
    return out

def short(variant):
    """A variant's name in a legend: the learning rate written short, so that the legend stays one column."""
    return variant.replace("learning_rate=", "lr=")

def legend_below(ax, **kw):
    """The legend under the panel, not on it: a legend drawn over the lines hides the points it names."""
    if ax.get_legend_handles_labels()[0]:
        n = len(ax.get_legend_handles_labels()[0])
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2 if n <= 8 else 3, fontsize=7, **kw)

def cells(records):
    """variant -> budget_steps (ascending) -> its runs (over seeds), the variants in the order of the records."""
    out = {}
    for r in records:
        out.setdefault(r.run.variant, {}).setdefault(r.run.train.budget_steps, []).append(r)
    return {variant: dict(sorted(by_budget.items())) for variant, by_budget in out.items()}

def seeds(groups):
    """'seeds: 2' or 'seeds: 2-3': how many runs each point of a line averages, said in the legend."""
    n = sorted({len(g) for g in groups})
    return f"seeds: {n[0]}" + (f"-{n[-1]}" if len(n) > 1 else "")

def spread(values):
    """The error bar: the std over seeds (ddof 1), 0 for one seed (no bar rather than a made-up one)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

def apart(values, decades=0.15):
    """The values, sorted, for tick labels on a log axis: each at least `decades` above the last one kept,
    so that the labels of two close budgets do not print over each other."""
    kept = []
    for v in sorted(set(values)):
        if not kept or math.log10(v / kept[-1]) >= decades:
            kept.append(v)
    return kept

def new_figure(panels, title):
    from matplotlib.figure import Figure  # no pyplot: no display, no global state
    fig = Figure(figsize=(5.6 * panels + 1, 5.2), layout="constrained")
    fig.suptitle(title, fontsize=10)
    return fig, fig.subplots(1, panels, squeeze=False)[0]

def save(fig, path):
    """Written atomically, as every result is: an interrupted report leaves the previous figure whole."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))

def describe(records):
    """The data and the model of a study, for a figure's title: which corpus, how deep, how wide, how big."""
    r = records[0]
    m = r.run.model
    return f"{r.run.train.dataset}, {m.n_layer} layers x {m.n_embd}, {r['n_params'] / 1000:.3g}k parameters"

def plot_report(records, rows, baseline, path):
    """A folder's figure: its grid (a setting varied at one budget) or its study across budgets."""
    key = grid_key(records)
    if key:
        plot_grid(records, key, path)
    else:
        plot_study(records, rows, baseline, path)

def plot_study(records, rows, baseline, path):
    """Left: final val loss against training compute (mean ± std over seeds). Middle: final val loss against
    the rounds run at inference, at the largest budget. Right: the effective-compute ratio."""
    fig, (loss, rounds, ratio) = new_figure(3, describe(records))
    style = styles(records)
    spent = {r.run.name: executed_flops(r) for r in records}  # once: an older run's is rebuilt from its counts
    for variant, by_budget in cells(records).items():
        flops = [statistics.fmean(spent[r.run.name] for r in runs) for runs in by_budget.values()]
        final = [[trained_loss(r) for r in runs] for runs in by_budget.values()]
        loss.errorbar(flops, [np.mean(f) for f in final], yerr=[spread(f) for f in final], capsize=3, ms=5,
                      label=f"{short(variant)} ({seeds(final)})", **style[variant])
    if records[0]["floor"] is not None:
        loss.axhline(records[0]["floor"], color="grey", linestyle="--", linewidth=1, label="exact floor (entropy)")
    loss.set(xscale="log", xlabel="training compute (FLOPs)", ylabel="final validation loss (nats/token)",
             xlim=(min(spent.values()) / 1.5, max(spent.values()) * 1.5))  # room around the points, at one budget too
    # a tick at each budget: a log axis spanning under a decade would have at most one labelled tick
    by_budget = {}
    for r in records:
        by_budget.setdefault(r.run.train.budget_steps, []).append(spent[r.run.name])
    budgets = apart(statistics.fmean(f) for f in by_budget.values())
    loss.set_xticks(budgets, [f"{b:.2g}" for b in budgets], minor=False)
    loss.set_xticks([], minor=True)
    legend_below(loss)
    plot_rounds(rounds, records, style)
    plot_ratio(ratio, rows, baseline, style)
    save(fig, path)

def plot_rounds(ax, records, style):
    """The largest budget's final val loss at each rounds run at inference: a flat line is a model without
    rounds (the level to read the others against); rounds 1 of a recursive model costs what AB does."""
    top = max(r.run.train.budget_steps for r in records)
    for variant, by_budget in cells(records).items():
        runs = by_budget.get(top)
        if runs:
            # older runs were scored at rounds 1, r, r + 1 only: the seeds are averaged at the rounds they share
            losses = [{e["rounds"] or 1: e["val_loss"] for e in r["evals"]} for r in runs]
            x = sorted(set.intersection(*(set(loss) for loss in losses)))
            final = np.array([[loss[rounds] for rounds in x] for loss in losses])
            if len(x) == 1:
                ax.axhline(final.mean(), color=style[variant]["color"], linestyle=":", linewidth=1)
            ax.errorbar(x, final.mean(0), yerr=final.std(0, ddof=1) if len(runs) > 1 else None, capsize=3,
                        ms=5, **style[variant])
    ax.set(xlabel="rounds of the recursive block at inference", ylabel="final validation loss (nats/token)",
           title=f"at the largest budget ({top} AB steps); dotted: a model without rounds", xticks=range(1, 6))
    ax.title.set_fontsize(9)

def plot_ratio(ax, rows, baseline, style, title=None):
    """The effective-compute ratio in FLOPs at each budget (x: the budget's baseline tokens per parameter),
    mean ± std over seeds; dashed: stochastic layouts evaluated at one round; open markers: bounds."""
    if rows[0]["effective_compute_flops"] is None:
        ax.text(0.5, 0.5, NO_RATIO.format(baseline).replace(": ", ":\n", 1).replace(", and", ",\nand"),
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set(xticks=[], yticks=[], title=title)
        return
    # a stochastic layout is drawn twice: as trained, and at one round, the baseline's inference cost, where
    # the paper's "no regret" is read; the baseline itself is the dotted line at 1
    lines = {}  # (variant, rounds 1?) -> budget -> rows over seeds
    for row in rows:
        stochastic_one = row["rounds"] == 1 and "p_skip" in row["variant"]
        if row["variant"] != baseline and (row["trained"] or stochastic_one):
            lines.setdefault((row["variant"], not row["trained"]), {}).setdefault(row["budget_steps"], []).append(row)
    for (variant, one_round), by_budget in lines.items():
        by_budget = dict(sorted(by_budget.items()))
        # x is the budget's *baseline* tokens per parameter, the same for every layout at a budget: a recursive
        # layout sees fewer tokens (A3B about half), and plotting its own would shift its points left
        x = [ab_tokens_per_param(rows, baseline, b) for b in by_budget]
        y = [[row["effective_compute_flops"] for row in g] for g in by_budget.values()]
        s = {**style[variant], "linestyle": "--" if one_round else "-"}
        ax.errorbar(x, [np.mean(v) for v in y], yerr=[spread(v) for v in y], capsize=3, ms=5,
                    label=short(variant) + (" at 1 round" if one_round else ""), **s)
        # past the baseline's largest (or below its smallest) budget the ratio is only a bound: an open marker
        bound = [any(row["effective_compute_flops_bound"] for row in g) for g in by_budget.values()]
        ax.plot([a for a, b in zip(x, bound) if b], [np.mean(v) for v, b in zip(y, bound) if b], linestyle="",
                marker=s["marker"], ms=7, color=s["color"], markerfacecolor="white", zorder=3)
    ax.axhline(1.0, color="grey", linewidth=1, linestyle=":")
    ax.set(xscale="log", xlabel=f"budget: {baseline}'s training tokens per parameter",
           ylabel=f"effective-compute ratio in FLOPs (> 1: ahead of {baseline})", title=title)
    ticks = apart(ab_tokens_per_param(rows, baseline, row["budget_steps"]) for row in rows)
    ax.set_xticks(ticks, [f"{t:.0f}" if t >= 10 else f"{t:.2g}" for t in ticks], minor=False)  # 0.25, not 0
    ax.set_xticks([], minor=True)
    legend_below(ax, title="open marker: a bound, beyond the baseline's budgets; half-filled: another variant of "
                 "the layout", title_fontsize=7)

def plot_headline(studies, baseline, path):
    """One panel per study folder: does recursion pay at equal training compute, and how does it move with
    the tokens each parameter sees?"""
    fig, axes = new_figure(len(studies), "effective-compute ratio against AB at equal training FLOPs "
                           "(mean ± std over seeds)")
    for ax, (folder, records) in zip(axes, studies.items()):  # line and fill: within a panel's layouts
        plot_ratio(ax, result_rows(records, baseline), baseline, styles(records), f"{folder}: {describe(records)}")
        ax.title.set_fontsize(9)
    # the same axes in every panel, so that a point is read against the other studies' at a glance
    drawn = [ax for ax in axes if ax.get_xscale() == "log"]  # a panel without a ratio has no axes to share
    for ax in drawn:
        ax.set_xlim(min(a.get_xlim()[0] for a in drawn), max(a.get_xlim()[1] for a in drawn))
        ax.set_ylim(min(a.get_ylim()[0] for a in drawn), max(a.get_ylim()[1] for a in drawn))
    save(fig, path)

def grid_key(records):
    """The setting a grid varies (GRID_KEYS): runs at one budget, of one variant but for it, at two values
    or more; where both vary, the one with more values. None for anything else."""
    if len({r.run.train.budget_steps for r in records}) > 1:
        return None
    varied = []
    for key in GRID_KEYS:
        values = {}
        for r in records:
            values.setdefault(grid_line(r, key), set()).add(getattr(r.run.train, key))
        if any(len(v) > 1 for v in values.values()):
            varied.append((len({getattr(r.run.train, key) for r in records}), key))
    return max(varied)[1] if varied else None

def grid_line(record, key):
    """The line a run lies on in a grid of `key`: its variant but for the learning rate, and the other
    grid setting's value."""
    other = next(k for k in GRID_KEYS if k != key)
    return re.sub(r":learning_rate=[^:]*", "", record.run.variant), getattr(record.run.train, other)

def plot_grid(records, key, path):
    """Final val loss against the grid's setting, one line per variant (mean ± std over seeds)."""
    budget = records[0].run.train.budget_steps
    fig, (ax,) = new_figure(1, f"{describe(records)}, {budget} AB steps")
    lines, style = {}, styles(records)
    for r in records:
        lines.setdefault(grid_line(r, key), {}).setdefault(getattr(r.run.train, key), []).append(r)
    other = next(k for k in GRID_KEYS if k != key)
    several = len({o for _, o in lines}) > 1
    dashes = {}  # lines of one layout: one line style each
    for (name, value), by_x in sorted(lines.items()):
        x = sorted(by_x)
        final = [[trained_loss(r) for r in by_x[v]] for v in x]
        first = by_x[x[0]][0]
        n = dashes[layout(first)] = dashes.get(layout(first), -1) + 1
        label = short(name) + (f", {GRID_KEYS[other].split(' (')[0]} {value:g}" if several else "")
        label += f" ({seeds(final)})"
        ax.errorbar(x, [np.mean(f) for f in final], yerr=[spread(f) for f in final], capsize=3, ms=5,
                    label=label, **{**style[first.run.variant], "linestyle": LINE_STYLES[n % len(LINE_STYLES)]})
    ax.set(xscale="log", xlabel=GRID_KEYS[key], ylabel="final validation loss (nats/token)")
    values = sorted({getattr(r.run.train, key) for r in records})
    ax.set_xticks(values, [f"{v:g}" for v in values], minor=False)
    ax.set_xticks([], minor=True)
    legend_below(ax)
    save(fig, path)

# -----------------------------------------------------------------------------
# Sampling

def sample(args, grid):
    """Generate from a checkpoint with the KV cache, at --rounds rounds of the recursive block; --compile
    compiles the decoding step (rins.compile_decode_step)."""
    check_flags(args, ("num_samples", "top_k", "max_new_tokens"), [
        ("start", args.start, "text"), ("temperature", args.temperature >= 0, ">= 0 (0: greedy)"),
        ("rounds", args.rounds is None or args.rounds > 0, "> 0"), ("ckpt", args.ckpt, "a run's ckpt.pt")])
    device, ckpt = check_device(args.device), read_checkpoint(args.ckpt)
    run = read_run(ckpt["run"])
    model = GPT(run.model).to(device).eval()
    model.load_state_dict(ckpt["model"])
    require(args.rounds is None or model.config.recursive, f"--rounds needs a signature with exactly one "
            f"repeated block, like 'A3B'; {model.config.signature!r} has none")
    meta = load_prepared(args.data_dir, run.train.dataset)[2]
    require(run.train.data_fingerprint in (None, meta["fingerprint"]),  # None: an older run did not record it
            f"{args.ckpt}: its dataset was prepared again since, from other text: prepare it as it was")
    encode, decode = codec(meta)
    torch.manual_seed((grid.seeds or [0])[0])
    x = torch.tensor([encode(args.start)], dtype=torch.long, device=device)
    trained = model.config.recursive and model.config.recursive[1]  # the rounds as trained, if any
    length = len(rins.layer_schedule(model.config.signature, model.config.n_layer))
    print(f"# {args.ckpt}: {run.variant}, schedule of {length} layer applications; rounds "
          f"{args.rounds or trained or '-'}{' (as trained)' if trained and args.rounds in (None, trained) else ''}, "
          f"temperature {args.temperature}, top_k {args.top_k}")
    step = rins.compile_decode_step(device) if args.compile else None
    for _ in range(args.num_samples):
        with rins.autocast(device):
            y = model.generate(x, args.max_new_tokens, args.temperature, args.top_k, args.rounds, step=step)
        print(decode(y[0].tolist()) + "\n" + "-" * 40)

# -----------------------------------------------------------------------------
# Benchmark: ratios measured side by side in one run. Machines are noisy, so the variants are timed
# interleaved, several rounds each, and the median is reported; bench.json in --out_dir keeps it all.

BENCH_VARIANTS = ["AB", "A2B", "A3B", "ABAB", "(A3B)2", "A3B:p_skip=0.5"]
DECODE_VARIANTS = ["AB", "A3B", "A3B:share_kv=1"]
BENCH_STEPS = 5    # training steps back to back between two synchronisations, as training runs them
MIN_DRAWS = 20     # a stochastic row is timed over at least this many draws of its rounds
DECODE_REPEATS = 3

def bench(args):
    """Training steps (per layer application, MFU, the loss's memory) and decoding speed; bench.json."""
    device = check_device(args.device)
    check_flags(args, ("batch_size", "block_size", "bench_repeats", "bench_vocab", "n_head", "max_new_tokens"), [
        ("n_layer", args.n_layer >= 4 and args.n_layer % 4 == 0, "4, 8, ... (for (A3B)2)"),
        ("n_embd", args.n_head >= 1 and args.n_embd % args.n_head == 0, "a multiple of --n_head")])
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    out = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda, compile=args.compile,
               batch=[args.batch_size, args.block_size], n_layer=args.n_layer, n_embd=args.n_embd,
               vocab=args.bench_vocab)
    print(f"{out}; median of {args.bench_repeats} interleaved rounds of {BENCH_STEPS} training steps "
          f"(forward, backward, clip, AdamW, zero_grad) between synchronisations")
    out["train"], out["loss"] = bench_train(args, device)
    print_table(out["train"])
    print(f"stochastic rows: the mean over {out['train'][-1]['draws']} draws of the rounds, in rounds of "
          f"{out['train'][-1]['draws'] // args.bench_repeats} steps\n{out['loss']['text']}")
    # written now and again after decoding: if decoding fails or runs out of time (.ci/gpu's stage time-out),
    # the training figures are already on disk
    write_atomic(os.path.join(args.out_dir, "bench.json"), json.dumps(out, indent=1).encode())
    out["decode"] = bench_decode(args, device)
    print_table(out["decode"])
    write_atomic(os.path.join(args.out_dir, "bench.json"), json.dumps(out, indent=1).encode())
    print(f"wrote {os.path.join(args.out_dir, 'bench.json')}")
    return out

def bench_train(args, device):
    """Training steps of every variant, of a plain model with twice the layers (the same applications
    as A3B, twice the parameters) and of AB's two plain forms; rows, and the LM head + loss's memory."""
    B, T, ctx, n = args.batch_size, args.block_size, rins.autocast(device), args.n_layer
    x, y = (torch.randint(0, args.bench_vocab, (B, T), device=device) for _ in range(2))
    models = {v: bench_model(args, v, device, T) for v in BENCH_VARIANTS}
    models[f"AB, {2 * n} layers"] = bench_model(args, "AB", device, T, n_layer=2 * n)
    losses = {v: lambda m=m: m(x, y)[1] for v, m in models.items()}
    losses["AB, plain loop"] = lambda: plain_loop_loss(models["AB"], x, y)
    losses["AB, whole logits"] = lambda: whole_logits_loss(models["AB"], x, y)
    model_of = lambda v: models.get(v, models["AB"])
    steps = {v: train_step_fn(model_of(v), loss, ctx) for v, loss in losses.items()}
    stochastic = {v for v in steps if model_of(v).config.p_skip}
    n_steps = {v: max(BENCH_STEPS, -(-MIN_DRAWS // args.bench_repeats)) if v in stochastic else BENCH_STEPS
               for v in steps}
    memory, times = {}, {v: [] for v in steps}
    for v, step in steps.items():  # warm-up (and compilation); the memory a step adds to what is allocated
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        step(), step()
        memory[v] = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else None
    for _ in range(args.bench_repeats):  # interleaved, so drift in the machine's speed hits all alike
        for v, step in steps.items():
            times[v].append(timed(step, device, n_steps[v]))
    return bench_rows(args, models, times, memory, n_steps, x, y, device), loss_memory(args, memory, device)

def bench_rows(args, models, times, memory, n_steps, x, y, device):
    """One row per timed step: time per layer application against AB and against the plain model with
    the same applications (AB at n_layer or 2 n_layer layers), MFU of the executed FLOPs."""
    B, T, n, peak, rows = args.batch_size, args.block_size, args.n_layer, peak_flops(device), []
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
    whole, chunk = (p * args.bench_vocab * 4 for p in (positions, min(positions, rins.LOSS_CHUNK)))
    text = (f"LM head + loss: float32 logits {whole / 2**20:,.1f} MiB whole, {chunk / 2**20:,.1f} MiB per chunk of "
            f"{rins.LOSS_CHUNK} positions (arithmetic); ")
    if device.type != "cuda":
        return dict(whole_logits_bytes=whole, chunk_logits_bytes=chunk, text=text + "memory not measured on the CPU")
    saved = memory["AB, whole logits"] - memory["AB"]
    return dict(whole_logits_bytes=whole, chunk_logits_bytes=chunk, step_memory_saved_gib=saved,
                text=text + f"measured: AB's step takes {saved:.2f} GiB less than with whole logits")

def bench_decode(args, device):
    """Greedy decoding of --max_new_tokens after 16 tokens at batch 1 and 64: eager without the cache, eager
    with it, and the compiled step (with --compile), the median of DECODE_REPEATS interleaved rounds."""
    rows, n = [], args.max_new_tokens
    for v in DECODE_VARIANTS:
        model = bench_model(args, v, device, 16 + n, compile=False).eval()
        ways = {"eager uncached": dict(use_cache=False), "eager cached": {}}
        if args.compile:
            # [known cost] generate makes a new cache per call, so on CUDA "reduce-overhead" may record the
            # step's graph again for each call's new cache addresses: one recording per timed call, not per token
            ways["compiled cached"] = dict(step=rins.compile_decode_step(device))
        for batch in (1, 64):
            prompt = torch.randint(0, args.bench_vocab, (batch, 16), device=device)
            run = lambda kw, tokens: model.generate(prompt, tokens, temperature=0, **kw)
            times = {way: [] for way in ways}
            with rins.autocast(device):
                for kw in ways.values():
                    run(kw, 8)  # warm-up (and compilation)
                for _ in range(DECODE_REPEATS):
                    for way, kw in ways.items():
                        times[way].append(timed(lambda: run(kw, n), device))
            tok_s = {way: batch * n / statistics.median(ts) for way, ts in times.items()}
            rows.append(dict(model=v, batch=batch, **{f"{w} tok/s": tok_s.get(w) for w in
                                                      ("eager uncached", "eager cached", "compiled cached")},
                             cached_vs_uncached=tok_s["eager cached"] / tok_s["eager uncached"],
                             compiled_vs_uncached=tok_s["compiled cached"] / tok_s["eager uncached"]
                             if args.compile else None))
    return rows

def bench_model(args, variant, device, block_size, compile=True, n_layer=None):
    """A bench model of one variant, seeded: every variant starts from the same draws, as in a comparison."""
    signature, settings = rins.parse_variant(variant, VARIANT_KEYS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=args.bench_vocab, n_layer=n_layer or args.n_layer,
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
