"""
A synthetic language with an exactly known loss floor: i.i.d. sentences from a fixed, unambiguous
probabilistic context-free grammar (PCFG), with clauses inside clauses.

Why: offline we only have Shakespeare (4.6M characters), so long training runs repeat it. This
module makes unlimited fresh text whose true entropy per token is computed exactly, so a trained
model's validation loss reads as "nats above the floor". The nesting is recursive and
self-similar (the same rules at every depth), like the clause structure of natural language.

The grammar at a glance (n, m: number sg/pl; c, d, e: noun class person/animal/thing/food):

    S        -> CL .                                  "." ends every sentence and appears nowhere else
    CL       -> DET SUBJ | if CL then CL | either CL or CL | when CL , CL | ...   connectives pair like brackets
    SUBJ     -> ADJ SUBJ | NOUN_n_c POST_n_c VP_n_c   the verb agrees with its subject in number, suits its class...
    POST_n_c -> (nothing) | that RB_n_c | PREP_d OBJ_d   ...across a relative clause or a phrase ("near the door")
    RB_n_c   -> VP_n_c | DET GAP_c                    "that chases the cat" | "that the cats chase _"
    GAP_c    -> ADJ GAP_c | NOUN_m_e POST_m_e TV_m_c  the gap is the head: the verb takes objects of class c
    VP_n_c   -> IV_n_c MOD | v OBJ_v | CV_n that CL   intransitive | each transitive verb v | "says that"
    MOD      -> (nothing) | ADV | PREP_d OBJ_d        "sleeps", "sleeps here", "sleeps near the door"
    OBJ_x    -> DET OBJN_x ;  OBJN_x -> ADJ OBJN_x | NOUN_m_x POST_m_d   a noun phrase of class d

Word lists (WORDS, inflected by `add_s`): NOUN_n_c, IV_n_c (intransitive verbs that subjects of
class c use), TV_n_c (transitive verbs whose object is of class c; v above is one of them, in its
number-n form), CV_n (verbs like "says", person subjects only), PREP_d, ADJ, ADV, DET. Each list is
drawn with Zipf weights 1/rank^1.3, as words are in real text. The object OBJ_v of a verb v draws
the nouns of its class in v's own order of preference; the object OBJ_d of a preposition in the
class's usual order. `grammar_rules` writes all rules out. Example sentences:
"the dog that the old teachers feed sleeps ." / "when his friend says that the cats near the door
bark , some cake rots ."

Design choices, so that the data is neither trivial nor made for one architecture:
  * Unambiguous by construction: the grammar is LL(1) (Grammar() checks it and raises otherwise),
    so each string has exactly one derivation, and a sentence's entropy is its derivation's, an
    expectation computed exactly (`statistics`). `parse` recovers the derivation.
  * What a model must track across nesting: the number and class of each pending subject, to
    predict its verb after a relative clause or phrase ("the dog that the cats chase *barks*",
    "the dogs near the door *bark*"), the class of a relativised head, to predict the verb that
    closes an object relative ("the cake that the boys *eat*"), and which connective is open
    ("if ... *then*", "either ... *or*"). These are stack-like, centre-embedded dependencies.
  * What is local and learnable without any nesting: determiner -> adjective -> noun, noun ->
    verb, verb -> object noun (each verb has its own favourite objects, two or three tokens away).
    A bigram model gets part of this, a transformer with a few tokens of context most of it. This
    share is large on purpose, so that the loss is not decided by recursion alone (which would
    trivially favour weight-tied iteration). The word lists (528 types) and Zipf weights were
    sized so that the floor sits near 2.8 nats/token, the bigram model about 0.65 nats above it
    and an add-k trigram model hardly better than the bigram: much to learn beyond n-grams.
  * Nesting is shallow on average with a geometric tail, like text: most sentences embed 0-2
    clauses, a few many. The presets differ only in the three embedding probabilities of PRESETS.

Numbers: floors and expectations exact (`statistics`); n-gram losses (`ngram_loss`, add-0.1
smoothing) of count models fitted on 5M tokens (seed 1), scored on 1M tokens (seed 2):

    preset        floor (nats/token)  tokens/sentence  clauses/sentence  mean depth  unigram  bigram  trigram
    grammar       2.766               13.8             2.42              0.86        4.614    3.425   3.422
    grammar_deep  2.739               26.3             5.12              2.43        4.624    3.450   3.416

The floor is the loss of a model that sees the whole sentence so far; a training window that
starts mid-sentence costs a little more on its first tokens.

Use:
    g = make_grammar("grammar")                     # or "grammar_deep"
    ids = generate(g, 1_000_000, seed=0)            # uint16 token ids, i.i.d. sentences back to back
    vocabulary(g)[ids[0]], entropy_per_token(g)     # a word, and the loss floor in nats per token
    parse(g, ids[:list(ids).index(g.end) + 1])      # the first sentence's derivation (rule ids)
"""

