"""The synthetic tasks of ``experiments/sweep.py``: for each task the script that trains it, its rows (models and
their options), the headline metric and split, the paper's claim and each row's target, the per-preset budget and
the baselines beside it; and the seeds each preset runs.

A row's target is on the headline split: ``(">=" | "<=", number)``, a threshold every seed must reach, or
``(">" | "<", (labels of other rows,))``, a comparison of the seeds' min–max range with those rows'
(``sweep_report.verdict``). A task's preset fully determines training and evaluation: the script's preset of the
same name, then the task's ``options``, then ``presets[preset]``, then the row's own ``options``.

Not a script: ``python experiments/sweep.py --list`` prints this table.
"""

from __future__ import annotations

import dataclasses

from seqjax.tasks import baselines, icll


@dataclasses.dataclass(frozen=True)
class Row:
    """One trained row: ``label`` in the table, the script's ``--model``, extra script options, and the paper's
    target on the headline split: ``(">=" | "<=", number)`` or ``(">" | "<", (labels of other rows,))``."""

    label: str
    model: str
    options: tuple = ()  # ((key, value), ...) script options of this row only
    target: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Sweep:
    script: str
    options: dict  # script options of every row
    rows: tuple
    metric: str  # the headline metric
    split: str  # the headline split (the verdict's)
    claim: str  # the paper's finding, as the records and the table name it
    presets: dict  # {"cpu": {...}, "paper": {...}}: options over the script's preset of the same name
    sequence: bool = False  # answers are tokens of the sequence: copy-last and bigram baselines too
    extra: tuple = ()  # more baselines, ((name, inputs -> predictions), ...); a name may replace copy_last or bigram
    axis: str = ""  # a script option the rows vary (their options set it): columns and a line plot against it
    preset_rows: dict = dataclasses.field(default_factory=dict)  # {preset: row labels it runs}; default every row


def _width_rows(models, widths, target=None):
    """One row per (model, width), labelled ``"<model> d=<width>"``; ``target(model)`` gives a row's target."""
    return tuple(Row(f"{m} d={d}", m, (("d_model", d),), target=target(m) if target else None) for d in widths for m in models)


_WIDTH_MODELS = ("attention", "based", "mamba2", "gla", "gated_deltanet")


SEEDS = {"cpu": (0, 1, 2), "paper": (0, 1, 2), "tiny": (0,)}

