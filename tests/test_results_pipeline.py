"""The results pipeline: the ICLL metric (the paper's rule), the trivial baselines, and the sweep's tables."""

import importlib
import json
import pathlib
import sys

import numpy as np
import pytest

from seqjax.tasks import IGNORE, icll, masked_accuracy, mqar, recall, scaled_accuracy, state_tracking
from seqjax.tasks import baselines as B

# ----------------------------------------------------------------------------- ICLL metric

# state 0 --a--> 1; state 1 --b--> 0, --c--> 0.   a=0, b=1, c=2
_DFA = icll.DFA(({0: 1}, {1: 0, 2: 0}))
#                  t: 0  1  2        3  4  5  6        7
_SEQ = np.array([[0, 1, icll.SEP, 0, 2, 0, icll.PAD, icll.PAD]])
# scored: t=0 (after "a", next b; valid b, c), t=2 (after "|", next a; valid a), t=3 ("a", valid b, c),
# t=4 ("a c", valid a); t=1 (next is "|") and t>=5 (next is pad) are not scored.


def _score(pred):
    return icll.dfa_accuracy(np.array([pred]), _SEQ, [_DFA])


def test_dfa_accuracy_follows_the_papers_rule_on_a_hand_made_sequence():
    sep = icll.SEP
    assert _score([1, 9, 0, 2, 0, 9, 9, 9]) == 1.0  # every scored prediction valid; t=1, 5.. free
    assert _score([2, sep, 0, 1, 1, 0, 0, 0]) == 0.75  # t=4: "a c" then "b" is rejected
    assert _score([sep] * 8) == 0.0  # "|" is never a transition: the always-separator predictor scores 0
    assert _score([1, 1, 1, 1, 1, 1, 1, 1]) == 0.5  # t=2 and t=4 need "a"
    assert _score([icll.PAD] * 8) == 0.0


def test_icll_targets_mask_the_separator_and_a_perfect_predictor_scores_one():
    b = icll.icll(6, 160, seed=3)
    assert not np.any(b.targets == icll.SEP) and np.any(b.inputs == icll.SEP)
    nxt = np.full_like(b.inputs, IGNORE)
    nxt[:, :-1] = b.inputs[:, 1:]
    assert np.array_equal(b.targets, np.where((nxt == icll.SEP) | (nxt == icll.PAD), IGNORE, nxt))
    assert icll.dfa_accuracy(np.where(b.targets == IGNORE, 0, b.targets), b.inputs, b.meta) == 1.0
    assert icll.dfa_accuracy(icll.always_separator(b.inputs), b.inputs, b.meta) == 0.0


def test_dfa_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="predictions"):
        icll.dfa_accuracy(np.zeros((1, 7), np.int32), _SEQ, [_DFA])
    with pytest.raises(ValueError, match="dfas"):
        icll.dfa_accuracy(_SEQ, _SEQ, [])


# ----------------------------------------------------------------------------- baselines


def test_ngram_lookup_hand_made():
    seq = np.array([[5, 7, 5, 8, 5, 8, 5]])
    # t=2: 5 was followed by 7; t=4: 7 and 8 once each, the latest (8) wins; t=5: 8 -> 5; t=6: 8 twice
    assert B.ngram_lookup(seq).tolist() == [[-1, -1, 7, -1, 8, 5, 8]]
    # trigram: context (5, 8) seen once, followed by 5
    assert B.ngram_lookup(seq, 3).tolist() == [[-1, -1, -1, -1, -1, 5, 8]]
    assert B.ngram_lookup(seq, ignore=(7,)).tolist() == [[-1, -1, -1, -1, 8, 5, 8]]
    with pytest.raises(ValueError, match="n must be"):
        B.ngram_lookup(seq, 1)
    with pytest.raises(ValueError, match="inputs"):
        B.ngram_lookup(seq.astype(np.float32))


def test_icll_bigram_never_predicts_the_separator():
    assert B.copy_last(_SEQ).tolist() == _SEQ.tolist()
    # t=3: "a" was followed by "b" earlier; "|" and pad have no letter follower yet
    assert icll.bigram_lookup(_SEQ).tolist() == [[-1, -1, -1, 1, -1, 2, -1, -1]]  # t=5: b, c tie; c is later
    assert _score(icll.bigram_lookup(_SEQ)[0]) == 0.25


def test_bigram_lookup_solves_recall_without_training():
    b = mqar.mqar(16, 64, 4, 256, seed=1)
    assert masked_accuracy(B.ngram_lookup(b.inputs), b.targets) == 1.0
    b = recall.associative_recall(16, 32, 32, seed=1)
    assert masked_accuracy(B.ngram_lookup(b.inputs), b.targets) == 1.0
    assert masked_accuracy(B.copy_last(b.inputs), b.targets) == 0.0  # keys and values never coincide


