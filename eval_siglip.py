"""
A small SigLIP (sigmoid-loss image-text model) with RINS towers, trained and scored zero-shot.

An image tower (ViT) and a text tower, both rins.Transformer stacks with bidirectional attention and
their own signature; the sigmoid loss over all image-text pairs; zero-shot classification with prompt
embeddings averaged over templates. The paper reports +2% zero-shot ImageNet for RINS in SigLIP-B/16
and no gain in pure image classification, so every comparison here also trains a vision-only
control: the same image tower as a classifier.

Variants ("AB,A3B,A3B:p_skip=0.5", the syntax of train.py) are compared at the same training compute,
counted in executed FLOPs (or layer applications x tokens) summed over the towers, and scored at 1x (rounds=1, the
baseline's inference cost) and at full depth. Optimisation as train.py: AdamW (rins.adamw), the rsqrt
schedule with cool-down (rins.learning_rate), the warm-up the same number of steps for every variant.

Data, all offline:
  fashion  Fashion-MNIST from the Debian package (apt-get install dataset-fashion-mnist). Captions are
           class names through TRAIN_TEMPLATES; zero-shot uses the disjoint EVAL_TEMPLATES on the
           10,000 test images.
  shapes   procedurally drawn coloured shapes at four positions. Training holds out some (shape,
           colour) combinations; the "unseen" test split holds only those, classified among all
           combinations, so it measures generalisation through text.

    python eval_siglip.py                                   # CPU default: AB, A3B, A3B:p_skip=0.5, seed 0
    python eval_siglip.py --dataset shapes --seeds 0,1,2
    python eval_siglip.py --seeds 0,1,2 --out_dir results/siglip   # how results/siglip was made

Results go to --out_dir (default out/siglip): <dataset>.csv, .json and .png; every finished run is
checkpointed in --out_dir/ckpt/ and reused when the same run is asked for again.

Batch 64 by default: with ten distinct captions, the loss first pulls every embedding to one point
(all pairs at the same logit) and only then separates the classes; in our runs smaller batches left
that plateau after far fewer examples than batches of 256.
"""

import argparse
import gzip
import json
import math
import os
import re
import time
from collections import namedtuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

import rins
from data.prepare import gpt2_encoding, write_atomic
from report import DPI, LAYOUT_STYLES, OTHER_STYLE, WIDTH, layout_name, short, write_csv

# -----------------------------------------------------------------------------
# Captions. Zero-shot must not see the training sentences, so the two template sets are disjoint.

TRAIN_TEMPLATES = ("a photo of a {}.", "a picture of the {}.", "an image of a {}.", "a {}.",
                   "a small photo of the {}.", "this is a {}.", "a close-up picture of a {}.")
EVAL_TEMPLATES = ("the {} in a photo.", "here is a {}.", "a picture that shows a {}.",
                  "an image showing the {}.", "one {}.")

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 1.0),
           "yellow": (1.0, 0.9, 0.1), "purple": (0.6, 0.1, 0.8), "cyan": (0.1, 0.9, 0.9)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
IMAGE_SIZE = 28  # both datasets, so one tower configuration serves both

def held_out(shape, colour):
    """The (shape, colour) combinations no training image shows: one per colour, and every shape
    and every colour still appears in training with others, so the test is solvable via text."""
    return (colour - shape) % len(SHAPES) == 0

# -----------------------------------------------------------------------------
# Data: every dataset is a dict with
#   train: (images uint8 (N, C, H, W), labels (N,), phrases (N,))
#   tests: {split name: (images, labels)}
#   descriptions: per class, a list of phrases; a training caption is a training template around
#     descriptions[label][phrase]; a class's zero-shot prompt embedding is the mean over all its
#     phrases x EVAL_TEMPLATES.

def load_dataset(name, data_dir):
    if name == "fashion":
        return load_fashion(data_dir)
    if name == "shapes":
        return make_shapes()
    raise SystemExit(f"error: unknown dataset {name!r}: choose 'fashion' (Fashion-MNIST) or 'shapes' (compositional)")

