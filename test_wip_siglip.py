"""Tests of eval_siglip.py, each against an independent computation. Run: python -m pytest test_wip_siglip.py"""

import gzip
import math
import struct

import numpy as np
import pytest
import torch

import eval_siglip as es
from data.prepare import gpt2_encoding


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


def test_siglip_starts_at_the_papers_temperature_and_bias():
    model = es.SigLIP(es.rins.GPTConfig(n_layer=2, n_head=2, n_embd=16, causal=False),
                      es.rins.GPTConfig(n_layer=2, n_head=2, n_embd=16, causal=False), 1, 7, 10, 4)
    assert model.log_t.exp().item() == pytest.approx(10.0)
    assert model.b.item() == -10.0


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


def test_bad_inputs_give_one_clear_error_line(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        es.load_dataset("imagenet", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        es.load_dataset("fashion", str(tmp_path / "missing"))
    for argv, expected in [(["--data-dir", str(tmp_path / "missing")], "apt-get install dataset-fashion-mnist"),
                           (["--dataset", "imagenet"], "unknown dataset"),
                           (["--dataset", "shapes", "--variants", "AB,A0B"], "repeat count 0"),
                           (["--dataset", "shapes", "--variants", "A3B@half"], "p_skip"),
                           (["--dataset", "shapes", "--patch", "5"], "must divide")]:
        with pytest.raises(SystemExit) as e:
            es.main(argv)
        message = str(e.value.code)
        assert expected in message and "\n" not in message, message


def pattern_images(n, rng):
    """A synthetic set of 4 classes of noisy 28 x 28 patterns: horizontal stripes, vertical stripes,
    a checkerboard, a bright centre."""
    yy, xx = np.mgrid[:28, :28]
    patterns = np.stack([yy % 2 == 0, xx % 2 == 0, (yy // 2 + xx // 2) % 2 == 0, abs(yy - 13.5) + abs(xx - 13.5) < 9])
    labels = rng.integers(len(patterns), size=n)
    images = patterns[labels] * rng.uniform(120, 255, (n, 1, 1)) + rng.uniform(0, 60, (n, 28, 28))
    return torch.from_numpy(images.clip(0, 255).astype(np.uint8)).unsqueeze(1), torch.from_numpy(labels).long()


@pytest.mark.parametrize("task, variant", [("siglip", ("AB", 0.0)), ("siglip", ("A2B", 0.5)), ("control", ("A2B", 0.0))])
def test_tiny_run_rises_above_chance_within_its_budget(task, variant):
    rng = np.random.default_rng(0)
    train_images, train_labels = pattern_images(2000, rng)
    data = {"name": "quadrants", "train": (train_images, train_labels, torch.zeros_like(train_labels)),
            "tests": {"test": pattern_images(400, rng)},
            "descriptions": [["sun"], ["moon"], ["tree"], ["house"]]}
    args = es.parse_args(["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "64",
                          "--lr", "3e-3", "--device", "cpu", "--recurse", "both"])
    tokens = es.tokenize_captions(data["descriptions"])
    torch.manual_seed(0)
    model, towers = es.build(task, variant, args, data, tokens)
    tokens_per_step = 64 * (16 + (tokens[0].size(-1) if task == "siglip" else 0))  # patches (+ caption tokens)
    budget = 60 * 2 * tokens_per_step  # 60 steps of AB over 2 layers
    log, curve = es.train(model, towers, task, data, tokens, budget, args, seed=0, desc="test")
    # compute matching (RINS.md §3) by hand: A2B over 2 layers runs units A, A, B; the middle one is skipped
    # with probability p_skip, so a step is expected to cost 3 - p_skip applications per token
    applications = {"AB": 2, "A2B": 3 - variant[1]}[variant[0]]
    assert log["planned_steps"] == round(budget / (applications * tokens_per_step))
    assert log["target"] == pytest.approx(log["planned_steps"] * applications * tokens_per_step)
    # it stops once the executed cost reaches the budget (rounded to whole planned steps)
    assert log["target"] <= log["cost"] < log["target"] + 3 * tokens_per_step
    assert len(curve) == log["steps"]
    for rounds in (1, None):
        scores, _ = es.evaluate(model, task, data, tokens, rounds, "cpu")
        assert scores["test"] > 0.6, (rounds, scores)  # chance is 0.25