def test_value_majority_predicts_the_most_frequent_value_so_far():
    # keys at even positions, values at odd ones: values 9, 8, 9, 8 -> 9 leads, then the 8-9 tie goes to the later 8
    seq = np.array([[1, 9, 2, 8, 3, 9, 4, 8, 2, 8]])
    assert B.value_majority(seq).tolist() == [[-1, 9, 9, 8, 8, 9, 9, 8, 8, 8]]
    b = recall.associative_recall(2000, 64, 64, seed=3)
    acc = masked_accuracy(B.value_majority(b.inputs), b.targets)
    # the queried value is the majority value more often than chance (1/32), far less often than always
    assert 1 / 32 < acc < 0.3
    with pytest.raises(ValueError, match="inputs"):
        B.value_majority(np.zeros((2, 3, 4), np.int32))


def test_chance_and_majority_closed_forms():
    b = state_tracking.parity(64, 3, 10, seed=0)

    def metric(p, bb):
        acc = masked_accuracy(p, bb.targets)
        return {"acc": acc, "scaled_acc": scaled_accuracy(acc, 2)}

    out = B.trivial_baselines(metric, b, b.targets)
    assert out["chance"]["acc"] == pytest.approx(0.5) and out["chance"]["scaled_acc"] == pytest.approx(0.0)
    labels = b.targets[b.targets != IGNORE]
    frac2 = np.mean(labels == 2)
    assert out["majority"]["acc"] == pytest.approx(max(frac2, 1 - frac2))
    assert B.majority([[IGNORE, 3, 3], [4, 4, IGNORE]]) == 3 and B.answer_tokens([[IGNORE, 4, 3]]).tolist() == [3, 4]
    # ICLL chance on the hand-made sequence: (2/3 + 1/3 + 2/3 + 1/3) / 4 over the answer letters a, b, c
    got = B.chance(lambda p, bb: {"a": icll.dfa_accuracy(p, bb.inputs, bb.meta)},
                   icll.TaskBatch(_SEQ, _SEQ, meta=[_DFA]), [0, 1, 2])
    assert got["a"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no scored"):
        B.majority([[IGNORE]])


# ----------------------------------------------------------------------------- the sweep and its tables

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import sweep  # noqa: E402
import sweep_report  # noqa: E402


def test_verdicts_compare_the_seeds_range_with_the_target():
    scores = {("a", "t"): [0.96, 0.97, 0.99], ("b", "t"): [0.90, 0.97, 0.99], ("c", "t"): [0.5, 0.6, 0.7],
              ("d", "t"): [0.65, 0.9]}
    assert sweep_report.verdict((">=", 0.95), scores, "a", "t") == "met"
    assert sweep_report.verdict((">=", 0.95), scores, "b", "t") == "within noise"
    assert sweep_report.verdict((">=", 0.95), scores, "c", "t") == "missed"
    assert sweep_report.verdict(("<=", 0.1), scores, "c", "t") == "missed"
    assert sweep_report.verdict((">", ("c",)), scores, "a", "t") == "met"
    assert sweep_report.verdict((">", ("a", "c")), scores, "d", "t") == "missed"  # d's best (0.9) is below a's worst
    assert sweep_report.verdict((">", ("c",)), scores, "d", "t") == "within noise"  # 0.65–0.9 overlaps 0.5–0.7
    assert sweep_report.verdict(("<", ("a",)), scores, "c", "t") == "met"
    assert sweep_report.verdict(None, scores, "a", "t") == "—" and sweep_report.verdict((">", ("zz",)), scores, "a", "t") == "—"
    one = {("x", "t"): [0.99], ("y", "t"): [0.5]}
    assert sweep_report.verdict((">=", 0.95), one, "x", "t") == "met (1 seed)"
    assert sweep_report.verdict((">", ("y",)), {**scores, **one}, "a", "t") == "met (1 seed)"  # compared with a one-seed row
    assert sweep_report.verdict((">", ("c",)), {**scores, **one}, "a", "t") == "met"


def test_table_from_hand_made_records():
    recs = [{"task": "ar", "row": "attention", "model": "attention", "seed": s, "step": st, "split": "test", "acc": a,
             "preset": "cpu", "machine": "m"} for s, st, a in ((0, 5, 0.1), (0, 10, 0.98), (1, 10, 1.0))]
    recs += [{"task": "ar", "row": "chance", "model": "baseline", "seed": s, "step": 0, "split": "test", "acc": 0.25}
             for s in (0, 1)]
    md = sweep_report.table("recall", recs)
    assert md.splitlines()[0] == ("`python experiments/sweep.py recall` (preset cpu): 2 seeds (0, 1), 10 steps, m; "
                                  "acc, mean ± std over seeds.")
    assert "| attention | 0.990 ± 0.010 | 2 | ≥ 0.99 | within noise |" in md
    assert "| *baseline: chance* | 0.250 ± 0.000 | | | |" in md
    assert "| mamba |" not in md  # rows without records are left out


def test_sweep_writes_fresh_records_under_experiments_results_whatever_the_directory(tmp_path, monkeypatch):
    assert sweep.RESULTS == str(ROOT / "experiments" / "results")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    recs = sweep.run_sweep("copy", "tiny", only=("attention",), out=str(out))
    folder = out / "copy"
    assert {p.name for p in folder.iterdir()} == {"records.jsonl", "table.md", "plot.png"}
    lines = (folder / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(recs)
    rows = {json.loads(x)["row"] for x in lines}
    assert rows == {"attention", "chance", "majority", "copy_last", "bigram"}
    last = json.loads(lines[-1])
    assert last["preset"] == "tiny" and last["steps"] == 2 and "machine" in last and "paper" in last
    # a second run rewrites the file (no appending), and --baselines_only keeps the trained rows
    again = sweep.run_sweep("copy", "tiny", baselines_only=True, out=str(out))
    assert len((folder / "records.jsonl").read_text().splitlines()) == len(again) == len(recs)
    assert (folder / "table.md").read_text().strip() == sweep_report.table("copy", again)
    # the regenerator reads the same records
    assert sweep_report.tables(str(out)) == sweep_report.readme_block("copy", again) + "\n\n" + sweep_report.run_times_block(str(out))
    # a partial run replaces only the (row, seed) pairs it runs
    one = sweep.run_sweep("copy", "tiny", seeds=(1,), baselines_only=True, out=str(out))
    assert sorted({(r["row"], r["seed"]) for r in one}) == sorted({(r["row"], r["seed"]) for r in again}
                                                                   | {(b, 1) for b in ("chance", "majority", "copy_last", "bigram")})
    with pytest.raises(ValueError, match="names no row"):
        sweep.run_sweep("copy", "tiny", only=("nope",), out=str(out))


def test_resume_keeps_finished_runs_and_retrains_the_interrupted_one(tmp_path, monkeypatch):
    trained = []

    def fake_run(task, cfg):  # one evaluation at the last step, no training
        trained.append((cfg.model, cfg.seed))
        return [{"task": task.name, "model": cfg.model, "seed": cfg.seed, "step": cfg.steps, "split": "test", "acc": 0.5}]

    monkeypatch.setattr(sweep, "run", fake_run)
    out = str(tmp_path)
    sweep.run_sweep("copy", "tiny", out=out)
    assert trained == [("attention", 0), ("mamba", 0)]
    path = tmp_path / "copy" / "records.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    # interrupted during mamba: its record is from before the last step; attention's run had finished
    cut = [r for r in recs if r["row"] != "mamba"] + [{**recs[-1], "step": 1, "acc": 0.1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in cut))
    trained.clear()
    again = sweep.run_sweep("copy", "tiny", out=out, resume=True)
    assert trained == [("mamba", 0)]
    final = {(r["row"], r["step"]): r["acc"] for r in again if r["model"] != "baseline"}
    assert final == {("attention", 2): 0.5, ("mamba", 2): 0.5}
    # a finished run of another preset is not a finished run of this one
    path.write_text("".join(json.dumps({**r, "preset": "cpu"}) + "\n" for r in again))
    trained.clear()
    sweep.run_sweep("copy", "tiny", out=out, resume=True)
    assert trained == [("attention", 0), ("mamba", 0)]


def test_a_run_of_some_seeds_keeps_the_other_seeds_records(tmp_path, monkeypatch):
    def fake_run(task, cfg):
        return [{"task": task.name, "model": cfg.model, "seed": cfg.seed, "step": cfg.steps, "split": "test", "acc": 0.1 * cfg.seed}]

    monkeypatch.setattr(sweep, "run", fake_run)
    out = str(tmp_path)
    sweep.run_sweep("copy", "tiny", seeds=(0,), out=out)
    recs = sweep.run_sweep("copy", "tiny", seeds=(1, 2), out=out)
    trained = {(r["row"], r["seed"]): r["acc"] for r in recs if r["model"] != "baseline"}
    assert trained == {(m, s): pytest.approx(0.1 * s) for m in ("attention", "mamba") for s in (0, 1, 2)}
    assert {r["seed"] for r in recs if r["row"] == "chance"} == {0, 1, 2}
    # rerunning one seed replaces exactly that seed's records
    recs = sweep.run_sweep("copy", "tiny", seeds=(1,), out=out)
    assert sorted((r["row"], r["seed"]) for r in recs if r["model"] != "baseline") == sorted(trained)


@pytest.mark.parametrize("name", list(sweep.SWEEPS))
def test_readme_table_equals_what_the_records_give(name):
    """The README carries each sweep task's table between ``<!-- table:<task> -->`` markers; it must equal the
    block that ``python experiments/sweep.py tables`` prints (and writes into the README) from the committed
    records."""
    readme = (ROOT / "README.md").read_text()
    start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
    assert start in readme and end in readme, f"README has no {start} block: run `python experiments/sweep.py tables`"
    block = readme[readme.index(start): readme.index(end) + len(end)]
    records = sweep_report.read_records(str(ROOT / "experiments" / "results" / name))
    assert block == sweep_report.readme_block(name, records)


def test_readme_run_times_equal_what_the_records_give():
    readme = (ROOT / "README.md").read_text()
    block = sweep_report.run_times_block(str(ROOT / "experiments" / "results"))
    assert block in readme, "the README's run-time block is stale: run `python experiments/sweep.py tables`"


def test_icll_baseline_rows_score_the_separator_predictor_zero():
    import icll as icll_script

    recs = sweep.baseline_records(sweep.SWEEPS["icll"], "tiny", 0, icll_script)
    got = {r["row"]: r["dfa_acc"] for r in recs}
    assert set(got) == {"chance", "majority", "copy_last", "bigram", "always_separator"}
    assert got["always_separator"] == 0.0 and 0.0 < got["chance"] < got["bigram"] <= 1.0


def test_run_times_sum_the_finished_runs_and_estimate_the_rest(tmp_path, monkeypatch):
    """Hand-made records of ``copy`` (rows attention, mamba; seeds 0-2): a run's time is its last evaluation's
    ``seconds``; a missing run takes its row's mean, a row with no timed run the task's mean."""
    base = {"task": "copy", "preset": "cpu", "split": "test", "acc": 0.5, "steps": 4}
    recs = [{**base, "row": "attention", "model": "attention", "seed": 0, "step": 2, "seconds": 30.0},
            {**base, "row": "attention", "model": "attention", "seed": 0, "step": 4, "seconds": 60.0},
            {**base, "row": "attention", "model": "attention", "seed": 1, "step": 4, "seconds": 180.0},
            {**base, "row": "attention", "model": "attention", "seed": 2, "step": 2, "seconds": 999.0},  # unfinished
            {**base, "row": "attention", "model": "attention", "seed": 2, "step": 4, "seconds": 240.0, "preset": "tiny"}]
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.setattr(sweep_report, "SWEEPS", {"copy": sweep.SWEEPS["copy"], "s3": sweep.SWEEPS["s3"]})
    text = sweep_report.run_times(str(tmp_path))
    # timed: 60 + 180 s; attention seed 2 -> 120 s (its row's mean); mamba x3 -> 120 s each (the task's mean)
    assert "| copy | 6 | 2 | 4 | 12 |" in text
    assert "| s3 | 6 | 0 | | |" in text
    assert text.endswith("All tasks with a timed run: 0.1 h timed, about 0.2 h for every run; no timed run yet: s3.")


def test_learning_rate_schedules():
    from seqjax.tasks.runner import RunConfig, learning_rate

    cos = learning_rate(RunConfig(lr=1e-3, warmup=10, steps=110))
    np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(60), cos(110)],
                               [0.0, 5e-4, 1e-3, 1e-3 * (0.01 + 0.99 * 0.5), 1e-5], rtol=1e-5, atol=1e-12)
    const = learning_rate(RunConfig(lr=1e-4, warmup=0, steps=400_000, schedule="constant"))
    np.testing.assert_allclose([const(0), const(1), const(399_999)], [1e-4] * 3, rtol=1e-6)
    warm = learning_rate(RunConfig(lr=1e-4, warmup=4, steps=100, schedule="constant"))
    np.testing.assert_allclose([warm(0), warm(2), warm(4), warm(99)], [0.0, 5e-5, 1e-4, 1e-4], rtol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(RunConfig(schedule="linear"))


def test_copy_paper_preset_is_the_mamba_papers_setting():
    mod = importlib.import_module(sweep.SWEEPS["copy"].script)  # as sweep.py loads it
    cfg = sweep._config(sweep.SWEEPS["copy"], sweep.SWEEPS["copy"].rows[1], "paper", 0, mod)
    assert (cfg.model, cfg.task, cfg.steps, cfg.batch_size, cfg.d_model, cfg.num_layers) == ("mamba", "copy", 400_000, 64, 64, 2)
    assert (cfg.lr, cfg.warmup, cfg.schedule, cfg.seq_len, cfg.vocab_size, cfg.num_tokens) == (1e-4, 0, "constant", 4096, 16, 16)