import numpy as np

# -----------------------------------------------------------------------------
# The language: words and probabilities. Nouns and verbs are listed in their base form; the
# plural noun and the singular (3rd person) verb are made by adding -s (see `add_s`).

CLASSES = ("person", "animal", "thing", "food")
NUMBERS = ("sg", "pl")
WORDS = {
    "noun": {
        "person": "teacher farmer doctor child man woman king queen friend girl boy sailor baker singer student "
                  "neighbour soldier judge poet nurse pilot driver thief painter stranger prince uncle aunt guest",
        "animal": "dog cat horse bird mouse fox wolf cow goat rabbit duck frog bear lion tiger owl pig hen snake "
                  "bee monkey donkey eagle whale spider crow camel parrot turtle",
        "thing": "book stone box chair table lamp key ring cup hat coat bag ball door window clock knife ship car "
                 "bell drum rope shoe mirror candle basket letter coin map",
        "food": "apple bread cake egg pear plum cheese soup pie cherry lemon onion carrot melon grape peach potato "
                "tomato cookie bean nut olive biscuit pepper sandwich fig orange cabbage pumpkin",
    },
    # intransitive verbs, by the class of the subject that uses them (a verb may serve several classes)
    "intransitive": {
        "person": "sleep laugh sing work smile wait dance cry talk run travel pray sigh shout",
        "animal": "sleep run jump hide growl swim bark howl crawl sniff fly purr",
        "thing": "fall shine roll rust sink float crack glow shake vanish",
        "food": "rot melt cool burn spoil freeze ripen fall",
    },
    # transitive verbs, by the class of their object (each verb takes one class of object)
    "transitive": {
        "person": "meet help follow call visit thank blame trust admire greet warn praise invite forgive",
        "animal": "feed chase hunt catch tame ride pet wash train scare",
        "thing": "hold find carry drop lift push steal mend paint throw open sell",
        "food": "eat cook bake taste share peel slice chew swallow boil fry buy",
    },
    "complement": "say think know believe hope fear hear dream feel claim suspect forget remember admit doubt",
    "adjective": "old young big small red green blue black white happy sad tall short strong weak brave clever "
                 "lazy quiet loud hungry angry tired poor rich little dark bright heavy gentle wild cold warm "
                 "empty famous strange kind proud shy busy grey yellow tiny huge noisy clean dirty sleepy",
    "adverb": "here there today again often slowly quickly quietly loudly alone early late outside together",
    # prepositions, by the class of their object
    "preposition": {"person": "with for beside", "animal": "like after", "thing": "under on behind near into"},
    "determiner": "the his her their some no",  # all of them fit both numbers
}
# clause connectives, which open and close a clause like brackets: "if CL then CL", "when CL , CL"
CONNECTIVES = [("if", "then"), ("either", "or"), ("when", ","), ("because", ","), ("although", ",")]
IRREGULAR_PLURALS = {"child": "children", "man": "men", "woman": "women", "mouse": "mice", "wolf": "wolves",
                     "thief": "thieves", "knife": "knives", "potato": "potatoes", "tomato": "tomatoes"}

