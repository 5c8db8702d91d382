"""
Turn finished runs into answers: the effective-compute ratio, the scaling law across budgets, the per-token
gain of recursion, tables, results.csv, budget_fits.json and every figure, from the run.json files that
train.py writes. No training: a report reads only what runs left behind, so it can be run at any time,
on any folder, as often as wanted.

    python report.py results/depth8                          # its table, results.csv, loss_vs_cost.png
    python report.py results/depth8 --variants AB,A3B --seeds 0,1 --plot out/a3b.png   # a selection
    python report.py results/regime results/regime_w32 results/grammar --plot results/headline.png

train.py --compare calls write_results and print_summary for its closing table and figure; eval_siglip.py
takes its colours from layout_style. The README's Definitions say what each number means.
"""

import argparse
import contextlib
import csv
import fcntl
import functools
import glob
import io
import json
import math
import os
import re
import statistics
from dataclasses import asdict, astuple, dataclass, replace

import numpy as np
import torch

import rins
from data.prepare import read_json, write_atomic
from rins import GPT, GPTConfig

BASELINE = "AB"  # --baseline's default: a comparison without it has a table but no effective-compute ratio

# How a report flows through this file, top to bottom:
#   main            reads the folders and what selects runs in them
#   read_runs       each finished run's run.json as a Record (its settings parsed into a Run), checked whole
#   result_rows     one row per run x rounds: loss, tokens, the effective-compute ratio (effective_compute)
#   print_summary   the table over seeds, the law across budgets, the per-token gain of recursion
#   write_results   results.csv, budget_fits.json and the folder's figure (plot_report), from every run in it