def read_idx(path):
    """An IDX file (the MNIST format) as a numpy array; gzipped if the name ends in .gz."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
        ndim = raw[3]
        shape = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
        assert raw[:3] == b"\x00\x00\x08"  # magic: two zero bytes, dtype code 0x08 (uint8), then ndim
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, IndexError, ValueError, AssertionError) as e:
        raise SystemExit(f"error: {path} is not a readable IDX file of unsigned bytes ({type(e).__name__}): "
                         f"reinstall with '{FASHION_INSTALL}' or pass another --data_dir")

def load_fashion(data_dir):
    paths = []
    for name in FASHION_FILES:
        found = [p for p in (os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz")) if os.path.isfile(p)]
        if not found:
            raise SystemExit(f"error: Fashion-MNIST not found: no file {name}[.gz] in {data_dir}: install it with "
                             f"'{FASHION_INSTALL}' or pass --data_dir to a folder with the four IDX files")
        paths.append(found[0])
    x_train, y_train, x_test, y_test = (torch.from_numpy(read_idx(p).copy()) for p in paths)
    return {"name": "fashion",
            "train": (x_train.unsqueeze(1), y_train.long(), torch.zeros_like(y_train, dtype=torch.long)),
            "tests": {"test": (x_test.unsqueeze(1), y_test.long())},
            "descriptions": [[c] for c in FASHION_CLASSES]}

def make_shapes(n_train=30000, n_test=2000, seed=0):
    """The compositional set. Class = (shape, colour); the caption also names the position.

    The data seed is fixed, so every run and every variant sees the same images.
    """
    rng = np.random.default_rng(seed)
    classes = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    seen = [k for k, (s, c) in enumerate(classes) if not held_out(s, c)]
    unseen = [k for k, (s, c) in enumerate(classes) if held_out(s, c)]

    def split(class_pool, n):
        labels = rng.choice(class_pool, size=n)
        positions = rng.integers(len(POSITIONS), size=n)
        images = draw_shapes([classes[k] for k in labels], positions, rng)
        return torch.from_numpy(images), torch.from_numpy(labels).long(), torch.from_numpy(positions).long()

    train = split(seen, n_train)
    tests = {"unseen": split(unseen, n_test)[:2], "seen": split(seen, n_test)[:2]}
    colour_names = list(COLOURS)
    descriptions = [[f"{colour_names[c]} {SHAPES[s]} at the {p}" for p in POSITIONS] for s, c in classes]
    return {"name": "shapes", "train": train, "tests": tests, "descriptions": descriptions}

def draw_shapes(shape_colours, positions, rng):
    """uint8 images (N, 3, 28, 28): one filled shape per image in the named quadrant, with jittered
    size, centre and brightness on a noisy dark background."""
    n, half = len(positions), IMAGE_SIZE // 2
    cy = (positions // 2) * half + half / 2 + rng.uniform(-2, 2, n)  # POSITIONS: top/bottom x left/right
    cx = (positions % 2) * half + half / 2 + rng.uniform(-2, 2, n)
    r = rng.uniform(3.5, 5.5, n)
    grid = np.arange(IMAGE_SIZE) + 0.5
    dy = (grid[None, :, None] - cy[:, None, None]) / r[:, None, None]  # (N, H, 1), in units of r
    dx = (grid[None, None, :] - cx[:, None, None]) / r[:, None, None]  # (N, 1, W)
    masks = {"circle": dx ** 2 + dy ** 2 <= 1,
             "square": (abs(dx) <= 0.8) & (abs(dy) <= 0.8),
             "triangle": (dy <= 0.8) & (abs(dx) <= (dy + 1) / 2),  # apex up
             "cross": ((abs(dx) <= 0.3) & (abs(dy) <= 1)) | ((abs(dy) <= 0.3) & (abs(dx) <= 1)),
             "diamond": abs(dx) + abs(dy) <= 1}
    shape_idx = np.array([s for s, _ in shape_colours])
    mask = np.stack([masks[name] for name in SHAPES])[shape_idx, np.arange(n)]  # (N, H, W)
    rgb = np.array(list(COLOURS.values()))[[c for _, c in shape_colours]] * rng.uniform(0.7, 1.0, (n, 1))
    images = rng.uniform(0, 0.15, (n, 3, IMAGE_SIZE, IMAGE_SIZE))
    images = np.where(mask[:, None], rgb[:, :, None, None], images)
    return (images * 255).round().astype(np.uint8)

# -----------------------------------------------------------------------------
# Text: GPT-2 BPE, renumbered to the tokens the captions use.
# The captions and prompts are known in advance and use a few dozen of GPT-2's 50257 tokens. The
# text tower sees exactly the GPT-2 token sequences, but its embedding table has one row per token
# that occurs (plus padding) instead of 50257: on CPU that saves a 50257 x n_embd table and the
# optimizer's pass over it every step, and no prediction head over the vocabulary is needed.

PAD = 0

Captions = namedtuple("Captions", "train prompts vocab")  # what tokenize_captions returns

def tokenize_captions(descriptions):
    """(train_tokens (classes, descriptions, TRAIN_TEMPLATES, L), prompt_tokens (classes, prompts, L), vocab).

    vocab[i - 1] is the GPT-2 id of compact token i; 0 is padding. Every class has the same
    number of descriptions, so the tensors are rectangular.
    """
    enc = gpt2_encoding()
    train = [[[enc.encode_ordinary(t.format(d)) for t in TRAIN_TEMPLATES] for d in ds] for ds in descriptions]
    prompts = [[enc.encode_ordinary(t.format(d)) for d in ds for t in EVAL_TEMPLATES] for ds in descriptions]
    sequences = [s for c in train for d in c for s in d] + [s for c in prompts for s in c]
    vocab = sorted({i for s in sequences for i in s})
    compact = {g: i + 1 for i, g in enumerate(vocab)}
    L = max(map(len, sequences))
    pad = lambda s: [compact[i] for i in s] + [PAD] * (L - len(s))
    train_tokens = torch.tensor([[[pad(s) for s in d] for d in c] for c in train])
    prompt_tokens = torch.tensor([[pad(s) for s in c] for c in prompts])
    return Captions(train_tokens, prompt_tokens, vocab)

# -----------------------------------------------------------------------------
# Model

class ImageTower(nn.Module):
    """ViT: linear patch embedding, learned positions, rins.Transformer, mean pooling, projection.

    The vision-only control is this same tower with out_dim = number of classes.
    """

    def __init__(self, config, in_chans, patch, out_dim):
        super().__init__()
        self.config, self.patch = config, patch
        self.n_patches = (IMAGE_SIZE // patch) ** 2
        self.patch_embed = nn.Linear(in_chans * patch * patch, config.n_embd)
        self.pos = nn.Parameter(torch.zeros(1, self.n_patches, config.n_embd))
        self.transformer = rins.Transformer(config)
        self.proj = nn.Linear(config.n_embd, out_dim)

    def forward(self, images, rounds=None):
        B, C, H, W = images.shape
        p = self.patch
        x = images.float() / 127.5 - 1.0  # pixels to [-1, 1], as big_vision
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, self.n_patches, C * p * p)
        # rounds sets the recursive block; a tower without one (AB in the other tower) runs its whole schedule
        x = self.transformer(self.patch_embed(x) + self.pos, rounds=rounds if self.config.recursive else None)
        return self.proj(x.mean(dim=1))  # global average pooling, as big_vision's pool_type="gap"

class TextTower(nn.Module):
    """Token and position embeddings, rins.Transformer, mean over the non-padding tokens, projection."""

    def __init__(self, config, vocab_size, length, out_dim):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.pos = nn.Parameter(torch.zeros(1, length, config.n_embd))
        self.transformer = rins.Transformer(config)
        self.proj = nn.Linear(config.n_embd, out_dim)

    def forward(self, tokens, rounds=None):
        # no attention mask: the padding is a fixed token after the caption, as in big_vision's text tower
        x = self.transformer(self.wte(tokens) + self.pos, rounds=rounds if self.config.recursive else None)
        keep = (tokens != PAD).unsqueeze(-1).float()
        return self.proj((x * keep).sum(1) / keep.sum(1))

class SigLIP(nn.Module):

    def __init__(self, image_config, text_config, in_chans, patch, vocab_size, text_len):
        super().__init__()
        d = image_config.n_embd
        self.image = ImageTower(image_config, in_chans, patch, d)
        self.text = TextTower(text_config, vocab_size, text_len, d)
        self.text.transformer.skip_rng.manual_seed(torch.initial_seed() + 1)  # its own draws of skipped rounds
        self.log_t = nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP: t = exp(log_t), t0 = 10
        self.b = nn.Parameter(torch.tensor(-10.0))                # b0 = -10: most pairs are negatives

    def forward(self, images, tokens):
        img = F.normalize(self.image(images), dim=-1)
        txt = F.normalize(self.text(tokens), dim=-1)
        return sigmoid_loss(img, txt, self.log_t, self.b)

def sigmoid_loss(img, txt, log_t, b):
    """SigLIP's loss for n pairs of unit vectors: -sum over all n^2 pairs of log sigmoid(label * logit),
    label +1 on the diagonal and -1 elsewhere, logit = t * cos + b; divided by n as in the paper."""
    n = img.size(0)
    logits = img @ txt.t() * log_t.exp() + b
    labels = 2 * torch.eye(n, device=img.device) - 1
    return -F.logsigmoid(labels * logits).sum() / n

def class_embeddings(prompt_emb):
    """(classes, prompts, D) -> (classes, D): the mean of the normalised prompt embeddings, renormalised (CLIP)."""
    return F.normalize(F.normalize(prompt_emb, dim=-1).mean(dim=1), dim=-1)

def zero_shot_predict(image_emb, class_emb):
    """The class whose text embedding has the highest cosine with the image (t > 0 and b do not change it)."""
    return (F.normalize(image_emb, dim=-1) @ class_emb.t()).argmax(dim=-1)

def init_weights(model, n_layer):
    """rins.init_gpt2 (GPT-2 initialisation, adapters at identity), and N(0, 0.02) positions."""
    rins.init_gpt2(model, n_layer)
    for name, p in model.named_parameters():
        if name.endswith("pos"):
            nn.init.normal_(p, mean=0.0, std=0.02)

# -----------------------------------------------------------------------------
# Compute matching, as train.py: a step costs its towers' costs (rins.cost_per_token) x their tokens.
# [our choice] The FLOPs are the towers' stacks; the patch embedding, the projections and the classifier,
# the same for every variant, are left out.

def step_cost(towers, unit, executed=False):
    """The cost of one training step: expected (for the plan) or, with executed=True, what the last
    forward ran. towers: (tower, tokens per step) pairs, as build gives them."""
    def counts(t):  # what t's last forward ran: rins.Transformer.forward leaves its counts on the module
        return (t.applications, t.adapters_run, t.kv_reuses) if executed else None
    return sum(rins.cost_per_token(tower.transformer, unit, tower.config.block_size, counts(tower.transformer))
               * tokens for tower, tokens in towers)

def baseline_budget(task, args, data, tokens):
    """Every run's compute budget: what the baseline AB costs in --budget_steps steps."""
    _, towers = build(task, ("A", {}), args, data, tokens)  # "A": n_layer applications for any n_layer
    return args.budget_steps * step_cost(towers, args.budget_unit)