P_NUMBER = {"sg": 0.6, "pl": 0.4}
P_SUBJECT_CLASS = {"person": 0.4, "animal": 0.3, "thing": 0.15, "food": 0.15}
# how often a subject of class c (row) acts on an object of class d (column), for transitive verbs
P_OBJECT_CLASS = {"person": {"person": 0.35, "animal": 0.2, "thing": 0.3, "food": 0.15},
                  "animal": {"person": 0.3, "animal": 0.35, "thing": 0.1, "food": 0.25},
                  "thing": {"person": 0.4, "animal": 0.3, "thing": 0.3, "food": 0.0},
                  "food": {"person": 0.5, "animal": 0.5, "thing": 0.0, "food": 0.0}}
P_INTRANSITIVE = {"person": 0.35, "animal": 0.5, "thing": 0.6, "food": 0.8}  # the rest: transitive (or "says that")
P_ADJECTIVE = 0.25        # one more adjective before the noun (a geometric number of them)
P_MODIFIER = {"none": 0.4, "adverb": 0.3, "phrase": 0.3}  # after an intransitive verb: "sleeps here", "... near X"
P_NOUN_PHRASE = 0.15      # a noun takes a phrase: "the dog near the door"
P_PHRASE_CLASS = {"person": 0.35, "animal": 0.2, "thing": 0.45}  # the class of the noun in a phrase
P_OBJECT_RELATIVE = 0.4   # "that the cats chase _" rather than "that chases the cats"
ZIPF_EXPONENT = 1.3       # the k-th word of a list has weight 1 / k**ZIPF_EXPONENT

# The two presets differ only in how often a clause embeds another one.
PRESETS = {
    # P(a noun takes a relative clause), P(a person's verb phrase is "says that ..."), P(a clause is "if ..., ...")
    "grammar": dict(p_relative=0.3, p_complement=0.2, p_subordinate=0.1),
    "grammar_deep": dict(p_relative=0.45, p_complement=0.35, p_subordinate=0.2),
}

def make_grammar(name="grammar"):
    """The preset `name` ("grammar" or "grammar_deep") as a compiled, checked Grammar."""
    if name not in PRESETS:
        raise ValueError(f"unknown grammar {name!r}: choose one of {sorted(PRESETS)}")
    clauses = ["CL"] + [f"RB_{n}_{c}" for n in NUMBERS for c in CLASSES]
    return Grammar(grammar_rules(**PRESETS[name]), clauses=clauses, name=name)

def grammar_rules(p_relative, p_complement, p_subordinate):
    """All rules as (lhs, rhs, weight) triples: the schema of the module docstring, written out."""
    return (syntax_rules(p_relative, p_complement, p_subordinate)
            + [(lhs, [word], w) for lhs, word_list in word_lists().items() for word, w in zipf(word_list)])