def main(argv=None):
    """The command line: one folder (its table, files and figure) or several (the headline figure)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", metavar="DIR", nargs="+", help="folders of runs (<DIR>/<run>/run.json)")
    p.add_argument("--plot", help="where the figure goes (one folder: default DIR/loss_vs_cost.png, or "
                   "DIR/report.png for a selection; several: required)")
    p.add_argument("--baseline", help=f"the variant effective compute is measured against (default {BASELINE}; "
                   "named: the runs must have it)")
    p.add_argument("--variants", help="comma-separated variants to keep (default: every one)")
    p.add_argument("--budget_steps", help="comma-separated budgets to keep, in AB steps (default: every one)")
    p.add_argument("--seeds", help="comma-separated seeds to keep (default: every one)")
    p.add_argument("--baseline_dir", help="one folder: the baseline's runs come from this folder (a study that "
                   "extends another, with the same model and flags)")
    p.add_argument("--twins", help="one folder: the baseline's schedule twins, each at half a budget with the "
                   "recursive runs' warm-up in steps, for the per-token gain with matched warm-up")
    p.add_argument("--figure", choices=("multiplier", "depth"), help="multiplier: the token multiplier m against "
                   "k, to --plot (several folders: pooled into one study, e.g. a sweep and the study whose baseline "
                   "it shares); depth (several folders, one depth each): one panel per --variants, a line per folder")
    args = p.parse_args(argv)
    select = Selection(variants=args.variants and [v.strip() for v in args.variants.split(",")],
                       budget_steps=int_list(args.budget_steps or "", "--budget_steps"),
                       seeds=int_list(args.seeds or "", "--seeds"))
    return report(args, select)

@dataclass
class Selection:
    """The runs a report keeps (all where a list is empty or None), read once from the comma-separated flags."""
    variants: list
    budget_steps: list
    seeds: list

def int_list(text, flag):
    """"1200,2400" -> [1200, 2400]; a value given twice would train (or report) the same run twice."""
    require(re.fullmatch(r"(-?[0-9]+(,-?[0-9]+)*)?", text.replace(" ", "")),
            f"{flag} takes comma-separated integers, got {text!r}")
    values = [int(x) for x in text.split(",") if x.strip()]
    require(len(set(values)) == len(values), f"{flag} repeats a value: {text!r}")
    return values

def require(ok, message):
    """Bad input stops here, before any compute, with one line that says what to change (every script's rule)."""
    if not ok:
        raise SystemExit(f"error: {message}")

def check_device(name):
    """--device as a torch.device; a device that is not there stops now, not at the first tensor."""
    try:
        return rins.parse_device(name)
    except ValueError as e:
        raise SystemExit(f"error: --device: {e}")

def check_flags(args, positive, rules):
    """The flags named in `positive` must be >= 1; each rule is (flag, whether it holds, what it must be)."""
    for name, ok, rule in [(k, getattr(args, k) >= 1, ">= 1") for k in positive] + rules:
        require(ok, f"--{name} must be {rule}, got {getattr(args, name)}")

# -----------------------------------------------------------------------------
# Reading the folders: which runs a report reads, and the checks that make their numbers comparable

def report(args, select):
    """The results files, table and plot again from the finished runs of a folder, without training;
    --variants, --budget_steps and --seeds select runs (select_runs; plot: DIR/report.png).
    Several folders: the headline figure, one panel of effective-compute ratios per study (or their grid)."""
    if len(args.folders) > 1:
        return report_folders(args, select)
    folder, baseline = args.folders[0], args.baseline or BASELINE
    require(args.figure != "depth", "--figure depth draws several folders, one line each: name them")
    require(args.plot or args.figure != "multiplier", "--figure multiplier needs --plot (where the figure goes)")
    own = read_runs(folder)
    require(own, f"no finished runs (<run>/run.json) in {folder}")
    borrowed = borrowed_baseline(args.baseline_dir, baseline, own, folder) if args.baseline_dir else []
    twins = borrowed_baseline(args.twins, baseline, own, folder, same=True) if args.twins else []
    subset = select.variants or select.budget_steps or select.seeds
    plot = args.plot or os.path.join(folder, "report.png" if subset else "loss_vs_cost.png")
    if subset or args.figure:  # a selection's figure, or another figure: the folder's files keep every run
        records = select_runs(borrowed + own, select, args.baseline, folder)
        fits = budget_fits(records)
        if args.figure == "multiplier":
            plot_multiplier(result_rows(records, baseline), baseline, styles(records), plot)
        else:
            plot_report(records, result_rows(records, baseline), baseline, plot)
    else:
        records, fits = write_results(folder, plot, args.baseline, borrowed)
    print_summary(records, fits, baseline, twins)
    print(f"plot: {plot}")
    return records

def select_runs(records, select, named, folder):
    """The runs --variants, --budget_steps and --seeds select, in the order of --variants. The baseline stays
    at every budget (of the selected seeds): the effective-compute ratios read its whole curve. A baseline
    named by --baseline must have runs here; the default may be missing (a learning-rate grid has none)."""
    require(records, f"no finished runs (<run>/run.json) in {folder}")
    variant, budget, seed = (lambda r: r.run.variant, lambda r: r.run.train.budget_steps,
                             lambda r: r.run.train.seed)
    names = sorted(set(map(variant, records)))
    variants = select.variants or names
    budgets, seeds = select.budget_steps or set(map(budget, records)), select.seeds or set(map(seed, records))
    found = {*names, *(f"budget {budget(r)}" for r in records), *(f"seed {seed(r)}" for r in records)}
    asked = variants + [f"budget {b}" for b in select.budget_steps] + [f"seed {s}" for s in select.seeds]
    missing = [v for v in asked if v not in found]
    require(not missing, f"no finished runs of {', '.join(missing)} in {folder}")
    require(named in names + [None], f"--baseline {named}: {folder} has no runs of it (its variants: "
            f"{', '.join(names)})")
    check_settings([r.run for r in records], folder)  # the whole folder: what is missing first, then what conflicts
    baseline = named or BASELINE
    records = [r for r in records if seed(r) in seeds
               and (variant(r) == baseline or (variant(r) in variants and budget(r) in budgets))]
    keep = variants if baseline in variants else variants + [baseline]
    return sorted(records, key=lambda r: (keep.index(variant(r)), budget(r), seed(r)))

def borrowed_baseline(baseline_dir, baseline, records, folder, same=False):
    """The baseline's runs of another folder, for a study that extends it (results/depth8_layouts reads
    results/depth8's AB) or for its schedule twins (same: the folder has its own baseline too): only if its model,
    data and budget unit are this folder's, so that the numbers compare."""
    base = [r for r in read_runs(baseline_dir) if r.run.variant == baseline]
    require(base, f"--baseline_dir {baseline_dir} has no runs of {baseline}")
    require(shape(base) == shape(records), f"--baseline_dir {baseline_dir}: its {baseline} runs have another model, "
            f"data or budget unit than {folder}'s runs")
    require(same or not any(r.run.variant == baseline for r in records), f"{folder} has runs of {baseline} "
            f"itself: drop --baseline_dir")
    return base

def shape(records):
    """What runs must share for their numbers to compare: data, budget unit, layers, width, heads, context."""
    return {(r.run.train.dataset, r.run.train.budget_unit, r.run.model.n_layer, r.run.model.n_embd, r.run.model.n_head,
             r.run.model.block_size, r.run.model.vocab_size) for r in records}

# what report reads of a run.json besides its Run (flops: only since FLOPs became the unit), and of each of its evals
RECORD_KEYS = {"run", "trained_rounds", "steps", "tokens", "epochs", "tokens_per_param", "cost", "target", "wall_s",
               "mfu", "n_params", "floor", "evals"}
EVAL_KEYS = {"rounds", "eval_applications", "val_loss"}

def read_runs(folder):
    """The records of a folder's finished runs (<run>/run.json), each checked whole (read_record)."""
    # escaped: the folder is a name, not a pattern (runs[1] is a folder, not runs1)
    return [read_record(path) for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*", "run.json")))]

def read_record(path):
    """A run.json as a Record, checked before any compute: an object with every key the report reads, its settings a
    Run, a loss at each depth it was scored at, one of them as trained. A damaged one stops with one line that says
    what is true: --resume rebuilds it from the run's last checkpoint, where there is one."""
    ckpt = os.path.join(os.path.dirname(path), "ckpt.pt")
    fix = (f"delete it, and train.py --resume rebuilds it from {ckpt}" if os.path.isfile(ckpt) else
           "delete its run folder (train.py --resume then trains the run again), or move it away")
    saved = read_json(path, fix)
    require(isinstance(saved, dict), f"{path} holds {json.dumps(saved)[:20]}, not a train.py run record: {fix}")
    missing = sorted(RECORD_KEYS - set(saved))
    require(not missing, f"{path} is not a train.py run record (no {', '.join(missing)}): {fix}")
    try:
        record = Record(saved)
        ok = all(EVAL_KEYS <= set(e) for e in record["evals"]) and any(
            e["rounds"] == record["trained_rounds"] for e in record["evals"])
    except (TypeError, KeyError, ValueError, AttributeError):  # settings that are no Run, evals no list of objects
        ok = False
    require(ok, f"{path} is not a train.py run record (its settings or evals are damaged): {fix}")
    return record

def check_settings(runs, folder, fix="report them apart"):
    """A variant's runs are averaged over seeds and read across budgets: they may differ in nothing else. Read
    as Runs, so that a setting an older run did not record counts as its default. And one budget unit per folder:
    a ratio reads a variant's cost on the baseline's curve, and costs in two units are not comparable."""
    units = sorted({run.train.budget_unit for run in runs})
    require(len(units) == 1, f"{folder} mixes budgets in {' and '.join(units)}, whose costs do not compare: "
            f"{fix} (one folder per --budget_unit)")
    settings = {}
    for run in runs:
        s = [asdict(run.model), asdict(replace(run.train, seed=0, budget_steps=0, budget=0, warmup_steps=0))]
        require(settings.setdefault(run.variant, s) == s,
                f"{folder} holds runs of {run.variant} with other settings: {fix}")

def report_folders(args, select):
    """Several folders: their runs at one budget varying a setting are one grid (e.g. the warm-up folders);
    else each folder is a study, and the figure is the headline: one panel of effective-compute ratios each."""
    require(args.plot, "several folders need --plot (where the figure goes)")
    require(not (args.baseline_dir or args.twins), "--baseline_dir and --twins go with one folder")
    require(not (select.budget_steps or select.seeds) and (args.figure == "depth" or not select.variants),
            "--variants, --budget_steps and --seeds select runs of one folder (several folders: --variants "
            "names the panels of --figure depth)")
    studies = {folder: read_runs(folder) for folder in args.folders}
    for folder, runs in studies.items():
        require(runs, f"no finished runs (<run>/run.json) in {folder}")
        check_settings([r.run for r in runs], folder)
    records = [r for runs in studies.values() for r in runs]
    if args.figure == "multiplier":  # the folders are one study: its layouts' m against k
        for folder, runs in studies.items():
            require(shape(runs) == shape(records), f"--figure multiplier pools the folders into one study: {folder}'s "
                    f"runs have another model, data or budget unit than {args.folders[0]}'s")
        check_settings([r.run for r in records], " and ".join(args.folders))
        baseline = args.baseline or BASELINE
        print_summary(records, budget_fits(records), baseline)
        plot_multiplier(result_rows(records, baseline), baseline, styles(records), args.plot)
    elif args.figure == "depth":
        variants = select.variants or ["A3B"]
        missing = [v for v in variants if not any(r.run.variant == v for r in records)]
        require(not missing, f"--variants: no folder has runs of {', '.join(missing)}")
        plot_depth(studies, variants, args.baseline or BASELINE, args.plot)
    elif grid_key(records):
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
# Records: what a run is, and what its run.json holds. train.py builds a Run and writes its record; the
# report reads the record back. Both go through these definitions, so that they cannot drift apart.

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

def plain_flops_per_token(config):
    """Training FLOPs per token of AB, the plain model with the same layers, width and context as config."""
    return flops_per_token(astuple(replace(config, signature="AB", p_skip=0.0, adapters=False, share_kv=False)))

@functools.cache  # a report asks for every run's, and each meta model takes about 20 ms to build
def flops_per_token(config_fields):
    """Training FLOPs per token of the model of GPTConfig(*config_fields) (a tuple, so that it can be cached)."""
    config = GPTConfig(*config_fields)
    with torch.device("meta"):
        model = GPT(config)
    return rins.cost_per_token(model, "flops", config.block_size)

def result_rows(records, baseline):
    """One row per run x eval depth (results.csv), with the effective-compute ratio against the
    baseline variant's final losses (mean over seeds) where it was run at two budgets or more: in the
    runs' budget unit, and in executed FLOPs (the two differ for runs budgeted in applications).

    Beside the ratio in FLOPs, k: the run's executed training FLOPs per token over the plain model AB's of
    the same shape, and m = ratio x k, the token multiplier: how many baseline tokens one of the run's tokens
    is worth. A ratio above 1 needs m > k: the extra compute per token must buy more than it costs."""
    base = [r for r in records if r.run.variant == baseline]
    two_budgets = len({r["target"] for r in base}) >= 2
    curve = [(r["target"], trained_loss(r)) for r in base] if two_budgets else None
    flops_curve = [(executed_flops(r), trained_loss(r)) for r in base] if two_budgets else None
    rows = []
    for r in records:
        t = r.run.train
        flops = executed_flops(r)
        k = flops / r["tokens"] / plain_flops_per_token(r.run.model)
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
                k=k, token_multiplier=None if flops_ratio is None else flops_ratio * k,
                budget_unit=t.budget_unit, wall_s=r["wall_s"], mfu=r["mfu"], n_params=r["n_params"]))
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

