"""In-context language learning, REGBENCH (Akyürek et al. 2024, after berlino/seq_icl's ``dfa.py``).

Each sequence gets a fresh random DFA:

- ``num_states ~ U{4..12}``, alphabet ``~ U{4..18}`` letters drawn without replacement from 18;
- each state gets ``U{1..3}`` outgoing edges with distinct symbols and distinct destinations, no
  self-loops; state 0 is initial and every state accepts;
- the DFA is minimised (Moore partition refinement, with the implicit dead state of a partial DFA)
  and trimmed to the states reachable from 0;
- ``U{10..19}`` strings, each a uniform random walk of length ``U{1..49}`` from state 0, joined by the
  separator ``|``.

Tokens: letters 0..17, ``|`` = 18, pad ``.`` = 19 (vocab 20). ``targets`` is the next token, IGNORE
where that is pad or ``|`` (the paper's loss masks the separator label). Metric (:func:`dfa_accuracy`),
the paper's ``_get_dfa_accuracy``: at every position whose true next token is a letter, the greedy
prediction counts as correct if the current partial string plus the predicted token is still accepted by
the DFA, i.e. the prediction is a letter with a transition from the current state (after a ``|``, from
state 0). Positions whose true next token is ``|`` are skipped, and a ``|`` prediction is never correct (the
DFA's alphabet has no ``|``), so always predicting ``|`` scores 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax.tasks import IGNORE, TaskBatch
from seqjax.tasks.baselines import ngram_lookup

NUM_LETTERS, SEP, PAD, VOCAB = 18, 18, 19, 20


@dataclasses.dataclass(frozen=True)
class DFA:
    """Partial DFA: ``delta[state]`` maps letter -> next state; all states accept; start state 0."""

    delta: tuple  # tuple of dicts

    @property
    def num_states(self) -> int:
        return len(self.delta)

    def accepts(self, string) -> bool:
        s = 0
        for a in string:
            if a not in self.delta[s]:
                return False
            s = self.delta[s][a]
        return True

    def walk(self, rng, length: int) -> list[int]:
        s, out = 0, []
        for _ in range(length):
            a = int(rng.choice(sorted(self.delta[s])))
            out.append(a)
            s = self.delta[s][a]
        return out


def minimize(delta: list[dict], alphabet) -> list[dict]:
    """Trim to states reachable from 0, then merge equivalent states (Moore refinement)."""
    reach, stack = {0}, [0]
    while stack:
        for nxt in delta[stack.pop()].values():
            if nxt not in reach:
                reach.add(nxt)
                stack.append(nxt)
    states = sorted(reach)
    cls = {s: 0 for s in states}  # all accept; the implicit dead state is class -1
    while True:
        sig = {s: (cls[s],) + tuple(cls[delta[s][a]] if a in delta[s] else -1 for a in alphabet) for s in states}
        ids = {v: i for i, v in enumerate(sorted(set(sig.values()), key=lambda v: min(s for s in states if sig[s] == v)))}
        new = {s: ids[sig[s]] for s in states}
        if len(set(new.values())) == len(set(cls.values())):
            cls = new
            break
        cls = new
    order = sorted(set(cls.values()), key=lambda c: min(s for s in states if cls[s] == c))
    remap = {c: i for i, c in enumerate(order)}  # class of state 0 becomes 0
    out = [dict() for _ in order]
    for s in states:
        out[remap[cls[s]]] = {a: remap[cls[n]] for a, n in delta[s].items()}
    return out


def random_dfa(rng, *, min_states=4, max_states=12, max_edges=3, min_alphabet=4, max_alphabet=NUM_LETTERS) -> DFA:
    n = int(rng.integers(min_states, max_states + 1))
    k = int(rng.integers(min_alphabet, max_alphabet + 1))
    alphabet = sorted(int(a) for a in rng.choice(NUM_LETTERS, k, replace=False))
    delta = []
    for s in range(n):
        e = int(rng.integers(1, max_edges + 1))
        e = min(e, k, n - 1)
        syms = rng.choice(alphabet, e, replace=False)
        dests = rng.choice([d for d in range(n) if d != s], e, replace=False)
        delta.append({int(a): int(d) for a, d in zip(syms, dests)})
    return DFA(tuple(minimize(delta, alphabet)))


def icll(num: int, seq_len: int = 512, *, seed: int = 0, min_strings=10, max_strings=19, max_string_len=49, **dfa_kw) -> TaskBatch:
    rng = np.random.default_rng(seed)
    inputs = np.full((num, seq_len), PAD, np.int32)
    dfas = []
    for i in range(num):
        dfa = random_dfa(rng, **dfa_kw)
        toks: list[int] = []
        for j in range(int(rng.integers(min_strings, max_strings + 1))):
            if j:
                toks.append(SEP)
            toks += dfa.walk(rng, int(rng.integers(1, max_string_len + 1)))
        toks = toks[:seq_len]
        inputs[i, : len(toks)] = toks
        dfas.append(dfa)
    targets = np.full_like(inputs, IGNORE)
    targets[:, :-1] = np.where((inputs[:, 1:] == PAD) | (inputs[:, 1:] == SEP), IGNORE, inputs[:, 1:])
    return TaskBatch(inputs, targets, vocab_size=VOCAB, meta=dfas)


def dfa_accuracy(predictions, inputs, dfas) -> float:
    """Fraction of scored positions whose predicted next token keeps the current string accepted.

    Scored: every position ``t`` whose true next token ``inputs[t + 1]`` is a letter (so the separator's own
    prediction and pad are skipped). Correct: ``predictions[t]`` is a letter with a transition from the DFA
    state reached by the current string (state 0 right after a ``|``); ``|`` and pad are never correct.
    """
    predictions, inputs = np.asarray(predictions), np.asarray(inputs)
    if predictions.shape != inputs.shape:
        raise ValueError(f"predictions must have the shape of inputs {inputs.shape}, got {predictions.shape}")
    if len(dfas) != len(inputs):
        raise ValueError(f"dfas must hold one DFA per sequence ({len(inputs)}), got {len(dfas)}")
    good = total = 0
    for pred, seq, dfa in zip(predictions, inputs, dfas):
        s = 0
        for t in range(len(seq) - 1):
            tok, nxt = int(seq[t]), int(seq[t + 1])
            if tok == PAD or nxt == PAD:
                break
            s = 0 if tok == SEP else dfa.delta[s][tok]
            if nxt == SEP:
                continue  # the end of a string is not scored
            total += 1
            good += int(int(pred[t]) in dfa.delta[s])  # SEP and PAD are never transitions
    if total == 0:
        raise ValueError("no scored positions")
    return good / total


def always_separator(inputs) -> np.ndarray:
    """The trivial predictor that always emits ``|`` (it scores 0 under :func:`dfa_accuracy`)."""
    return np.full(np.shape(inputs), SEP, np.int32)


def bigram_lookup(inputs) -> np.ndarray:
    """The training-free in-context bigram predictor: at each position, the letter that most often followed
    the current token earlier in the same sequence (``seqjax.tasks.baselines.ngram_lookup`` with ``n = 2``),
    never ``|`` or pad, whose labels the task masks."""
    return ngram_lookup(inputs, 2, ignore=(SEP, PAD))