def syntax_rules(p_relative, p_complement, p_subordinate):
    """The rules of the nonterminals above the words."""
    rules = [("S", ["CL", "."], 1), ("CL", ["DET", "SUBJ"], 1 - p_subordinate),
             *[("CL", [opener, "CL", closer, "CL"], p_subordinate * w) for (opener, closer), w in zipf(CONNECTIVES)],
             ("SUBJ", ["ADJ", "SUBJ"], P_ADJECTIVE),
             ("MOD", [], P_MODIFIER["none"]), ("MOD", ["ADV"], P_MODIFIER["adverb"]),
             *[("MOD", [f"PREP_{d}", f"OBJ_{d}"], P_MODIFIER["phrase"] * p) for d, p in P_PHRASE_CLASS.items()]]
    for c in CLASSES:
        rules += object_rules(c, c)  # the object of a preposition
        for verb in words("transitive", c):
            rules += object_rules(verb, c)
        rules += [(f"GAP_{c}", ["ADJ", f"GAP_{c}"], P_ADJECTIVE)]
        for n in NUMBERS:
            p_noun = (1 - P_ADJECTIVE) * P_NUMBER[n]
            rules += [("SUBJ", [f"NOUN_{n}_{c}", f"POST_{n}_{c}", f"VP_{n}_{c}"], p_noun * P_SUBJECT_CLASS[c]),
                      (f"POST_{n}_{c}", [], 1 - p_relative - P_NOUN_PHRASE),
                      (f"POST_{n}_{c}", ["that", f"RB_{n}_{c}"], p_relative),
                      *[(f"POST_{n}_{c}", [f"PREP_{d}", f"OBJ_{d}"], P_NOUN_PHRASE * p)
                        for d, p in P_PHRASE_CLASS.items()],
                      (f"RB_{n}_{c}", [f"VP_{n}_{c}"], 1 - P_OBJECT_RELATIVE),
                      (f"RB_{n}_{c}", ["DET", f"GAP_{c}"], P_OBJECT_RELATIVE)]
            # the subject (n, e) of an object relative uses a verb whose object is the head's class c
            rules += [(f"GAP_{c}", [f"NOUN_{n}_{e}", f"POST_{n}_{e}", f"TV_{n}_{c}"],
                       p_noun * P_SUBJECT_CLASS[e] * P_OBJECT_CLASS[e][c]) for e in CLASSES]
            p_says = p_complement if c == "person" else 0
            p_intransitive = (1 - p_says) * P_INTRANSITIVE[c]
            p_transitive = 1 - p_says - p_intransitive
            rules += [(f"VP_{n}_{c}", [f"IV_{n}_{c}", "MOD"], p_intransitive),
                      (f"VP_{n}_{c}", [f"CV_{n}", "that", "CL"], p_says)]
            rules += [(f"VP_{n}_{c}", [verb_form(verb, n), f"OBJ_{verb}"], p_transitive * P_OBJECT_CLASS[c][d] * w)
                      for d in CLASSES for verb, w in zipf(words("transitive", d))]
    return rules

def word_lists():
    """{preterminal: its words, most frequent first}."""
    lists = {"DET": words("determiner"), "ADJ": words("adjective"), "ADV": words("adverb"),
             **{f"PREP_{d}": words("preposition", d) for d in P_PHRASE_CLASS},
             **{f"CV_{n}": [verb_form(v, n) for v in words("complement")] for n in NUMBERS}}
    for c in CLASSES:
        nouns, verbs = words("noun", c), words("transitive", c)
        for n in NUMBERS:
            lists[f"NOUN_{n}_{c}"] = [noun_form(w, n) for w in nouns]
            lists[f"IV_{n}_{c}"] = [verb_form(v, n) for v in words("intransitive", c)]
            lists[f"TV_{n}_{c}"] = [verb_form(v, n) for v in verbs]
        for j, verb in enumerate(verbs):  # the j-th verb's favourite objects: the nouns from number j*N/J on
            start = j * len(nouns) // len(verbs)
            for n in NUMBERS:
                lists[f"NOUN_{n}_{verb}"] = [noun_form(w, n) for w in nouns[start:] + nouns[:start]]
    return lists

def object_rules(key, c):
    """OBJ_key: a noun phrase of class c whose noun comes from the word list NOUN_sg_key or NOUN_pl_key."""
    return [(f"OBJ_{key}", ["DET", f"OBJN_{key}"], 1), (f"OBJN_{key}", ["ADJ", f"OBJN_{key}"], P_ADJECTIVE),
            *[(f"OBJN_{key}", [f"NOUN_{n}_{key}", f"POST_{n}_{c}"], (1 - P_ADJECTIVE) * P_NUMBER[n]) for n in NUMBERS]]

def words(*keys):
    """A word list of WORDS, e.g. words("noun", "animal")."""
    entry = WORDS
    for key in keys:
        entry = entry[key]
    return entry.split()

def zipf(items):
    """[(item, probability)]: the k-th item (from 1) has probability proportional to 1 / k**ZIPF_EXPONENT."""
    weights = 1 / np.arange(1, len(items) + 1) ** ZIPF_EXPONENT
    return list(zip(items, weights / weights.sum()))