def print_summary(records, fits, baseline, twins=()):
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
              *["above floor"] * floor, *["eff. compute"] * ratio, *["in FLOPs"] * in_flops, *["k", "m"] * ratio,
              "wall_s", "MFU"]]
    for (variant, budget, rounds), g in groups.items():
        mean = lambda key, spec: mean_std(g, key, spec, std=False)
        marks = "".join(sorted({row["effective_compute_flops_bound"] for row in g}))  # m is a bound where the ratio is
        bounded = lambda key: "".join(sorted({row[key + "_bound"] for row in g})) + mean_std(g, key, ".2f")
        lines.append([variant, f"{g[0]['learning_rate']:g}", str(budget), str(rounds or "-"),
                      str(g[0]["eval_applications"]), str(len(g)), mean("steps", ".0f"),
                      mean("epochs", ".3f"), mean("tokens_per_param", ".1f"), mean_std(g, "val_loss", ".4f"),
                      *[mean_std(g, "above_floor", ".4f")] * floor, *[bounded("effective_compute")] * ratio,
                      *[bounded("effective_compute_flops")] * in_flops,
                      *[mean("k", ".2f"), marks + mean_std(g, "token_multiplier", ".2f")] * ratio,
                      mean("wall_s", ".0f"), mean("mfu", ".1%")])
    print(text_table(lines))
    if not ratio:
        print(NO_RATIO.format(baseline) + " (e.g. --budget_steps 600,1200)")
    for f in fits:
        print(f"law across budgets {','.join(map(str, f['budgets']))}, loss = beta * cost^(-c) + eps_inf "
              f"(± bootstrap std over seeds): {f['variant']}: c {f['c']:.3f} ± {f['c_std']:.3f}, "
              f"eps_inf {f['eps_inf']:.3f} ± {f['eps_inf_std']:.3f}")
    print_per_token_gains(per_token_gains(records, baseline, twins), baseline)