def plan(towers, budget, args):
    """(steps, target, warmup_steps) of a run: train.py's rule (rins.plan_budget)."""
    return rins.plan_budget(budget, step_cost(towers, args.budget_unit), args.budget_steps, args.warmup_frac)

# -----------------------------------------------------------------------------
# One run: train a SigLIP or a control under a budget, then score it at 1x and full depth

def build(task, variant, args, data, tokens):
    """The model of one run, and its towers as (module, tokens per step) for the cost count.

    variant: (signature, settings) from rins.parse_variant; the recursed tower(s) get both, the other AB.
    """
    signature, settings = variant
    n_classes = len(data["descriptions"])
    in_chans = data["train"][0].size(1)
    n_patches = (IMAGE_SIZE // args.patch) ** 2

    def config(recursed, length):
        return rins.GPTConfig(block_size=length, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                              causal=False, **(dict(signature=signature, **settings) if recursed else {}))

    image_config = config(args.recurse in ("image", "both"), n_patches)
    if task == "control":
        model = ImageTower(image_config, in_chans, args.patch, n_classes)
        towers = [(model, args.batch_size * n_patches)]
    else:
        train_tokens, _, vocab = tokens
        text_len = train_tokens.size(-1)
        text_config = config(args.recurse in ("text", "both"), text_len)
        model = SigLIP(image_config, text_config, in_chans, args.patch, len(vocab) + 1, text_len)
        towers = [(model.image, args.batch_size * n_patches), (model.text, args.batch_size * text_len)]
    init_weights(model, args.n_layer)
    return model, towers

def train(model, towers, task, data, tokens, budget, args, seed, desc):
    """Train until the executed cost reaches the budget, as train.py does: the steps planned from the
    expected cost, the LR schedule laid on them with the baseline's warm-up steps, a stochastic run
    stopped on the cost that executed. A nan/inf loss stops the script before any result is written."""
    device = torch.device(args.device)
    steps, target, warmup_steps = plan(towers, budget, args)
    warmup = warmup_steps / steps  # the same warm-up steps for every variant
    opt = rins.adamw(model, args.weight_decay, args.learning_rate, (args.beta1, args.beta2), device.type)
    images, labels, phrases = (t.to(device) for t in data["train"])
    train_tokens = tokens.train.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.train()
    step, cost, curve = 0, 0, []
    bar = tqdm(total=steps, desc=desc, leave=False, disable=None)  # no bar when not a terminal
    while cost < target:
        idx = torch.randint(len(labels), (args.batch_size,), generator=gen, device=device)
        with rins.autocast(device):
            if task == "siglip":
                # a fresh training template for every example at every step
                template = torch.randint(len(TRAIN_TEMPLATES), (args.batch_size,), generator=gen, device=device)
                loss = model(images[idx], train_tokens[labels[idx], phrases[idx], template])
            else:
                loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step_cost_now = step_cost(towers, args.budget_unit, executed=True)  # what executed, not the plan
        for group in opt.param_groups:  # the LR at the middle of this step
            group["lr"] = rins.learning_rate(args.learning_rate, (cost + step_cost_now / 2) / target, warmup,
                                             args.cooldown_frac)
        opt.step()
        cost += step_cost_now
        step += 1
        curve.append(round(loss.item(), 4))
        if not math.isfinite(curve[-1]):
            bar.close()
            raise SystemExit(f"error: {desc}: the loss became nan/inf at step {step}; no results were written; "
                             f"try a lower --learning_rate")
        bar.update()
        bar.set_postfix(loss=curve[-1])
    bar.close()
    return {"steps": step, "planned_steps": steps, "cost": cost, "target": target,
            "epochs": step * args.batch_size / len(labels)}, curve

@torch.no_grad()
def evaluate(model, task, data, tokens, rounds, device, batch=1000):
    """Accuracy per test split, and the layer applications each tower executed at this depth."""
    model.eval()
    if task == "siglip":
        prompts = tokens.prompts.to(device)
        prompt_emb = model.text(prompts.flatten(0, 1), rounds).view(*prompts.shape[:2], -1)
        class_emb = class_embeddings(prompt_emb.float())
    scores = {}
    trained = set(data["train"][1].tolist())
    for split, (images, labels) in data["tests"].items():
        if task == "control" and not set(labels.tolist()) <= trained:
            continue  # a classifier can only name classes it was trained on (shapes: no "unseen" split)
        preds = []
        for chunk in images.split(batch):
            chunk = chunk.to(device)
            if task == "siglip":
                preds.append(zero_shot_predict(model.image(chunk, rounds).float(), class_emb).cpu())
            else:
                preds.append(model(chunk, rounds).argmax(dim=-1).cpu())
        scores[split] = (torch.cat(preds) == labels).float().mean().item()
    image = model if task == "control" else model.image
    # each tower's last forward (at these rounds, in eval mode: every chunk alike) left its applications on
    # its Transformer (rins.Transformer.forward)
    applications = {"image_applications": image.transformer.applications,
                    "text_applications": model.text.transformer.applications if task == "siglip" else 0}
    return scores, applications

RUN_SETTINGS = ("recurse", "budget_steps", "budget_unit", "batch_size", "n_layer", "n_head", "n_embd", "patch",
                "learning_rate", "weight_decay", "beta1", "beta2", "warmup_frac", "cooldown_frac")

def run(task, name, variant, seed, args, data, tokens, budget):
    """Train and score one (task, variant, seed): (result rows, training loss per step).

    A checkpoint of the same run (the same spec) is reused instead of training again.
    """
    spec = {"dataset": data["name"], "task": task, "variant": name, "seed": seed,
            **{k: getattr(args, k) for k in RUN_SETTINGS}}
    file_name = re.sub(r"[^\w.=-]+", "_", f"{data['name']}_{task}_{name}_seed{seed}") + ".pt"
    path = os.path.join(args.out_dir, "ckpt", file_name)
    if os.path.exists(path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an empty, truncated or foreign file: it is only a cache, so train again
            print(f"{path} is not a readable checkpoint ({type(e).__name__}): training that run again")
            ckpt = {}
        if ckpt.get("spec") == spec:
            print(f"reusing {path} (same run; delete it to retrain)")
            return ckpt["rows"], ckpt["loss_curve"]
        if ckpt:
            print(f"{path} was trained with other settings: training that run again")
    torch.manual_seed(seed)  # also seeds the towers' stochastic-rounds generators (rins.Transformer)
    model, towers = build(task, variant, args, data, tokens)
    model.to(args.device)
    t0 = time.time()
    log, curve = train(model, towers, task, data, tokens, budget, args, seed, desc=f"{task} {name} seed {seed}")
    seconds = time.time() - t0
    n_classes = len(data["descriptions"])
    rows = []
    for depth, rounds in (("1x", 1), ("full", None)):
        scores, applications = evaluate(model, task, data, tokens, rounds, args.device)
        for split, accuracy in scores.items():
            rows.append({**spec, "depth": depth, "metric": f"{'zs' if task == 'siglip' else 'acc'}_{split}",
                         "accuracy": round(accuracy, 4), "chance": round(1 / n_classes, 4),
                         "image_signature": towers[0][0].config.signature,
                         "text_signature": towers[1][0].config.signature if task == "siglip" else "",
                         "p_skip": variant[1].get("p_skip", 0.0), **applications, **log, "budget": budget,
                         "train_seconds": round(seconds, 1)})
    print(f"{data['name']} {task} {name} seed {seed}: {log['steps']} steps ({log['epochs']:.2f} epochs), "
          f"{seconds:.0f} s, " + ", ".join(f"{r['metric']} {r['depth']} {r['accuracy']:.3f}" for r in rows))
    ckpt = {"spec": spec, "rows": rows, "loss_curve": curve, "model": model.state_dict(), "vocab": tokens.vocab}
    write_atomic(path, lambda f: torch.save(ckpt, f))
    return rows, curve

# -----------------------------------------------------------------------------
# Results: one CSV row per (run, depth, test split); the JSON adds the summary and the settings

def summarise(rows):
    """Mean, std and count over seeds per (task, metric, variant, depth), in the order the runs came."""
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["metric"], r["variant"], r["depth"]), []).append(r["accuracy"])
    return [{"task": t, "metric": m, "variant": v, "depth": d, "mean": float(np.mean(a)),
             "std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0, "seeds": len(a)}
            for (t, m, v, d), a in groups.items()]

def format_table(summary, chance):
    """The summary as text: one table per (task, metric), a row per variant, columns 1x and full."""
    lines = []
    for task, metric in dict.fromkeys((s["task"], s["metric"]) for s in summary):
        lines.append(f"\n{task} {metric} (chance {chance:.3f}; mean ± std over seeds)")
        lines.append(f"{'variant':<16}{'1x':>18}{'full':>18}{'seeds':>7}")
        cells = {(s["variant"], s["depth"]): s for s in summary if (s["task"], s["metric"]) == (task, metric)}
        for variant in dict.fromkeys(v for v, _ in cells):
            one, full = cells[(variant, "1x")], cells[(variant, "full")]
            lines.append(f"{variant:<16}{one['mean']:>11.3f} ± {one['std']:.3f}"
                         f"{full['mean']:>11.3f} ± {full['std']:.3f}{full['seeds']:>7}")
    return "\n".join(lines)

# what each panel measures, in words: (task, metric) -> title
PANEL_TITLES = {("siglip", "zs_test"): "zero-shot, test images", ("control", "acc_test"): "vision-only classifier",
                ("siglip", "zs_seen"): "zero-shot, seen shape-colour pairs",
                ("siglip", "zs_unseen"): "zero-shot, unseen pairs", ("control", "acc_seen"): "vision-only, seen pairs"}

def plot(summary, chance, n_layer, path):
    """Accuracy per variant, one panel per (task, metric) on one y scale: a recursive variant's bars at 1x
    (hatched) and at full depth (solid), a variant without rounds (AB) once, as both are the same model; each
    layout in the colour it has in every figure of report.py; chance dotted."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state
    from matplotlib.patches import Patch
    panels = list(dict.fromkeys((s["task"], s["metric"]) for s in summary))
    fig = Figure(figsize=(WIDTH, 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (task, metric) in zip(axes, panels):
        cells = {(c["variant"], c["depth"]): c for c in summary if (c["task"], c["metric"]) == (task, metric)}
        bars, ticks, x = [], [], 0.0  # (x, cell, depth) of every bar; (x, name) under each variant's bars
        for variant in dict.fromkeys(v for v, _ in cells):
            signature = rins.parse_variant(variant, rins.MODEL_KEYS)[0]
            rounds = rins.GPTConfig(n_layer=n_layer, n_head=1, n_embd=8, signature=signature).recursive
            depths = ("1x", "full") if rounds else ("full",)
            bars += [(x + 0.4 * k, cells[(variant, d)], d) for k, d in enumerate(depths)]
            ticks.append((x + 0.2 * (len(depths) - 1), short(variant)))
            x += 0.4 * len(depths) + 0.4
        for pos, c, depth in bars:
            colour = LAYOUT_STYLES.get(layout(c["variant"]), OTHER_STYLE)[0]
            ax.bar(pos, c["mean"], 0.38, yerr=c["std"], capsize=3, color=colour, edgecolor="white",
                   alpha=0.45 if depth == "1x" else 1.0, hatch="//" if depth == "1x" else None)
        ax.axhline(chance, color="grey", linestyle=":")
        ax.set_xticks(*zip(*ticks))
        ax.set(title=PANEL_TITLES.get((task, metric), f"{task} {metric}"), ylim=(0, 1))
    axes[0].set_ylabel("accuracy (mean ± std over seeds)")
    fig.legend(handles=[Patch(color="grey", alpha=0.45, hatch="//", label="1x (rounds 1)"),
                        Patch(color="grey", label="full depth"), Patch(color="none", label="dotted: chance")],
               loc="outside lower center", ncol=3)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    print(f"wrote {path}")

def layout(variant):
    """'A3B:p_skip=0.5' -> 'A3B p_skip 0.5': the layout whose colour report.py's figures use."""
    signature, settings = rins.parse_variant(variant, rins.MODEL_KEYS)
    return layout_name(signature, settings.get("p_skip", 0.0))

# -----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion", help="fashion (Fashion-MNIST) or shapes (compositional)")
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist", help="the Fashion-MNIST IDX files")
    p.add_argument("--variants", default="AB,A3B,A3B:p_skip=0.5",
                   help="comma-separated variants SIG[:key=value...], keys " + ", ".join(rins.MODEL_KEYS))
    p.add_argument("--recurse", default="image", choices=("image", "text", "both"),
                   help="tower(s) that get the variant's signature; the other runs AB [our choice: image]; "
                   "text needs --tasks siglip")
    p.add_argument("--tasks", default="siglip,control",
                   help="siglip, control (a vision-only classifier) or siglip,control")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--budget_steps", type=int, default=1500, help="steps of the baseline AB: every run's budget")
    p.add_argument("--budget_unit", default="flops", choices=rins.BUDGET_UNITS,
                   help="what the budget counts: executed FLOPs, or layer applications x tokens")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--patch", type=int, default=7, help="patch side in pixels; must divide 28")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--warmup_frac", type=float, default=0.05, help="warm-up steps, as a fraction of --budget_steps")
    p.add_argument("--cooldown_frac", type=float, default=0.2, help="of the run's own budget")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out_dir", default="out/siglip", help="results <dataset>.csv/.json/.png and ckpt/")
    p.add_argument("--replot", metavar="JSON", help="no training: draw a results <dataset>.json again, beside it")
    return p.parse_args(argv)