def noun_form(noun, number):
    """Plural nouns get -s ..."""
    return add_s(noun) if number == "pl" else noun

def verb_form(verb, number):
    """... and singular verbs."""
    return add_s(verb) if number == "sg" else verb

def add_s(word):
    """Plural of a noun or 3rd person singular of a verb: dog -> dogs, box -> boxes, cry -> cries."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"

# -----------------------------------------------------------------------------
# A compiled grammar

class Grammar:
    """A PCFG compiled to arrays, checked to be LL(1) (hence unambiguous) and to make finite sentences.

    rules: (lhs, rhs, weight) triples; a symbol is a nonterminal iff it is some rule's lhs, every
    other symbol is a word (a terminal). Weights are normalised per lhs; zero-weight rules dropped.
    The start symbol's rules must end with the end token, which may appear nowhere else, so that
    a stream of sentences splits unambiguously at it. `clauses`: the nonterminals that open a
    clause (for the nesting statistics).

    Symbol ids: words 0..V-1 (these are the token ids), then the nonterminals. Rule ids index
    lhs / rhs / prob; a nonterminal's rules have consecutive ids (sampling relies on it).
    """

    def __init__(self, rules, start="S", end=".", clauses=(), name="custom"):
        rules = [(lhs, tuple(rhs), float(w)) for lhs, rhs, w in rules if w > 0]
        nonterminals = list(dict.fromkeys(lhs for lhs, _, _ in rules))
        is_nonterminal = set(nonterminals)
        self.words = list(dict.fromkeys(s for _, rhs, _ in rules for s in rhs if s not in is_nonterminal))
        self.name, self.names = name, self.words + nonterminals
        self.n_words = V = len(self.words)
        ids = {s: i for i, s in enumerate(self.names)}
        rules.sort(key=lambda r: ids[r[0]])  # stable: a nonterminal's rules keep their order
        self.lhs = np.array([ids[lhs] for lhs, _, _ in rules])
        self.rhs = [tuple(ids[s] for s in rhs) for _, rhs, _ in rules]
        weight = np.array([w for _, _, w in rules])
        self.prob = weight / np.bincount(self.lhs - V, weights=weight)[self.lhs - V]
        self.start, self.end = ids[start], ids[end]
        self.clauses = [ids[c] for c in clauses]
        self._check_sentence_end()
        self.mean_matrix = self._mean_matrix()
        radius = np.abs(np.linalg.eigvals(self.mean_matrix)).max()
        if radius >= 1:
            raise ValueError(f"grammar {name!r}: the expected number of children has spectral radius {radius:.3f} "
                             f">= 1, so sentences are infinitely long on average: lower the nesting probabilities")
        self.table = ll1_table(self)
        self._compile_sampler()

    def _check_sentence_end(self):
        for r, rhs in enumerate(self.rhs):
            is_start = self.lhs[r] == self.start
            if self.start in rhs or self.end in rhs[:-1] or (rhs[-1:] == (self.end,)) != is_start:
                raise ValueError(f"rule {self.rule_str(r)}: the end token {self.words[self.end]!r} must end "
                                 f"every sentence and appear nowhere else, and the start symbol in no rhs")

    def _mean_matrix(self):
        """M[A, B] = expected number of B's among the children of one A (nonterminals only)."""
        V, K = self.n_words, len(self.names) - self.n_words
        M = np.zeros((K, K))
        for r, rhs in enumerate(self.rhs):
            for s in rhs:
                if s >= V:
                    M[self.lhs[r] - V, s - V] += self.prob[r]
        return M

    def _compile_sampler(self):
        """Flat arrays for `sample_sentences`: every symbol is rewritten by one rule per step.

        Words get an extra "copy" rule (word -> word, ids R..R+V-1) so that one gather rewrites a
        whole array. Nonterminal k's rules are chosen by one searchsorted of k + u (u uniform in
        [0, 1)) into `cum`, which holds k + (cumulative probability) for each of k's rules.
        """
        V, R = self.n_words, len(self.rhs)
        rhs = self.rhs + [(w,) for w in range(V)]
        self.rhs_len = np.array([len(x) for x in rhs], dtype=np.int32)
        self.rhs_start = np.concatenate([[0], np.cumsum(self.rhs_len)[:-1]]).astype(np.int32)
        self.rhs_flat = np.array([s for x in rhs for s in x], dtype=np.int32)
        self.copy_rule = np.concatenate([R + np.arange(V), np.zeros(len(self.names) - V, int)]).astype(np.int32)
        k = self.lhs - V
        self.cum = k + np.concatenate([np.cumsum(self.prob[k == i]) for i in range(k.max() + 1)])
        self.last_rule = (np.searchsorted(k, np.arange(k.max() + 1), side="right") - 1).astype(np.int32)
        self.cum[self.last_rule] = np.arange(k.max() + 1) + 1.0  # exact ends despite rounding

    def rule_str(self, r):
        return f"{self.names[self.lhs[r]]} -> {' '.join(self.names[s] for s in self.rhs[r]) or '(nothing)'}"

