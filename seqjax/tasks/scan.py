"""SCAN (Lake & Baroni 2018): navigation commands and their action sequences, generated from the grammar.

The grammar (the paper's Fig. 6; ``[[·]]`` is the interpretation, actions ``I_WALK I_LOOK I_RUN I_JUMP
I_TURN_LEFT I_TURN_RIGHT``)::

    C -> S and S | S after S | S          [[x1 and x2]]   = [[x1]] [[x2]]
                                          [[x1 after x2]] = [[x2]] [[x1]]
    S -> V twice | V thrice | V           [[x twice]] = [[x]] [[x]],  [[x thrice]] = [[x]] [[x]] [[x]]
    V -> D opposite | D around | D | U    (written "U opposite left", "turn around right", ...)
    D -> U left | U right | turn left | turn right
    U -> walk | look | run | jump         [[walk]] = I_WALK, ...
    [[turn left]] = I_TURN_LEFT                 [[U left]] = I_TURN_LEFT [[U]]
    [[turn opposite left]] = I_TURN_LEFT × 2    [[U opposite left]] = I_TURN_LEFT I_TURN_LEFT [[U]]
    [[turn around left]] = I_TURN_LEFT × 4      [[U around left]] = (I_TURN_LEFT [[U]]) × 4

(and the same with ``right``). 34 verb phrases ``V``, 102 ``S``, ``102 + 2 · 102² = 20,910`` commands; the
longest action sequence has 48 actions. :func:`commands` lists them all in a fixed order; :func:`interpret`
maps one command to its actions and raises ``ValueError`` for anything outside the grammar.

Splits (:func:`split`, the released files of ``brendenlake/SCAN``):

- ``simple``: a random 80 / 20 split (16,728 / 4,182), the permutation drawn from ``seed``.
- ``length``: train on commands with at most 22 actions (16,990), test on the longer ones (3,920; no command
  has 23).
- ``addprim_jump``: train on every command without "jump" (13,203) plus the bare command "jump",
  over-represented to 10 % of the training set (1,467 copies: 14,670 in all); test on every other command
  with "jump" (7,706).
- ``around_right`` (Loula, Baroni & Lake 2018): test on the commands that contain "U around right" for a
  primitive ``U`` and no "turn around right" (4,476); train on those without "around right" (15,225).
  Commands with "turn around right" are in neither set, as in the released files.

Tokens: :data:`SRC_VOCAB` (``<pad>`` and the 13 words) and :data:`TGT_VOCAB` (``<pad>``, ``<bos>``,
``<eos>`` and the 6 actions). :func:`encode` returns a :class:`ScanBatch`: ``inputs`` ``[n, S]`` int32
right-padded with :data:`PAD`, ``targets`` ``[n, T]`` int32 — the actions, then :data:`EOS`, then ``IGNORE``
(−1). :func:`exact_match` scores a greedy decoding: the tokens before its first ``EOS`` must equal the
target's actions.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from seqjax import _checks
from seqjax.tasks import IGNORE

__all__ = [
    "PRIMITIVES", "WORDS", "ACTIONS", "SRC_VOCAB", "TGT_VOCAB", "PAD", "BOS", "EOS", "SPLITS", "NUM_COMMANDS",
    "MAX_ACTIONS", "MAX_WORDS", "ScanBatch", "commands", "interpret", "split", "encode", "decode_actions",
    "exact_match",
]

PRIMITIVES = ("walk", "look", "run", "jump")
DIRECTIONS = ("left", "right")
WORDS = (*PRIMITIVES, "turn", *DIRECTIONS, "opposite", "around", "twice", "thrice", "and", "after")
ACTIONS = ("I_WALK", "I_LOOK", "I_RUN", "I_JUMP", "I_TURN_LEFT", "I_TURN_RIGHT")
SRC_VOCAB = ("<pad>", *WORDS)
TGT_VOCAB = ("<pad>", "<bos>", "<eos>", *ACTIONS)
PAD, BOS, EOS = 0, 1, 2
SPLITS = ("simple", "length", "addprim_jump", "around_right")
NUM_COMMANDS = 20_910
MAX_ACTIONS = 48  # "walk around left thrice and run around right thrice"
MAX_WORDS = 9  # "walk opposite left thrice after run around right twice"
LENGTH_CUTOFF = 22  # the length split trains on at most this many actions

_ACTION = {u: f"I_{u.upper()}" for u in PRIMITIVES}
_TURN = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}
_REPEAT = {"twice": 2, "thrice": 3}
_SRC_ID = {w: i for i, w in enumerate(SRC_VOCAB)}
_TGT_ID = {a: i for i, a in enumerate(TGT_VOCAB)}


def _verb_phrases() -> list[str]:
    """The 34 ``V``: ``U`` (4), ``D`` (10), ``D opposite`` (10), ``D around`` (10)."""
    out = list(PRIMITIVES)
    for mod in ("", "opposite ", "around "):
        out += [f"{u} {mod}{d}" for u in (*PRIMITIVES, "turn") for d in DIRECTIONS]
    return out


def _phrases() -> list[str]:
    """The 102 ``S``: each ``V`` alone, twice and thrice."""
    return [f"{v}{r}" for v in _verb_phrases() for r in ("", " twice", " thrice")]


def commands() -> list[str]:
    """All 20,910 SCAN commands: every ``S``, then ``S1 and S2`` and ``S1 after S2`` over all ordered pairs."""
    s = _phrases()
    return s + [f"{a} {c} {b}" for c in ("and", "after") for a, b in itertools.product(s, s)]


def _outside(command: str, why: str) -> ValueError:
    return ValueError(f"command {command!r} is outside the SCAN grammar: {why}")


def _verb(words: list[str], command: str) -> list[str]:
    if not words or words[0] not in (*PRIMITIVES, "turn"):
        raise _outside(command, f"a verb phrase starts with one of {(*PRIMITIVES, 'turn')}, got {' '.join(words)!r}")
    head, rest = words[0], words[1:]
    mod = rest[0] if rest and rest[0] in ("opposite", "around") else None
    rest = rest[1:] if mod else rest
    if not rest:
        if head == "turn" or mod:
            raise _outside(command, f"{' '.join(words)!r} needs a direction (left or right)")
        return [_ACTION[head]]
    if len(rest) != 1 or rest[0] not in DIRECTIONS:
        raise _outside(command, f"{' '.join(words)!r} is not a verb phrase (U, U left, U opposite left, U around left, ...)")
    turn, act = _TURN[rest[0]], ([] if head == "turn" else [_ACTION[head]])
    if mod is None:
        return [turn] + act
    if mod == "opposite":
        return [turn, turn] + act
    return ([turn] + act) * 4


def _phrase(words: list[str], command: str) -> list[str]:
    if words and words[-1] in _REPEAT:
        return _verb(words[:-1], command) * _REPEAT[words[-1]]
    return _verb(words, command)


def interpret(command: str) -> list[str]:
    """The action sequence of one SCAN ``command`` (words separated by single spaces); ``ValueError`` if the
    command is outside the grammar."""
    if not isinstance(command, str):
        raise TypeError(f"command must be a str, got {type(command).__name__}")
    words = command.split(" ")
    unknown = sorted({w for w in words if w not in _SRC_ID or w == "<pad>"})
    if unknown:
        raise _outside(command, f"unknown words {unknown}; the vocabulary is {WORDS}")
    joins = [i for i, w in enumerate(words) if w in ("and", "after")]
    if len(joins) > 1:
        raise _outside(command, "at most one 'and' or 'after'")
    if not joins:
        return _phrase(words, command)
    i = joins[0]
    left, right = _phrase(words[:i], command), _phrase(words[i + 1 :], command)
    return left + right if words[i] == "and" else right + left


def split(name: str, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train, test)`` command lists of split ``name`` (see the module docstring); ``seed`` orders the
    ``simple`` split's permutation and shuffles every training list."""
    _checks.check_choice("split", name, SPLITS)
    cmds = commands()
    rng = np.random.default_rng(seed)
    if name == "simple":
        perm = rng.permutation(len(cmds))
        cut = int(0.8 * len(cmds))
        return [cmds[i] for i in perm[:cut]], [cmds[i] for i in perm[cut:]]
    if name == "length":
        short = [len(interpret(c)) <= LENGTH_CUTOFF for c in cmds]
        train = [c for c, s in zip(cmds, short) if s]
        test = [c for c, s in zip(cmds, short) if not s]
    elif name == "addprim_jump":
        has = [("jump" in c.split(" ")) for c in cmds]
        train = [c for c, h in zip(cmds, has) if not h]
        train += ["jump"] * round(len(train) / 9)  # 10 % of the training set
        test = [c for c, h in zip(cmds, has) if h and c != "jump"]
    else:
        turn = [("turn around right" in c) for c in cmds]
        prim = [any(f"{u} around right" in c for u in PRIMITIVES) for c in cmds]
        train = [c for c, t, p in zip(cmds, turn, prim) if not (t or p)]
        test = [c for c, t, p in zip(cmds, turn, prim) if p and not t]
    return [train[i] for i in rng.permutation(len(train))], test