def setup(args):
    """Everything that can reject the input, before any training: flags, variants, data, the output folder,
    each run's schedule. Returns the variants, seeds, each task's compute budget, the data and captions."""
    checks = [("seeds", re.fullmatch(r"[0-9]+(,[0-9]+)*", args.seeds), "comma-separated integers, e.g. 0,1,2"),
              ("budget_steps", args.budget_steps >= 1, ">= 1"), ("batch_size", args.batch_size >= 1, ">= 1"),
              ("patch", args.patch >= 1 and IMAGE_SIZE % args.patch == 0, f"a divisor of the image size {IMAGE_SIZE}"),
              ("learning_rate", args.learning_rate > 0, "> 0"), ("weight_decay", args.weight_decay >= 0, ">= 0"),
              ("beta1", 0 <= args.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= args.beta2 < 1, "in [0, 1)"),
              ("warmup_frac", 0 < args.warmup_frac < 1, "in (0, 1)"),
              ("cooldown_frac", 0 < args.cooldown_frac < 1, "in (0, 1)"),
              ("tasks", set(args.tasks.split(",")) <= {"siglip", "control"}, "siglip, control or siglip,control"),
              ("tasks", len(set(args.tasks.split(","))) == len(args.tasks.split(",")), "without repeats"),
              ("tasks", "control" not in args.tasks or args.recurse != "text",
               "siglip alone with --recurse text (its vision-only control would be AB in every variant)")]
    for name, ok, rule in checks:
        if not ok:
            raise SystemExit(f"error: --{name} must be {rule}, got {getattr(args, name)!r}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"error: --seeds repeats a seed: {args.seeds!r}")
    try:
        rins.parse_device(args.device)
        variants = {}
        for spec in args.variants.split(","):
            signature, settings = rins.parse_variant(spec, rins.MODEL_KEYS)
            config = rins.GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                    signature=signature, **settings)  # raises ValueError naming the problem
            defaults = {k: getattr(rins.GPTConfig, k) for k in rins.MODEL_KEYS}
            name = rins.variant_name(signature, {k: getattr(config, k) for k in defaults}, defaults)
            variants[name] = (signature, settings)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if len(variants) < len(args.variants.split(",")):
        raise SystemExit(f"error: --variants repeats a variant: {args.variants!r}")
    try:
        os.makedirs(os.path.join(args.out_dir, "ckpt"), exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out_dir {args.out_dir}: {e.strerror}: choose another folder")
    data, tasks = load_dataset(args.dataset, args.data_dir), args.tasks.split(",")
    tokens = tokenize_captions(data["descriptions"])
    budgets = {task: baseline_budget(task, args, data, tokens) for task in tasks}
    for task in tasks:  # every run's warm-up and cool-down must fit its own steps, as in train.py
        for name, variant in variants.items():
            steps, _, warmup_steps = plan(build(task, variant, args, data, tokens)[1], budgets[task], args)
            if warmup_steps / steps + args.cooldown_frac > 1:
                raise SystemExit(f"error: {task} {name}: {warmup_steps} warm-up steps and a "
                                 f"{args.cooldown_frac:.0%} cool-down do not fit its {steps} steps: lower them")
    return variants, seeds, budgets, data, tokens

def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot)
    variants, seeds, budgets, data, tokens = setup(args)
    n_classes = len(data["descriptions"])
    rows, curves, out = [], [], os.path.join(args.out_dir, data["name"])
    for task, budget in budgets.items():
        for seed in seeds:
            for name, variant in variants.items():
                run_rows, curve = run(task, name, variant, seed, args, data, tokens, budget)
                rows += run_rows
                curves.append({"task": task, "variant": name, "seed": seed, "loss": curve})
    write_csv(rows, out + ".csv")
    summary = summarise(rows)
    table = format_table(summary, 1 / n_classes)
    print(table)
    results = {"args": vars(args), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "rows": rows,
               "summary": summary, "table": table, "loss_curves": curves}
    write_atomic(out + ".json", json.dumps(results, indent=1).encode())
    plot(summary, 1 / n_classes, args.n_layer, out + ".png")

def replot(path):
    """The figure of a finished comparison again, from its JSON (the summary over seeds and the settings)."""
    try:
        results = json.load(open(path))
        summary, dataset, n_layer = results["summary"], results["args"]["dataset"], results["args"]["n_layer"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise SystemExit(f"error: --replot {path}: not an eval_siglip.py results JSON ({type(e).__name__}): "
                         f"point to a <dataset>.json it wrote")
    n_classes = len(FASHION_CLASSES) if dataset == "fashion" else len(SHAPES) * len(COLOURS)
    plot(summary, 1 / n_classes, n_layer, os.path.splitext(path)[0] + ".png")

if __name__ == "__main__":
    main()