def ll1_table(g):
    """{(nonterminal, next word): rule}: the LL(1) parse table, or ValueError on a conflict.

    Standard construction: a rule A -> x is chosen when the next word is in FIRST(x), or, if x can
    derive nothing, in FOLLOW(A). No two rules of A may share a next word; that makes parsing
    deterministic, and a grammar with a deterministic parser has one derivation per string.
    -1 marks the end of the input.
    """
    V = g.n_words
    nullable, first = set(), {A: set() for A in set(g.lhs)}

    def first_of(seq):
        """(FIRST set of the sequence, whether it can derive nothing)."""
        out = set()
        for s in seq:
            if s < V:
                return out | {s}, False
            out |= first[s]
            if s not in nullable:
                return out, False
        return out, True

    changed = True
    while changed:  # fixed point of FIRST and nullable
        changed = False
        for A, rhs in zip(g.lhs, g.rhs):
            f, empty = first_of(rhs)
            if not f <= first[A] or (empty and A not in nullable):
                first[A] |= f
                nullable |= {A} if empty else set()
                changed = True
    follow = {A: set() for A in first}
    follow[g.start].add(-1)
    changed = True
    while changed:  # fixed point of FOLLOW
        changed = False
        for A, rhs in zip(g.lhs, g.rhs):
            for i, B in enumerate(rhs):
                if B >= V:
                    f, empty = first_of(rhs[i + 1:])
                    f = f | follow[A] if empty else f
                    if not f <= follow[B]:
                        follow[B] |= f
                        changed = True
    table = {}
    for r, (A, rhs) in enumerate(zip(g.lhs, g.rhs)):
        f, empty = first_of(rhs)
        for a in f | follow[A] if empty else f:
            if (A, a) in table:
                word = g.words[a] if a >= 0 else "end of input"
                raise ValueError(f"grammar {g.name!r} is not LL(1): before {word!r}, {g.rule_str(table[A, a])} "
                                 f"and {g.rule_str(r)} both apply")
            table[A, a] = r
    return table

# -----------------------------------------------------------------------------
# Exact expectations

def entropy_per_token(g):
    """The entropy rate of the stream of i.i.d. sentences, in nats per token: the best possible loss."""
    return statistics(g)["entropy_per_token"]

