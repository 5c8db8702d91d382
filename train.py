"""
Train RINS language models at the same training compute, compare them, and sample from them:
nanoGPT's train.py with the budget counted in executed FLOPs (or layer applications x tokens).

    python train.py --compare                              # CPU default: AB, A3B, ABAB at two budgets
    python train.py --variants "AB,A3B,A3B:p_skip=0.5:adapters=1" --budget_steps 1500,3000 --seeds 0,1
    python train.py --sample --ckpt out/A3B_b1200_s0/ckpt.pt --rounds 1
    torchrun --standalone --nproc_per_node=8 train.py ...  # DDP: NCCL on GPUs, gloo on CPU

A variant is "SIG:key=value:..." (keys: VARIANT_KEYS); the flags give what it does not override. The
README's Definitions (compute accounting) say how runs are planned. What a run is and what its run.json
holds (Run, TrainConfig, Record) is defined in report.py, which reads the runs back into tables and
figures (python report.py DIR); bench.py measures speed.
"""

import argparse
import ctypes
import fcntl
import gc
import json
import math
import os
import re
import signal
import sys
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, fields
from datetime import timedelta

# a torchrun worker must not outlive its launcher, unseen and out of the user's reach: Linux sends it SIGTERM when
# the launcher dies, which stops it as Ctrl-C does. Asked here, before torch's import takes seconds
if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # prctl(PR_SET_PDEATHSIG, SIGTERM), from <sys/prctl.h>

if __name__ == "__main__":  # a script: from its first line SIGTERM (torchrun, kill, job schedulers) raises what
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # Ctrl-C raises, so that both end as main says
try:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm

    import rins
    from data.prepare import (codec, load_prepared, read_json, remove_temporaries, require_file, temporaries,
                              write_atomic)
    from report import (BASELINE, Record, Run, TrainConfig, check_device, check_flags, check_settings, folder_lock,
                        int_list, outcome, print_summary, read_record, read_run, read_runs, require, write_results)
    from rins import GPT, GPTConfig
except KeyboardInterrupt:  # while torch loads (seconds): one line, not an import's traceback
    raise SystemExit("interrupted while starting, before any run: run the same command again (with --resume if "
                     "it continues earlier runs)")

DEFAULT_VARIANTS = "AB,A3B,ABAB"
DEFAULT_BUDGETS = "400,1200"  # two budgets: the effective-compute ratio needs the baseline at two or more
EVAL_SEED = 1234  # validation batches are the same for every evaluation of every run
VARIANT_KEYS = {**rins.MODEL_KEYS, "block_size": int, "batch_size": int, "learning_rate": float}
LOCKS = []  # the open lock file of the run this process trains: a lock lives as long as its file is open
START_TIMEOUT = 30  # seconds torchrun's processes wait for each other at start-up (torch's default: 30 minutes)

# How this file runs, top to bottom. --compare (the default):
#   main            reads the flags (never changes them) and the grid: variants x budgets x seeds
#   compare         loads the data once, plans every run, then trains each one (or reuses it) in turn
#   plan_runs       checks every flag and earlier run before any compute (under torchrun, rank 0 for all: agree)
#   train_runs      takes each run's lock in turn (take_run): runs another process holds are left to it
#   make_run        turns a variant and a budget into a Run (its GPTConfig and TrainConfig) and its plan:
#                   the steps and the cost it stops at, by the budget rule (rins.plan_budget)
#   train           one run: builds it (start), then loops over step(), evaluating and checkpointing
#   step            one optimisation step: draw, forward, backward, clip, update, count what executed
#   finish          scores the trained run at every depth and returns its record (run.json)
#   report.py       the comparison's table, results.csv and figure, from the records (write_results)
# --sample: sample   loads a checkpoint and generates with the KV cache (rins.GPT.generate)