@dataclasses.dataclass
class ScanBatch:
    inputs: np.ndarray  # [n, S] int32 word ids, right-padded with PAD
    targets: np.ndarray  # [n, T] int32 action ids, then EOS, then IGNORE
    commands: list

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, idx):
        return ScanBatch(self.inputs[idx], self.targets[idx], list(np.asarray(self.commands, dtype=object)[idx]))

    @property
    def mask(self) -> np.ndarray:
        """``[n, S]`` bool, ``True`` at real words."""
        return self.inputs != PAD


def encode(cmds, *, src_len: int | None = None, tgt_len: int | None = None) -> ScanBatch:
    """Token ids of ``cmds`` and their interpretations; widths default to the longest command / action
    sequence (+ EOS) among them."""
    cmds = list(cmds)
    if not cmds:
        raise ValueError("cmds must name at least one command")
    acts = [interpret(c) for c in cmds]
    words = [c.split(" ") for c in cmds]
    s_need, t_need = max(map(len, words)), max(map(len, acts)) + 1
    src_len, tgt_len = src_len or s_need, tgt_len or t_need
    if src_len < s_need or tgt_len < t_need:
        raise ValueError(f"src_len={src_len} / tgt_len={tgt_len} are too short: the commands need {s_need} / {t_need}")
    inputs = np.full((len(cmds), src_len), PAD, np.int32)
    targets = np.full((len(cmds), tgt_len), IGNORE, np.int32)
    for i, (w, a) in enumerate(zip(words, acts)):
        inputs[i, : len(w)] = [_SRC_ID[x] for x in w]
        targets[i, : len(a) + 1] = [_TGT_ID[x] for x in a] + [EOS]
    return ScanBatch(inputs, targets, cmds)