def statistics(g):
    """Exact expectations per sentence, by linear algebra over the grammar (no sampling).

    A branching process: with M the mean matrix (M[A, B] = expected B-children of an A), the
    expected number of times each nonterminal is expanded in a sentence is n = e_S (I - M)^-1, and
    the expected number of words below one A is L = (I - M)^-1 t (t[A]: expected words that A writes
    directly). Because the grammar is unambiguous, a sentence's entropy is its derivation's: the sum
    of the entropies of all the choices made, sum_A n[A] H[A] (word choices included, as rules of
    preterminals). Sentences are i.i.d. and "." marks where they end, so the stream's entropy rate
    is H(sentence) / E[tokens per sentence] (renewal-reward), "." counted as a token.

    Nesting: "clauses_per_sentence" counts the clause nonterminals expanded (the main clause too);
    "mean_depth" is the expected number of clauses a token is embedded in below the main clause,
    averaged over tokens: sum_clause n[A] L[A] minus the tokens of the main clause, over E[tokens].
    """
    V, K = g.n_words, len(g.names) - g.n_words
    I_M = np.eye(K) - g.mean_matrix
    choice_entropy = np.bincount(g.lhs - V, weights=-g.prob * np.log(g.prob), minlength=K)
    direct_words = np.bincount(g.lhs - V, weights=g.prob * np.array([sum(s < V for s in x) for x in g.rhs]),
                               minlength=K)
    n = np.linalg.solve(I_M.T, np.eye(K)[g.start - V])
    L = np.linalg.solve(I_M, direct_words)
    length = L[g.start - V]
    clause = np.array(g.clauses, dtype=int) - V
    sentence_entropy = n @ choice_entropy
    return {"entropy_per_token": sentence_entropy / length, "entropy_per_sentence": sentence_entropy,
            "tokens_per_sentence": length, "clauses_per_sentence": n[clause].sum(),
            "mean_depth": (n[clause] @ L[clause] - (length - 1)) / length if len(clause) else 0.0}

# -----------------------------------------------------------------------------
# Sampling

SENTENCES_PER_BATCH = 4096

def generate(g, n_tokens, seed):
    """Exactly n_tokens token ids (uint16): i.i.d. sentences back to back, the last one cut off.

    Deterministic for a seed; generate(g, n, s) is a prefix of generate(g, m, s) for n < m,
    because sentences are made in fixed-size batches from one random stream.
    """
    if g.n_words > 2 ** 16:
        raise ValueError(f"{g.n_words} words do not fit uint16 token ids")
    rng = np.random.default_rng(seed)
    chunks, total = [], 0
    while total < n_tokens:
        chunks.append(sample_sentences(g, SENTENCES_PER_BATCH, rng).astype(np.uint16))
        total += len(chunks[-1])
    return np.concatenate(chunks)[:n_tokens] if chunks else np.zeros(0, np.uint16)

def sample_sentences(g, n_sentences, rng):
    """n_sentences i.i.d. sentences, concatenated, as an int32 array of token ids.

    Speed: instead of expanding one tree node at a time in Python (microseconds each), rewrite
    all sentences at once, one level of their derivation trees per step, with numpy: every
    nonterminal in the array gets a random rule, every symbol is replaced by its rule's right-
    hand side (words by themselves). Sentences with nothing left to expand are set aside, so the
    few deep ones do not keep the whole batch busy; at the end they are put back in their original
    order (finishing order depends on depth, and the stream must not be sorted by it).
    """
    V = g.n_words
    seq = np.full(n_sentences, g.start, dtype=np.int32)
    sentence = np.arange(n_sentences, dtype=np.int32)  # which sentence each symbol belongs to
    done_tokens, done_sentence = [], []
    while seq.size:
        is_nonterminal = seq >= V
        done = np.bincount(sentence, weights=is_nonterminal, minlength=n_sentences)[sentence] == 0
        if done.any():
            done_tokens.append(seq[done])
            done_sentence.append(sentence[done])
            seq, sentence, is_nonterminal = seq[~done], sentence[~done], is_nonterminal[~done]
            if not seq.size:
                break
        rule = g.copy_rule[seq]
        k = seq[is_nonterminal] - V
        # (the minimum: k + u can round up to k + 1 when u is within 1e-16 of 1)
        rule[is_nonterminal] = np.minimum(np.searchsorted(g.cum, k + rng.random(k.size), side="right"),
                                          g.last_rule[k])
        length = g.rhs_len[rule]
        end = np.cumsum(length)
        # output position j of symbol i's right-hand side reads rhs_flat[rhs_start[rule_i] + j - start_i]
        offset = np.repeat(g.rhs_start[rule] - (end - length), length)
        seq = g.rhs_flat[offset + np.arange(end[-1])]
        sentence = np.repeat(sentence, length)
    order = np.argsort(np.concatenate(done_sentence), kind="stable")
    return np.concatenate(done_tokens)[order]