_SOLVES, _FAILS = (">=", 0.95), ("<=", 0.1)
SWEEPS = {
    "digits": Sweep(
        "classification", {"data": "digits"},
        (Row("s4d", "s4d", target=_SOLVES), Row("lssl", "lssl", target=_SOLVES), Row("lstm", "lstm", target=("<", ("s4d", "lssl")))),
        "acc", "test", "S4D / LSSL reach ≥ 0.95 on sequential 8×8 digits, above an LSTM of the same width",
        {"cpu": {"steps": 600, "eval_every": 300}, "paper": {}}),
    "pdigits": Sweep(
        "classification", {"data": "pdigits"},
        (Row("s4d", "s4d"), Row("lstm", "lstm", target=("<", ("s4d",)))),
        "acc", "test", "permuted digits: the SSM above the LSTM",
        {"cpu": {"steps": 600, "eval_every": 300}, "paper": {}}),
    "mnist1d": Sweep(
        "classification", {"data": "mnist1d"},
        (Row("s4d", "s4d"), Row("lssl", "lssl"), Row("lstm", "lstm", target=("<", ("s4d", "lssl")))),
        "acc", "test", "MNIST-1D: the SSMs above the LSTM",
        {"cpu": {"steps": 600, "eval_every": 300}, "paper": {}}),
    "s3": Sweep(
        "state_tracking", {"task": "s3"},
        (Row("deltanet_negeig", "deltanet_negeig", target=(">", ("deltanet",))), Row("deltanet", "deltanet")),
        "scaled_acc", "test_len", "S3 word problem: eigenvalues in [−1, 1] help DeltaNet (rows only at this budget)",
        {"cpu": {"steps": 400, "eval_every": 200}, "paper": {}}),
    "s5": Sweep(
        "state_tracking", {"task": "s5"},
        (Row("deltanet_negeig", "deltanet_negeig", target=(">", ("deltanet",))), Row("deltanet", "deltanet")),
        "scaled_acc", "test_len", "S5 word problem: eigenvalues in [−1, 1] help DeltaNet (rows only at this budget)",
        {"cpu": {"steps": 400, "eval_every": 200}, "paper": {}}),
    "modarith_brackets": Sweep(
        "state_tracking", {"task": "modarith_brackets"},
        (Row("deltanet_negeig", "deltanet_negeig", target=(">", ("deltanet",))), Row("deltanet", "deltanet")),
        "scaled_acc", "test_len", "mod-5 arithmetic with brackets: eigenvalues in [−1, 1] help DeltaNet",
        {"cpu": {"steps": 400, "eval_every": 200}, "paper": {}}),
    "modarith": Sweep(
        "state_tracking", {"task": "modarith"},
        (Row("deltanet_negeig", "deltanet_negeig", target=(">", ("deltanet",))), Row("deltanet", "deltanet")),
        "scaled_acc", "test_len", "mod-5 arithmetic without brackets: DeltaNet [−1, 1] clearly above [0, 1]",
        {"cpu": {"steps": 1000, "eval_every": 250}, "paper": {}}),
    "copy": Sweep(
        "recall", {"task": "copy"},
        (Row("attention", "attention"), Row("mamba", "mamba", target=(">=", 0.99))),
        "acc", "test", "selective copying: Mamba (S6) solves it (99.8 % in the Mamba paper)",
        # paper: the Mamba paper's setting (its App. E.1): 16 data tokens in 4096, vocab 16, 2 layers of width 64,
        # 400k steps at batch 64 and a constant learning rate of 1e-4
        {"cpu": {"steps": 800, "eval_every": 400},
         "paper": {"steps": 400_000, "batch_size": 64, "d_model": 64, "num_layers": 2, "lr": 1e-4, "warmup": 0,
                   "schedule": "constant", "seq_len": 4096, "vocab_size": 16, "num_tokens": 16, "eval_every": 20_000}},
        sequence=True),
    "recall": Sweep(
        "recall", {"task": "ar"},
        (Row("attention", "attention", target=(">=", 0.99)), Row("mamba", "mamba"), Row("gla", "gla")),
        "acc", "test", "single-query associative recall (64 tokens, 31 pairs): attention solves it",
        {"cpu": {"steps": 1500, "eval_every": 500}, "paper": {}}, sequence=True,
        extra=(("value_majority", baselines.value_majority),)),
    "recall_h3": Sweep(
        "recall", {"task": "ar_h3", "vocab_size": 20},
        (Row("attention", "attention", target=(">=", 0.99)), Row("mamba", "mamba"), Row("gla", "gla")),
        "acc", "test", "associative recall as H3 / Hyena train it (vocab 20, T 64, keys repeat, every token a label): "
        "attention solves it",
        # paper: safari's associative-recall run (5000 sequences of 40 tokens, 400 epochs at batch 32, lr 5e-4,
        # weight decay 0.1, 10 % warmup; its transformer has width 32 and one head); fresh data every step here
        {"cpu": {"steps": 1500, "eval_every": 500},
         "paper": {"steps": 62_500, "batch_size": 32, "d_model": 32, "num_heads": 1, "lr": 5e-4, "weight_decay": 0.1,
                   "warmup": 6250, "seq_len": 40, "eval_every": 5000}},
        sequence=True),
    "mqar": Sweep(
        "mqar", {},
        (Row("attention", "attention", target=(">=", 0.99)), Row("gated_deltanet", "gated_deltanet", target=(">=", 0.99)),
         Row("mamba2", "mamba2", target=("<", ("attention",))), Row("gla", "gla", target=("<", ("attention",)))),
        "acc", "test", "MQAR (T 64, 4 pairs): attention and Gated DeltaNet ≥ 99 %, a gap to Mamba-2 / GLA at small width",
        {"cpu": {"steps": 1000, "eval_every": 250}, "paper": {}}, sequence=True),
    "mqar_width": Sweep(
        "mqar", {},
        _width_rows(_WIDTH_MODELS, (32, 64, 128, 256, 512), lambda m: (">=", 0.99) if m == "attention" else None),
        "acc", "test", "MQAR (T 64, 4 pairs) vs model dimension (zoology Fig. 2): attention solves it at every width; "
        "the fixed-state models (Based, Mamba-2, GLA, Gated DeltaNet) need a larger width (state)",
        {"cpu": {"steps": 1000, "eval_every": 250}, "paper": {}}, sequence=True, axis="d_model",
        preset_rows={p: tuple(f"{m} d={d}" for d in ws for m in _WIDTH_MODELS)
                     for p, ws in {"cpu": (32, 64, 128), "tiny": (32,), "paper": (64, 128, 256, 512)}.items()}),
    "mqar_lr": Sweep(
        "mqar", {"d_model": 64},
        tuple(Row(f"attention lr={lr:g}", "attention", (("lr", lr),), target=(">=", 0.99)) for lr in (1e-3, 3e-3, 1e-2)),
        "acc", "test", "MQAR (T 64, 4 pairs), attention at d_model 64 against the learning rate: zoology keeps the best "
        "of four rates in 1e-4..1e-2, and attention solves it at every width",
        {"cpu": {"steps": 1000, "eval_every": 250}, "paper": {}}, sequence=True, axis="lr"),
    "icll": Sweep(
        "icll", {},
        (Row("attention", "attention", target=(">", ("mamba2", "gated_deltanet", "lstm"))), Row("mamba2", "mamba2"),
         Row("mamba2+ngram2", "mamba2+ngram2", target=(">", ("mamba2",))), Row("gated_deltanet", "gated_deltanet"),
         Row("lstm", "lstm")),
        "dfa_acc", "test", "ICLL (random DFAs): attention beats the recurrent models; an n-gram head narrows the gap",
        {"cpu": {"steps": 1000, "eval_every": 500, "seq_len": 128}, "paper": {}}, sequence=True,
        extra=(("always_separator", icll.always_separator), ("bigram", icll.bigram_lookup))),
    "parity": Sweep(
        "state_tracking", {"task": "parity"},
        (Row("deltanet_negeig", "deltanet_negeig", target=_SOLVES), Row("deltanet", "deltanet", target=_FAILS),
         Row("mamba_negeig", "mamba_negeig", target=_SOLVES), Row("mamba", "mamba", target=_FAILS),
         Row("lstm", "lstm", target=_SOLVES), Row("slstm", "slstm", target=_SOLVES), Row("attention", "attention", target=_FAILS)),
        "scaled_acc", "test_len", "parity, train 3–20 → test 40–64: eigenvalues in [−1, 1] solve it, [0, 1] fail; "
        "LSTM and sLSTM solve it; attention fails",
        {"cpu": {"steps": 1500, "eval_every": 250}, "paper": {}}),
    "sets": Sweep(
        "set_disjointness", {},
        (Row("gla, long set first", "gla", target=("<", ("gla, short set first",))),
         Row("gla, short set first", "gla", (("order", "short_first"),)),
         Row("gla + JRT-Prompt, long set first", "gla", (("jrt", True),), target=(">", ("gla, long set first",))),
         Row("JRT prefix linear attention, long set first", "jrt", target=(">", ("gla, long set first",))),
         Row("attention, long set first", "attention")),
        "acc", "test", "set disjointness: long-set-first is hard for a recurrent model; JRT-Prompt and the prefix "
        "model fix it", {"cpu": {"steps": 1500, "eval_every": 500}, "paper": {}}),
}