def decode_actions(ids) -> list[str]:
    """Action names of one decoded row, up to (not including) its first ``EOS`` or ``IGNORE``; ``PAD`` / ``BOS``
    read as ``"<pad>"`` / ``"<bos>"`` (always wrong). Any other id outside ``[0, len(TGT_VOCAB))`` raises
    ``ValueError``."""
    out = []
    for j, t in enumerate(np.asarray(ids).tolist()):
        if t == EOS or t == IGNORE:
            break
        if not 0 <= t < len(TGT_VOCAB):
            raise ValueError(f"ids must be target token ids in [0, {len(TGT_VOCAB)}) or IGNORE ({IGNORE}), "
                             f"got {t} at position {j}")
        out.append(TGT_VOCAB[t])
    return out


def exact_match(predictions, targets) -> np.ndarray:
    """``[n]`` bool: the predicted tokens before the first ``EOS`` equal the target's actions (and an ``EOS``
    was emitted). ``predictions`` ``[n, L]`` int, ``targets`` ``[n, T]`` as in :class:`ScanBatch`: every target
    row must hold an ``EOS`` (``ValueError`` naming the row otherwise)."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.ndim != 2 or targets.ndim != 2 or len(predictions) != len(targets):
        raise ValueError(f"predictions [n, L] and targets [n, T] must be 2-D with one row each, got "
                         f"{list(predictions.shape)} and {list(targets.shape)}")
    out = np.zeros(len(targets), bool)
    for i, (p, t) in enumerate(zip(predictions.tolist(), targets.tolist())):
        if EOS not in t:
            raise ValueError(f"targets row {i} has no EOS ({EOS}); each row must be the actions, then EOS, then IGNORE "
                             f"(as encode writes them), got {t}")
        n = t.index(EOS)
        out[i] = len(p) > n and p[: n + 1] == t[: n + 1]
    return out