# -----------------------------------------------------------------------------
# Parsing

def parse(g, tokens):
    """The derivation of one sentence (token ids, "." last): its rule ids in leftmost (pre-)order.

    Raises ValueError if the tokens are not a sentence of the language. Table-driven LL(1)
    parsing, which is recursive descent with an explicit stack (no recursion limit on depth):
    the next token alone decides each rule, so there is never a choice to undo.
    """
    tokens = [int(t) for t in tokens]
    stack, pos, derivation = [g.start], 0, []
    while stack:
        symbol = stack.pop()
        lookahead = tokens[pos] if pos < len(tokens) else -1
        if symbol < g.n_words:
            if symbol != lookahead:
                raise ValueError(f"not a sentence: expected {g.words[symbol]!r} at position {pos}")
            pos += 1
            continue
        rule = g.table.get((symbol, lookahead))
        if rule is None:
            raise ValueError(f"not a sentence: no rule of {g.names[symbol]} starts at position {pos}")
        derivation.append(rule)
        stack.extend(reversed(g.rhs[rule]))
    if pos != len(tokens):
        raise ValueError(f"not a sentence: the sentence ends at position {pos - 1}, before the input does")
    return derivation

def derive(g, derivation):
    """The token ids a leftmost derivation (rule ids, as `parse` returns) writes; inverse of `parse`."""
    stack, tokens = [g.start], []
    for rule in derivation:
        while stack and stack[-1] < g.n_words:
            tokens.append(stack.pop())
        if not stack or stack.pop() != g.lhs[rule]:
            raise ValueError(f"rule {g.rule_str(rule)} does not rewrite the leftmost nonterminal")
        stack.extend(reversed(g.rhs[rule]))
    if any(s >= g.n_words for s in stack):
        raise ValueError("incomplete derivation: nonterminals are left")
    return np.array(tokens + stack[::-1], dtype=np.int64)

def vocabulary(g):
    """The token strings, id -> word ("." is id 0), in order of first appearance in the rules."""
    return list(g.words)

# -----------------------------------------------------------------------------
# Baselines

def ngram_loss(train_ids, val_ids, n, vocab_size, alpha=0.1):
    """Validation cross-entropy (nats/token) of an n-gram count model fitted on train_ids.

    Add-alpha smoothing: p(w | context) = (count(context, w) + alpha) / (count(context) + alpha V),
    with context the previous n-1 tokens. Scored on every validation token that has n-1 tokens
    before it (so val_ids[n-1:]).
    """
    train, val = ngram_keys(train_ids, n, vocab_size), ngram_keys(val_ids, n, vocab_size)
    joint = count_in(train, val)
    context = count_in(train // vocab_size, val // vocab_size)
    return float(-np.mean(np.log((joint + alpha) / (context + alpha * vocab_size))))

def ngram_keys(ids, n, vocab_size):
    """Each n-gram of ids as one int64, base vocab_size."""
    ids = np.asarray(ids, dtype=np.int64)
    if vocab_size ** n >= 2 ** 63:
        raise ValueError(f"{n}-grams over {vocab_size} words do not fit int64 keys")
    keys = np.zeros(len(ids) - n + 1, dtype=np.int64)
    for i in range(n):
        keys = keys * vocab_size + ids[i:len(ids) - n + 1 + i]
    return keys

def count_in(keys, queries):
    """How often each query occurs among keys."""
    unique, counts = np.unique(keys, return_counts=True)
    i = np.minimum(np.searchsorted(unique, queries), len(unique) - 1)
    return np.where(unique[i] == queries, counts[i], 0)