# a step at 1.8-2.2x the baseline's cost per token (A3B, ABAB): at budget B it sees about the baseline's tokens at B/2
TWICE_THE_COST = (1.8, 2.2)

def per_token_gains(records, baseline, twins=()):
    """What the extra rounds buy per token: the baseline's final loss (as trained) at B/2 minus a variant's at B,
    same seed, in nats, for each variant whose cost per token (cost / tokens, in the folder's unit) is about twice
    the baseline's, so that the two saw about the same tokens. Positive: the rounds bought more than the tokens
    they cost. One row per variant and budget with a pair: variant, budget_steps, the baseline's tokens per
    parameter and epochs at B, and two pairings, {seed: nats} each (a seed without its pair is left out):
      matched  against a schedule twin from `twins`: the baseline at B/2 with the variant's own warm-up in steps
               (--warmup_frac doubled), so the pair differs in the recursion alone;
      own      against the baseline at B/2 of the same study, whose warm-up is half the variant's: the gain of
               recursion plus a doubled warm-up."""
    base = [r for r in records if r.run.variant == baseline]
    if not base:
        return []
    key = lambda r: (r.run.variant, r.run.train.budget_steps, r.run.train.seed)
    per_token = lambda runs: statistics.fmean(r["cost"] / r["tokens"] for r in runs)
    own = {key(r)[1:]: trained_loss(r) for r in base}
    twin = {(*key(r)[1:], r.run.train.warmup_steps): trained_loss(r) for r in twins if r.run.variant == baseline}
    ref, rows = base[0], {}
    # "about twice", not exactly: in FLOPs the LM head is paid once per token, so A3B costs 1.97x AB at 4 x 48
    # and 1.71x at 4 x 16; a window around 2 keeps the comparison to layouts that see about the same tokens
    variants = {r.run.variant for r in records}
    cost = {v: per_token([r for r in records if r.run.variant == v]) / per_token(base) for v in variants}
    for r in records:
        variant, budget, seed = key(r)
        half = (budget // 2, seed)
        if variant == baseline or not TWICE_THE_COST[0] <= cost[variant] <= TWICE_THE_COST[1] or budget % 2:
            continue
        row = rows.setdefault((variant, budget), dict(
            variant=variant, budget_steps=budget, matched={}, own={},
            tokens_per_param=budget * ref["tokens"] / ref["steps"] / ref["n_params"],
            epochs=budget * ref["epochs"] / ref["steps"]))
        if (*half, r.run.train.warmup_steps) in twin:
            row["matched"][seed] = twin[(*half, r.run.train.warmup_steps)] - trained_loss(r)
        if half in own:
            row["own"][seed] = own[half] - trained_loss(r)
    return [row for row in rows.values() if row["matched"] or row["own"]]

def print_per_token_gains(rows, baseline):
    """The table of per_token_gains, one column per seed, a line per pairing; nothing where no variant has a pair."""
    if not rows:
        return
    seeds = sorted({seed for row in rows for kind in ("matched", "own") for seed in row[kind]})
    lines = [["variant", "budget", f"{baseline} tok/param", f"{baseline} epochs", "pairing",
              *[f"seed {s}" for s in seeds], "mean"]]
    for row in rows:
        for kind, gains in (("matched warm-up", row["matched"]), ("own warm-up", row["own"])):
            if gains:
                lines.append([row["variant"], str(row["budget_steps"]), f"{row['tokens_per_param']:.1f}",
                              f"{row['epochs']:.3f}", kind, *[f"{gains[s]:+.4f}" if s in gains else "-" for s in seeds],
                              f"{statistics.fmean(gains.values()):+.4f}"])
    print(f"\nper-token gain of recursion: {baseline}'s final val loss at budget B/2 minus the variant's at B, same "
          f"seed, in nats (about the same tokens; > 0: the extra rounds bought more than their tokens cost); "
          f"variants at 1.8-2.2x {baseline}'s cost per token; tok/param and epochs: {baseline}'s at B. Matched "
          f"warm-up: {baseline} with the variant's warm-up in steps (--twins), the recursion alone; own warm-up: "
          f"{baseline}'s own, half the variant's, so the gain of recursion plus a doubled warm-up")
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

def write_results(folder, plot_path, named_baseline, borrowed=()):
    """results.csv (one row per run x depth), budget_fits.json (where a law was fitted) and the plot, rebuilt from
    every finished run in the folder (and `borrowed`: the baseline of another folder, --baseline_dir); returns its
    records (ordered by select_runs) and the fits.

    Under the folder's lock (folder_lock): a process writes its run's record before it rebuilds these files, and
    reads the records once it holds the lock, so whoever writes them last has read every finished run, however
    processes training into one folder and reports overlap."""
    require(os.path.isdir(folder), f"{folder} is not a folder of runs (<run>/run.json)")
    with folder_lock(folder):
        records = select_runs([*borrowed, *read_runs(folder)], Selection([], [], []), named_baseline, folder)
        baseline = named_baseline or BASELINE
        rows, fits = result_rows(records, baseline), budget_fits(records)
        write_csv(rows, os.path.join(folder, "results.csv"))
        fits_path = os.path.join(folder, "budget_fits.json")
        if fits:
            write_atomic(fits_path, json.dumps(fits, indent=1).encode())
        elif os.path.exists(fits_path):  # an earlier, larger set of runs had one: it no longer describes these
            os.remove(fits_path)
        plot_report(records, rows, baseline, plot_path or os.path.join(folder, "loss_vs_cost.png"))
    return records, fits

def write_csv(rows, path):
    """rows (dicts with the same keys) as a CSV file with a header, written whole or not at all."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, table.getvalue().encode())

@contextlib.contextmanager
def folder_lock(folder):
    """Hold the lock of a folder's own files (results.csv, budget_fits.json, the plot) for the block: flock on the
    folder itself, so that no lock file is left among the results. The OS releases it when its process ends."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for another writer: rebuilding the files takes a second or two
        yield
    finally:
        os.close(fd)  # and with it the lock

# -----------------------------------------------------------------------------
# Figures: each answers one question and reads at the README's width (about 830 px: figures are drawn 8.3
# inches wide with 9-point text and saved at 190 dpi, at most 1600 px). A layout (signature and stochastic
# rounds) has one colour and marker, the same in every figure; the variants of one layout (other adapters,
# rate, batch) differ in line style and in the marker's fill; an open marker is a bound.

LAYOUT_STYLES = {"AB": ("black", "o"), "A2B": ("tab:blue", "s"), "A3B": ("tab:red", "^"), "A4B": ("tab:olive", ">"),
                 "ABAB": ("tab:green", "D"), "(A3B)2": ("tab:brown", "X"), "AB3": ("tab:pink", "<"),
                 "A3B p_skip 0.5": ("tab:orange", "v"), "A3B p_skip 0.8": ("tab:purple", "P"),
                 "A2BCDEFGH": ("tab:cyan", "h"), "A2BCD": ("navy", "p"), "AB2CD": ("teal", "d"),
                 "ABC2D": ("goldenrod", "H"), "ABCD2": ("magenta", "8"), "A3BCD": ("sienna", "^"),
                 "AB2": ("slateblue", "<")}
OTHER_STYLE = ("tab:gray", "*")
LINE_STYLES = ("-", ":", "-.", (0, (6, 2, 1, 2)))  # not "--": a dashed line is at 1 round
FILL_STYLES = ("full", "top", "bottom", "left")  # not "none": an open marker is a bound (plot_ratio)
GRID_KEYS = {"learning_rate": "learning rate", "warmup_frac": "warm-up (fraction of the AB budget)"}
WIDTH, DPI = 8.3, 190  # inches, dots per inch: 1577 px; shown at 830 px, matplotlib's 10-point text reads as such
DATASETS = {"shakespeare_char": "Shakespeare (char)", "shakespeare_gpt2": "Shakespeare (BPE)", "grammar": "grammar"}

def layout(record):
    return layout_name(record.run.model.signature, record.run.model.p_skip)

def layout_name(signature, p_skip):
    """'A3B', 0.5 -> 'A3B p_skip 0.5': a layout is its signature and its stochastic rounds (eval_siglip.py's
    figures use it too); its variants (adapters, rate, batch) share its colour and marker."""
    return signature + (f" p_skip {p_skip:g}" if p_skip else "")

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

# a variant's settings as a legend writes them; the learning rate is left out (tuned per layout: results.csv
# and the table give it), and a setting at its default is not written
SHORT = {"p_skip": "p_skip {}", "adapters": "+ adapters", "adapter_rank": "adapter rank {}", "share_kv": "shared KV",
         "batch_size": "batch {}", "block_size": "context {}"}

def short(variant):
    """'A3B:p_skip=0.8:adapters=1:learning_rate=0.01' -> 'A3B, p_skip 0.8 + adapters': a legend's name."""
    signature, *settings = variant.split(":")
    words = [SHORT[k].format(v) for k, v in (s.split("=", 1) for s in settings) if k in SHORT and v not in ("0", "")]
    return ", ".join([signature] + [" ".join(words)] * bool(words)).replace(", + adapters", " + adapters")

def legend_names(records):
    """variant -> its legend name: short(variant), with its learning rate where two variants would share a name."""
    names = {r.run.variant: short(r.run.variant) for r in records}
    shared = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {v: n + (f", lr {next(r.run.train.learning_rate for r in records if r.run.variant == v):g}"
                    if n in shared else "") for v, n in names.items()}

def legend_below(fig, axes, **kw):
    """One legend for the figure, under its panels: a legend drawn over the lines hides the points it names. A
    label drawn in several panels (the same variant) is listed once."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=columns(fig, handles), **kw)

def cells(records):
    """variant -> budget_steps (ascending) -> its runs (over seeds), the variants in the order of the records."""
    out = {}
    for r in records:
        out.setdefault(r.run.variant, {}).setdefault(r.run.train.budget_steps, []).append(r)
    return {variant: dict(sorted(by_budget.items())) for variant, by_budget in out.items()}

def seeds(groups):
    """'2 seeds' or '2-3 seeds': how many runs each point of a line averages, said in the legend."""
    n = sorted({len(g) for g in groups})
    return f"{n[0]}" + (f"-{n[-1]}" if len(n) > 1 else "") + (" seed" if n == [1] else " seeds")

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

def log_ticks(ax, values, axis="x"):
    """A labelled tick at each value on a log axis (one spanning under a decade would label at most one)."""
    ticks = apart(values)
    getattr(ax, f"set_{axis}ticks")(ticks, [tick_label(t) for t in ticks])
    getattr(ax, f"set_{axis}ticks")([], minor=True)

def tick_label(value):
    """0.25, 6.4, 52, 1002: two significant digits below 10, whole numbers up to 10,000 (no 1e+03)."""
    return f"{value:.2g}" if value < 10 or value >= 1e4 else f"{value:.0f}"

def columns(fig, labels):
    """How many legend columns fit the figure's width: a 10-point character is about 0.085 inches wide, and a
    column also holds the marker and a gap (about 5 characters)."""
    return max(1, min(4, int(fig.get_figwidth() / ((max(map(len, labels)) + 5) * 0.085))))

def new_figure(panels, title, height=3.6, sharey=False):
    from matplotlib.figure import Figure  # no pyplot: no display, no global state
    fig = Figure(figsize=(WIDTH if panels > 1 else 5.5, height), layout="constrained")
    fig.suptitle(title)
    return fig, fig.subplots(1, panels, squeeze=False, sharey=sharey)[0]

def save(fig, path):
    """Written atomically, as every result is: an interrupted report leaves the previous figure whole."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI))

def describe(records, sep=", "):
    """The data and the model of a study, for a title: 'Shakespeare (char), 8 x 24, 59.9k params'."""
    r = records[0]
    m = r.run.model
    data = DATASETS.get(r.run.train.dataset, r.run.train.dataset)
    return f"{data}{sep}{m.n_layer} layers x {m.n_embd}, {r['n_params'] / 1000:.3g}k params"

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
    labels = legend_names(records)
    # the legend under the panels takes a line per two names: the figure grows with it, the panels do not shrink
    fig, (loss, rounds, ratio) = new_figure(3, describe(records), height=3.4 + 0.2 * len(labels))
    style = styles(records)
    spent = {r.run.name: executed_flops(r) for r in records}  # once: an older run's is rebuilt from its counts
    for variant, by_budget in cells(records).items():
        flops = [statistics.fmean(spent[r.run.name] for r in runs) for runs in by_budget.values()]
        final = [[trained_loss(r) for r in runs] for runs in by_budget.values()]
        loss.errorbar(flops, [np.mean(f) for f in final], yerr=[spread(f) for f in final], capsize=3, ms=5,
                      label=f"{labels[variant]} ({seeds(final)})", **style[variant])
    if records[0]["floor"] is not None:
        loss.axhline(records[0]["floor"], color="grey", linestyle="--", linewidth=1, label="exact floor (entropy)")
    by_budget = {}
    for r in records:
        by_budget.setdefault(r.run.train.budget_steps, []).append(spent[r.run.name])
    # ticks in units of a power of ten, so that five budgets' labels fit a third of the figure
    ticks, scale = apart([statistics.fmean(f) for f in by_budget.values()], 0.25), 10 ** math.floor(math.log10(
        min(spent.values())))
    loss.set(xscale="log", xlabel=f"training FLOPs (x {scale:.0e})", ylabel="final validation loss (nats/token)",
             xlim=(min(spent.values()) / 1.5, max(spent.values()) * 1.5))  # room around the points, at one budget too
    loss.set_xticks(ticks, [tick_label(t / scale) for t in ticks])
    loss.set_xticks([], minor=True)
    plot_rounds(rounds, records, style)
    plot_ratio(ratio, rows, baseline, style, "effective-compute ratio")
    # one legend: the variants as the loss panel names them, and the ratio panel's lines at one round
    pairs = [*zip(*loss.get_legend_handles_labels()), *((h, label) for h, label in zip(
        *ratio.get_legend_handles_labels()) if label.endswith("1 round"))]
    fig.legend(*zip(*pairs), loc="outside lower center", ncol=columns(fig, [label for _, label in pairs]),
               title="dashed: at 1 round; dotted: a model without rounds; open marker: a bound beyond the baseline's "
               "budgets")
    save(fig, path)

def plot_rounds(ax, records, style):
    """The largest budget's final val loss at each rounds run at inference: a flat line is a model without
    rounds (the level to read the others against); rounds 1 of a recursive model costs what AB does."""
    # the largest budget a recursive layout ran at (a baseline-only budget has no rounds to show)
    top = max(r.run.train.budget_steps for r in [r for r in records if r["trained_rounds"]] or records)
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
    ax.set(xlabel="rounds at inference", ylabel="final validation loss", xticks=range(1, 6),
           title=f"at {top} AB steps")

def ratio_lines(rows, baseline):
    """(variant, at one round?) -> budget -> its rows over seeds: each variant as trained, and a stochastic one
    also at one round, the baseline's inference cost, where the paper's "no regret" is read."""
    lines = {}
    for row in rows:
        stochastic_one = row["rounds"] == 1 and "p_skip" in row["variant"]
        if row["variant"] != baseline and (row["trained"] or stochastic_one):
            lines.setdefault((row["variant"], not row["trained"]), {}).setdefault(row["budget_steps"], []).append(row)
    return {key: dict(sorted(by_budget.items())) for key, by_budget in lines.items()}

def plot_ratio(ax, rows, baseline, style, title, only=None):
    """The effective-compute ratio in FLOPs at each budget (x: the budget's baseline tokens per parameter),
    mean ± std over seeds; dashed: stochastic layouts evaluated at one round; open markers: bounds.
    only: the (variant, at one round?) lines to draw (default all), each in its style as given."""
    if rows[0]["effective_compute_flops"] is None:
        ax.text(0.5, 0.5, f"no ratio: it needs\n{baseline} at two budgets", ha="center", va="center",
                transform=ax.transAxes)
        ax.set(xticks=[], yticks=[], title=title)
        return
    for (variant, one_round), by_budget in ratio_lines(rows, baseline).items():
        if only and (variant, one_round) not in only:
            continue
        # x is the budget's *baseline* tokens per parameter, the same for every layout at a budget: a recursive
        # layout sees fewer tokens (A3B about half), and plotting its own would shift its points left
        x = [ab_tokens_per_param(rows, baseline, b) for b in by_budget]
        y = [[row["effective_compute_flops"] for row in g] for g in by_budget.values()]
        s = {**style[variant], "linestyle": "--" if one_round and not only else style[variant]["linestyle"]}
        ax.errorbar(x, [np.mean(v) for v in y], yerr=[spread(v) for v in y], capsize=3, ms=5,
                    label=short(variant) + (", 1 round" if one_round else ""), **s)
        # past the baseline's largest (or below its smallest) budget the ratio is only a bound: an open marker
        bound = [any(row["effective_compute_flops_bound"] for row in g) for g in by_budget.values()]
        ax.plot([a for a, b in zip(x, bound) if b], [np.mean(v) for v, b in zip(y, bound) if b], linestyle="",
                marker=s["marker"], ms=7, color=s["color"], markerfacecolor="white", zorder=3)
    ax.axhline(1.0, color="grey", linewidth=1, linestyle=":")
    ax.set(xscale="log", xlabel=f"{baseline} tokens per parameter", ylabel=f"ratio in FLOPs (> 1: ahead of {baseline})",
           title=title)
    log_ticks(ax, [ab_tokens_per_param(rows, baseline, row["budget_steps"]) for row in rows])

def plot_headline(studies, baseline, path):
    """How far is each layout from the baseline at equal training compute, and how does that move with the
    tokens each parameter sees? One panel per study, each with its own budgets, the same ratio axis."""
    fig, axes = new_figure(len(studies), f"effective-compute ratio against {baseline} at equal training FLOPs "
                           "(mean ± std over seeds)", height=4.4, sharey=True)
    for ax, records in zip(axes, studies.values()):  # line and fill: within a panel's layouts
        plot_ratio(ax, result_rows(records, baseline), baseline, styles(records), describe(records, "\n"))
    for ax in axes[1:]:
        ax.set_ylabel("")
    legend_below(fig, axes, title="dashed: at 1 round; open marker: a bound beyond the baseline's budgets")
    save(fig, path)

def plot_depth(studies, variants, baseline, path):
    """Does depth move the ratio? One panel per variant (a stochastic one at one round), one line per study,
    each a depth: the variant's colour, and a line style and marker fill per study."""
    fig, axes = new_figure(len(variants), f"effective-compute ratio against {baseline} by depth at equal "
                           "training FLOPs (mean ± std over seeds)", height=4.0, sharey=True)
    for ax, variant in zip(axes, variants):
        one_round, ticks = "p_skip" in variant, []
        for n, records in enumerate(studies.values()):
            rows = result_rows(records, baseline)
            if variant not in {row["variant"] for row in rows}:
                continue
            style = {**styles(records)[variant], "linestyle": LINE_STYLES[n]}
            m = records[0].run.model
            ax.plot([], [], label=f"{m.n_layer} layers x {m.n_embd} ({records[0]['n_params'] / 1000:.3g}k)",
                    color="black", linestyle=LINE_STYLES[n])
            plot_ratio(ax, rows, baseline, {variant: style}, short(variant) + (", 1 round" if one_round else ""),
                       only={(variant, one_round)})
            ticks += [ab_tokens_per_param(rows, baseline, row["budget_steps"]) for row in rows]
        log_ticks(ax, ticks)  # every study's budgets, not only the last one drawn
    for ax in axes[1:]:
        ax.set_ylabel("")
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels()) if "layers" in label}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=len(handles),
               title="open marker: a bound beyond the baseline's budgets")
    save(fig, path)