def build_parser():
    """nanoGPT's flags (data, model, optimisation) and RINS's (the layout and its options). Every default
    runs on a laptop's CPU in minutes; a variant in --variants overrides some of them for itself alone."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true", help=f"train --variants (default {DEFAULT_VARIANTS})")
    mode.add_argument("--sample", action="store_true", help="generate text from --ckpt")
    mode.add_argument("--report", nargs="*", help=argparse.SUPPRESS)  # moved: main names the new command
    mode.add_argument("--bench", action="store_true", help=argparse.SUPPRESS)
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
    # sampling
    p.add_argument("--ckpt", help="checkpoint to sample from")
    p.add_argument("--start", default="\n", help="prompt")
    p.add_argument("--rounds", type=int, help="rounds of the recursive block (default: as trained)")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=200)
    return p

def add_comparison_flags(p):
    """The flags of the comparison: its grid, its optimisation, its evaluations, files and machine."""
    p.add_argument("--variants", help="comma-separated variants, e.g. 'AB,A3B,A3B:p_skip=0.5:adapters=1'")
    p.add_argument("--budget_steps", help=f"in steps of the baseline AB (default {DEFAULT_BUDGETS})")
    p.add_argument("--budget_unit", default="flops", choices=rins.BUDGET_UNITS,
                   help="what the budget counts: executed FLOPs, or layer applications x tokens (older studies)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; a seed makes a CPU run reproducible")
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks")

# the comma-separated flags, read once (the parsed flags keep the text the user typed): the runs a comparison
# trains, variants x budget_steps x seeds; variants as written ("A3B:p_skip=0.5"), budgets in steps of AB
Grid = namedtuple("Grid", "variants budget_steps seeds")

def main(argv=None):
    """The command line: --compare (the default: train the variants, then the table) or --sample. Returns
    what the mode returns (the comparison's records), so tests and notebooks can call it.

    A bad flag, file or setting stops with one line "error: ..." (SystemExit) before any compute; Ctrl-C and
    SIGTERM stop with one line that says how to resume."""
    args = build_parser().parse_args(argv)
    # torchrun, kill and job schedulers stop a process with SIGTERM: it ends like Ctrl-C, with the resume hint
    # below instead of a traceback (the previous handler comes back, for a caller that is not a script)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        require(args.report is None, "--report moved to its own script: python report.py DIR [DIR ...]")
        require(not args.bench, "--bench moved to its own script: python bench.py [--compile]")
        # one run from the flags, or the listed variants
        variants = args.variants or (DEFAULT_VARIANTS if args.compare else args.signature)
        grid = Grid(variants=[v.strip() for v in variants.split(",")],
                    budget_steps=int_list(args.budget_steps or DEFAULT_BUDGETS, "--budget_steps"),
                    seeds=int_list(args.seeds, "--seeds"))
        return (sample if args.sample else compare)(args, grid)
    # a file is written whole or not at all, and an interrupt in the middle of a write waits for its end
    # (data/prepare.py: write_atomic), so the last checkpoint is whole
    except KeyboardInterrupt:
        raise SystemExit(f"\ninterrupted: finished runs and the current run's last checkpoint are in "
                         f"{args.out_dir}/; run the same command with --resume to continue")
    finally:
        signal.signal(signal.SIGTERM, previous)

# -----------------------------------------------------------------------------
# The comparison: plan and check every run, train each to its budget, write the results
#
# The question RINS asks is whether a recursive layout beats the plain model *at the same training
# compute*. So every variant of a comparison gets the same budget, what the baseline AB costs in
# --budget_steps steps, and spends it its own way: A3B's step runs 8 layer applications to AB's 4, so it
# takes about half the steps and sees half the tokens. Everything else (data, seed, batch, optimiser, the
# warm-up steps, the evaluation batches) stays the same, so that the layout is the only difference.

@dataclass
class Setup:
    """What every run of one invocation shares: the data, the device, and this process's place among the
    processes torchrun started (one process, rank 0 of 1, without it)."""
    train_data: np.ndarray  # token memmaps (data/prepare.py): read from disk as batches are drawn
    val_data: np.ndarray
    meta: dict              # the dataset's meta.json: vocabulary, fingerprint, entropy floor
    device: torch.device
    ddp: bool               # launched by torchrun: gradients are averaged over the processes every step
    rank: int               # 0 is the master: it alone decides, locks, evaluates, checkpoints and writes
    world: int
    compile: bool

def compare(args, grid):
    """The main job: train every variant x budget x seed (or reuse finished runs), then the table."""
    try:
        device, ddp = join_processes(check_device(args.device))
        # the token files are memory-mapped: a dataset larger than memory is read batch by batch
        train_data, val_data, meta = load_prepared(args.data_dir, args.dataset)
        setup = Setup(train_data, val_data, meta, device, ddp, dist.get_rank() if ddp else 0,
                      dist.get_world_size() if ddp else 1, args.compile)
        # every run is planned and checked before the first step: a mistake in the last one stops it all
        runs = agree(setup, lambda: plan_runs(args, grid, meta, len(train_data), len(val_data), setup.world))
        records, trained, left = train_runs(args, runs, setup)
    except RuntimeError as e:  # a peer is gone or never came: torch's DistError, or gloo's from DDP's backward
        if not (isinstance(e, dist.DistError) or "by peer" in str(e)):
            raise
        raise SystemExit(f"error: another process of this torchrun job ended (or never started): finished runs and "
                         f"the last checkpoint are in {args.out_dir}/; run the same command with --resume to continue")
    finally:
        release_lock()
        if dist.is_initialized():
            # DDP's wrapper holds the group in reference cycles: freed now, not at exit, where gloo aborts (1 run in 16)
            gc.collect()
            dist.destroy_process_group()
    # a process that found nothing to train, every run it did not find finished being another's, was not needed
    if left and not trained:
        name, pid = next(iter(left.items()))
        raise SystemExit(f"error: {os.path.join(args.out_dir, name, 'lock')} is held by process {pid} (`ps -p {pid}` "
                         f"shows whether it still runs): wait for it to finish, or use another --out_dir")
    if setup.rank == 0:
        end_of_sweep(args, trained, left)
    return records

def train_runs(args, runs, setup):
    """Train the runs one after the other, each to the end of its budget, or reuse them; returns (the records,
    the runs trained here, {run: pid} of those other processes hold). Several processes given the same sweep
    share it as a work queue: each run goes to the first to take its lock, and the others pass it by."""
    torch.set_float32_matmul_precision("high")  # on GPUs, TF32 for what autocast leaves in float32
    # a run's record is written when it is finished, so a folder's run.json files are exactly its finished runs
    records, trained, left = [], [], {}
    for run, plan in runs:
        run_dir = os.path.join(args.out_dir, run.name)
        turn, saved = agree(setup, lambda: take_run(run, run_dir))
        if turn == "held":
            left[run.name] = saved  # the pid of the process that trains it
            continue
        record = Record(saved) if turn == "done" else train(run, plan, run_dir, setup)
        if turn == "train" and setup.rank == 0:
            write_atomic(os.path.join(run_dir, "run.json"), json.dumps(record).encode())
        release_lock()  # only now: a run is another process's to take once its run.json is there
        trained += [run.name] if turn == "train" else []
        records.append(record)
    return records, trained, left

def join_processes(device):
    """Under torchrun, (this process's device, True) in a process group with the others: its all-reduce averages
    the gradients (NCCL between GPUs, gloo between CPU processes). Without torchrun, (device, False)."""
    if "RANK" not in os.environ:
        return device, False
    if device.type == "cuda":  # torchrun starts one process per device and tells each its rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # until the processes have met nothing is held or written, so SIGTERM (a launcher's death: see the imports)
    # ends this process at once, even inside the rendezvous, where Python's handler would wait. They meet within
    # START_TIMEOUT or end; then a collective may wait torch's default half hour, as the other ranks wait at the
    # next all-reduce while the master alone evaluates and checkpoints
    handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=START_TIMEOUT))
    dist.barrier()
    signal.signal(signal.SIGTERM, handler)
    dist.distributed_c10d._set_pg_timeout(timedelta(minutes=30))
    return device, True

def agree(setup, decide):
    """decide() on the master, its answer on every rank: all ranks go on together, or all stop at once with the
    master's one line ("error: ..."). A check one rank makes alone (the locks are the master's) must not leave
    the others in a collective that waits for it."""
    try:
        answer = decide() if setup.rank == 0 else None
    except SystemExit as e:
        answer = e
    shared = [answer]
    if setup.ddp:
        dist.broadcast_object_list(shared, src=0)
    if isinstance(shared[0], SystemExit):
        raise SystemExit(shared[0].code)
    return shared[0]

def end_of_sweep(args, trained, left):
    """The table of every finished run in the folder (report.write_results rebuilds it from their run.json, so the
    last process of a shared sweep to finish writes the complete one) and, in a shared sweep, who trained what."""
    baseline = args.baseline or BASELINE
    finished, fits = write_results(args.out_dir, None, args.baseline)
    print_summary(finished, fits, baseline)
    print(f"{outcome(finished, baseline)}\nresults: {args.out_dir}/results.csv, plot: "
          f"{args.out_dir}/loss_vs_cost.png\nwhat the repository's studies found: RESULTS.md")
    done, others = {r.run.name for r in finished}, []
    for name in left:  # trained elsewhere, in training elsewhere, or left unfinished by a process that ended
        pid = other_process_on(os.path.join(args.out_dir, name))
        others.append(f"{name} ({'finished' if name in done else f'in process {pid}' if pid else 'unfinished'})")
    if left:
        print(f"shared sweep: trained here {', '.join(trained) or 'none'}; by others {', '.join(others)}")
    if set(left) - done:
        print(f"when they are finished (--resume continues an unfinished one), the table of every run: "
              f"python report.py {args.out_dir}")

def plan_runs(args, grid, meta, n_train, n_val, world_size):
    """(Run, its plan) per budget x seed x variant, every flag, setting and file checked before any compute."""
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
    names = [run.name for run, _ in runs]
    require(len(set(names)) == len(names), f"two variants make the same run: {names}")
    variants = sorted({run.variant for run, _ in runs})
    require(args.baseline in variants + [None], f"--baseline {args.baseline} is none of the variants "
            f"({', '.join(variants)}): add it to --variants or name one of them")
    for run, _ in runs:
        require(min(n_train, n_val) > run.model.block_size, f"{run.name}: block_size {run.model.block_size} "
                f"needs more tokens than the data has (train {n_train}, val {n_val})")
        check_earlier_run(run, os.path.join(args.out_dir, run.name), args.resume)
    check_folder(args.out_dir, [run for run, _ in runs])
    return runs

def check_earlier_run(run, run_dir, resume):
    """A folder that holds the run already (finished: run.json, or interrupted: ckpt.pt) is continued only
    with --resume, and only if it was the same run: a resumed run must be the run it claims to be. Its files are
    read whole here, before any compute: a damaged one stops now, not when the run's turn comes. A folder that a
    live process of a shared sweep has locked needs no --resume: its files are that sweep's."""
    # a folder where the run keeps a file (mkdir run.json, say) is named now, not met mid-run as "Is a directory"
    for path in [os.path.join(run_dir, name) for name in ("run.json", "ckpt.pt", "lock")] + temporaries(run_dir):
        require_file(path)
    path = next((p for p in (f"{run_dir}/run.json", f"{run_dir}/ckpt.pt") if os.path.exists(p)), None)
    if path is None:
        return
    require(resume or other_process_on(run_dir), f"{path} exists: pass --resume to continue it, or use another "
            f"--out_dir")
    saved = read_record(path).run if path.endswith(".json") else read_run(read_checkpoint(path)["run"])
    # every setting that changed, "name: old -> new", so the user sees which flag to give back
    diff = [f"{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
            for old, new in ((saved.model, run.model), (saved.train, run.train))
            for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]
    require(saved == run, f"{path} was written by a run with another configuration "
                          f"({'; '.join(diff)}): resume with its flags or use another --out_dir")

def take_run(run, run_dir):
    """Whose turn a run is, decided by the master: ("held", the pid of the process that trains it), ("done", its
    finished run.json), or ("train", None), this process holding the run's lock."""
    pid = lock_run(run_dir)
    if pid is not None:
        return "held", pid
    check_earlier_run(run, run_dir, resume=True)  # files since plan_runs: another process's, of this run?
    saved = read_json(os.path.join(run_dir, "run.json"))
    return ("done", saved) if saved is not None else ("train", None)

def lock_run(run_dir):
    """Take the lock of a run's folder, or return the pid of the process that holds it: two processes training one
    run would write one checkpoint in turns. The OS releases a lock when its process ends, even by kill -9."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, "lock"), "a+")  # not "w": opening must not erase the holder's pid
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with lock:
            lock.seek(0)
            return lock.read().strip() or "unknown"  # "unknown": it took the lock an instant ago
    except OSError as e:
        require(False, f"--out_dir {os.path.dirname(run_dir)}: {e.strerror}: choose another folder")
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # for the messages of the others (other_process_on)
    lock.flush()
    LOCKS.append(lock)
    remove_temporaries(run_dir)  # with the lock held this process is the folder's only writer

def release_lock():
    """Close the lock file of the run this process held, if any, which releases the lock."""
    while LOCKS:
        LOCKS.pop().close()

def other_process_on(run_dir):
    """The pid written in a run folder's lock if that process is alive and not this one: another process of a
    shared sweep, training the run or done with it. A lock is taken only by take_run: this only reads."""
    try:
        with open(os.path.join(run_dir, "lock")) as f:
            pid = int(f.read())
        os.kill(pid, 0)  # signal 0 checks that the process exists and sends nothing
    except (OSError, ValueError):  # no lock file, no pid in it yet, or no such process
        return None
    return pid if pid != os.getpid() else None

def check_folder(out_dir, runs):
    """The folder's own files, before any compute: the comparison ends by rebuilding them from every finished run in
    out_dir (report.write_results), so each must be whole and comparable with these runs; and what a kill -9 in the
    middle of writing them left goes, as the run folders' temporaries do (lock_run)."""
    if not os.path.isdir(out_dir):
        return
    for name in ("results.csv", "budget_fits.json", "loss_vs_cost.png"):
        require_file(os.path.join(out_dir, name))
    check_settings([r.run for r in read_runs(out_dir)] + runs, out_dir, "use another --out_dir")
    with folder_lock(out_dir):  # held by whoever writes them, so a temporary there is no write in progress
        remove_temporaries(out_dir)

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
    # the budget is the baseline's, whatever this variant overrides: that is what makes the comparison fair.
    # It counts FLOPs (or layer applications x tokens), not steps: that is what "the same training compute"
    # means when a step of A3B costs about twice a step of AB. So the run's steps are the budget over the
    # expected cost of one of its steps, and it stops at target, the budget rounded to whole steps; the
    # warm-up is a fraction of the baseline's steps, the same in every variant (rins.plan_budget)
    budget = baseline_budget(args, vocab_size(meta), budget_steps, world_size)
    tokens = tokens_per_step(s["batch_size"], s["block_size"], args.grad_accum, world_size)
    steps, target, warmup_steps = rins.plan_budget(budget, step_cost(model, args.budget_unit, tokens), budget_steps,
                                                   args.warmup_frac)
    # a run whose warm-up and cool-down overlap would never reach its peak learning rate: refused, not trained
    require(warmup_steps / steps + args.cooldown_frac <= 1, f"variant {spec!r}: {warmup_steps} warm-up steps and a "
            f"{args.cooldown_frac:.0%} cool-down do not fit its {steps} steps at budget {budget_steps}: lower them")
    train = TrainConfig(
        dataset=args.dataset, data_fingerprint=meta["fingerprint"], seed=seed, budget_steps=budget_steps,
        budget=budget, budget_unit=args.budget_unit, batch_size=s["batch_size"], grad_accum=args.grad_accum,
        world_size=world_size, learning_rate=s["learning_rate"], log_interval=args.log_interval,
        weight_decay=args.weight_decay, beta1=args.beta1, beta2=args.beta2, grad_clip=args.grad_clip,
        warmup_frac=args.warmup_frac, warmup_steps=warmup_steps,
        cooldown_frac=args.cooldown_frac, eval_points=args.eval_points, eval_iters=args.eval_iters)
    # the variant's name shows its RINS settings that differ from the plain model's and the other settings
    # that differ from the flags', so a run's folder says what makes it different within a comparison
    plain = {k: getattr(GPTConfig, k) if k in rins.MODEL_KEYS else getattr(args, k) for k in VARIANT_KEYS}
    variant = rins.variant_name(signature, s, plain)
    name = f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', variant).strip('_')}_b{budget_steps}_s{seed}"
    return Run(name, variant, model, train), (steps, target)

def vocab_size(meta):
    """GPT-2's 50257 padded to 50304 as nanoGPT does (fast on GPUs); others exact (no id without text)."""
    return -(-meta["vocab_size"] // 64) * 64 if meta["tokenizer"] == "gpt2" else meta["vocab_size"]

def baseline_budget(args, vocab, budget_steps, world_size):
    """The budget of every variant: what the baseline AB costs in budget_steps steps at the flags' model,
    batch and context. A variant that sets its own batch or context spends the same budget its own way."""
    baseline = GPTConfig(block_size=args.block_size, vocab_size=vocab, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd)
    tokens = tokens_per_step(args.batch_size, args.block_size, args.grad_accum, world_size)
    return round(budget_steps * step_cost(baseline, args.budget_unit, tokens))

def tokens_per_step(batch_size, block_size, grad_accum, world_size):
    """Tokens of one optimisation step, over all micro-batches and processes."""
    return batch_size * block_size * grad_accum * world_size

def step_cost(config, unit, tokens_per_step):
    """The expected cost of one training step in `unit` (rins.cost_per_token), read off the model's shapes:
    it is built on the meta device, which allocates no memory and computes nothing."""
    with torch.device("meta"):
        model = GPT(config)
    return rins.cost_per_token(model, unit, config.block_size) * tokens_per_step

def read_checkpoint(path):
    """A checkpoint, loaded with weights_only=True (else torch.load runs any code a file holds) and checked whole
    before any compute: every part save_checkpoint writes, weights of its run's model's shapes (on the meta device)."""
    fix = "point to a run's ckpt.pt, or delete it to train that run again"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        parts = {part: set(ckpt[part]) for part in ("run", "model", "optimizer", "state", "rng")}
        with torch.device("meta"):
            expected = {k: v.shape for k, v in GPT(read_run(ckpt["run"]).model).state_dict().items()}
        shapes = {k: v.shape for k, v in ckpt["model"].items()}
    except Exception as e:  # a folder, an empty, truncated or foreign file, a part missing: each fails its own way
        raise SystemExit(f"error: {path} is not a train.py checkpoint "
                         f"({f'no {e}' if isinstance(e, KeyError) else type(e).__name__}): {fix}")
    require(parts["state"] >= set(new_progress()) and parts["rng"] >= {"torch", "data", "skip"} and shapes == expected,
            f"{path} is not a train.py checkpoint (its state, rng or weights are incomplete): {fix}")
    return ckpt

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

def train(run, plan, run_dir, setup):
    """Train one run to its budget; returns its record (on the master process) or None."""
    t, master = run.train, setup.rank == 0
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    tr = start(run, plan, setup, ckpt_path)
    if master:
        tokens = tr.steps * tokens_per_step(t.batch_size, run.model.block_size, t.grad_accum, t.world_size)
        tqdm.write(f"{run.name}: schedule {rins.layer_schedule(run.model.signature, run.model.n_layer)}, "
                   f"{tr.steps} planned steps, {tokens / tr.model.get_num_params():.1f} tokens per parameter")
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

def start(run, plan, setup, ckpt_path):
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
    steps, target = plan  # make_run's, by the budget rule
    tr = Training(model, model, optimizer, data_rng, new_progress(), steps, target)
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

def new_progress():
    """A run's progress before its first step, what a checkpoint's "state" holds (Training.progress)."""
    return dict(step=0, cost=0, tokens=0, flops=0, train_time=0.0, train_log=[], curve=[])

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
    p.update(step=p["step"] + 1, cost=p["cost"] + cost, tokens=p["tokens"] + tokens_per_step(B, T, accum, setup.world),
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
    write_atomic(path, lambda f: torch.save(ckpt, f))  # a kill while writing: the last one is whole

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
    p, peak, n_params = tr.progress, rins.peak_flops(setup.device), tr.model.get_num_params()
    return Record(dict(run=asdict(run), trained_rounds=r, steps=p["step"], planned_steps=tr.steps,
                tokens=p["tokens"], epochs=p["tokens"] / len(setup.train_data),
                tokens_per_param=p["tokens"] / n_params, cost=p["cost"], target=tr.target, flops=p["flops"],
                wall_s=p["train_time"], tokens_per_s=p["tokens"] / p["train_time"],
                mfu=p["flops"] / p["train_time"] / (peak * setup.world) if peak else None, n_params=n_params,
                n_adapter_params=tr.model.num_adapter_params(), floor=setup.meta.get("entropy_per_token"),
                evals=evals, curve=p["curve"], train_log=p["train_log"]))

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

if __name__ == "__main__":
    main()