def plot_multiplier(rows, baseline, style, path):
    """How much is a layout's token worth? The token multiplier m = ratio x k against k, the layout's training
    FLOPs per token over the baseline's, one point per layout (mean ± std over seeds), one panel per budget.
    Above the line m = k a layout beats the baseline at equal compute; on m = 1 its extra compute buys nothing."""
    trained = [row for row in rows if row["trained"] and row["variant"] != baseline and row["k"] is not None]
    budgets = sorted({row["budget_steps"] for row in trained})
    fig, axes = new_figure(len(budgets), f"token multiplier m = ratio x k against k, {baseline} = 1 "
                           "(mean ± std over seeds)", height=4.4, sharey=True)
    for ax, budget in zip(axes, budgets):
        by_variant = {}
        for row in trained:
            if row["budget_steps"] == budget:
                by_variant.setdefault(row["variant"], []).append(row)
        for i, (variant, g) in enumerate(sorted(by_variant.items(), key=lambda item: item[1][0]["k"])):
            k, m = np.mean([row["k"] for row in g]), [row["token_multiplier"] for row in g]
            nudge = 1 + 0.012 * (i % 4 - 1.5)  # layouts of one k side by side, not on top of each other
            bound = any(row["effective_compute_flops_bound"] for row in g)
            s = {**style[variant], "linestyle": "", "markerfacecolor": "white" if bound else None}  # points, no lines
            ax.errorbar([k * nudge], [np.mean(m)], yerr=[spread(m)], capsize=3, ms=6, label=short(variant), **s)
        ks = np.linspace(1, max(row["k"] for row in trained) * 1.05, 2)
        ax.plot(ks, ks, color="grey", linestyle="--", linewidth=1, label="m = k: as good as AB at equal compute")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="m = 1: extra rounds buy nothing")
        ax.set(title=f"{budget} {baseline} steps\n{ab_tokens_per_param(rows, baseline, budget):.0f} tokens/param",
               xlabel=f"k: FLOPs/token over {baseline}")
    axes[0].set_ylabel(f"m: {baseline} tokens one token is worth")
    legend_below(fig, axes)
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
    fig, (ax,) = new_figure(1, f"{describe(records)}, {budget} AB steps", height=4.6)
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
    legend_below(fig, [ax])
    save(fig, path)

if __name__ == "__main__":
    main()
