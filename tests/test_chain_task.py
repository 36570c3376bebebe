"""The state-tracking chain task (dkvcache.tasks.chain): generator, content split, scorer, shipped data, tables."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dkvcache.eval import datasets, prompts, scoring
from dkvcache.tasks import chain, chain_tables

ROOT = Path(__file__).resolve().parents[1]


def test_shuffles_are_fixed_derangements() -> None:
    assert len(set(chain.SHUFFLES)) == chain.DIGITS
    for perm in chain.SHUFFLES:
        assert sorted(perm) == list(range(chain.DIGITS)) and all(perm[i] != i for i in range(chain.DIGITS))
    assert chain.SHUFFLES == chain._shuffles()  # drawn from a fixed seed: the same table in every process
    assert len(chain.generated_group(chain.SHUFFLES)) == 120  # all of S5: no composition shortcut


def test_item_text_and_path() -> None:
    item = chain.make_item(3, [1, 4, 0, 2, 3, 1, 1, 4])
    assert item.question == "Start at 3 and make the moves 1 4 0 2 3 1 1 4. Where do you end?"
    assert item.answer == "31441022334111044\n#### 4"  # 3, then (move, state) pairs
    path = [3]
    for m in item.moves:
        path.append(chain.SHUFFLES[m][path[-1]])
    assert item.path == path == [3, 4, 1, 2, 3, 4, 1, 0, 4]


def test_every_state_depends_on_the_one_before() -> None:
    """Changing one move changes the state from that move on (moves are bijections: an error is never undone)."""
    rng = random.Random(0)
    for _ in range(50):
        start, moves = rng.randrange(chain.DIGITS), [rng.randrange(chain.DIGITS) for _ in range(chain.MOVES)]
        base = chain.walk(start, moves)
        k = rng.randrange(chain.MOVES)
        other = list(moves)
        other[k] = next(m for m in range(chain.DIGITS) if chain.SHUFFLES[m][base[k]] != base[k + 1])
        changed = chain.walk(start, other)
        assert changed[: k + 1] == base[: k + 1] and changed[k + 1] != base[k + 1]
        # the rest of the path differs at every later state from this point on only if the states differ: a
        # bijection never maps two different states to the same one
        assert all(a != b for a, b in zip(changed[k + 1:], base[k + 1:]))


def test_bad_items_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="move digits"):
        chain.make_item(3, [1, 2, 3])
    with pytest.raises(ValueError, match="move digits"):
        chain.make_item(chain.DIGITS, [1] * chain.MOVES)
    with pytest.raises(ValueError, match="split must be"):
        chain.sample_item(random.Random(0), "dev")


def test_generator_is_deterministic() -> None:
    a = [chain.sample_item(random.Random(7)) for _ in range(3)]
    b = [chain.sample_item(random.Random(7)) for _ in range(3)]
    assert a == b
    rng = random.Random(1)
    for _ in range(200):
        item = chain.sample_item(rng, "train")
        assert chain.is_correct(item.answer, item.answer) and len(item.path) == chain.MOVES + 1
    assert chain.make_test_items(20) == chain.make_test_items(20)


def test_split_is_by_content_and_disjoint() -> None:
    rng = random.Random(3)
    train = {(it.start, it.moves) for it in (chain.sample_item(rng, "train") for _ in range(3000))}
    test = chain.make_test_items()
    assert len({(it.start, it.moves) for it in test}) == chain.TEST_SIZE  # distinct contents
    assert all(chain.is_test(it.start, it.moves) for it in test)
    assert not any(chain.is_test(*key) for key in train)
    assert not train & {(it.start, it.moves) for it in test}
    # about one in ten contents is held out
    draws = [chain.is_test(rng.randrange(5), [rng.randrange(5) for _ in range(8)]) for _ in range(4000)]
    assert 0.07 < sum(draws) / len(draws) < 0.13


def test_shipped_jsonl_is_the_regenerated_test_set() -> None:
    rows = chain.load_jsonl()
    assert len(rows) == chain.TEST_SIZE and rows[0]["id"] == "chain-0000"
    expected = chain.make_test_items()
    assert [(r["question"], r["answer"]) for r in rows] == [(it.question, it.answer) for it in expected]
    assert chain.load_jsonl(limit=5) == rows[:5]


@pytest.mark.parametrize("prediction, ok", [
    ("31441022334111044\n#### 4", True),
    ("31441022334111044\n#### 4<|im_end|>", True),
    ("31441022334111044\n#### 0", True),    # the summary line is not scored: the path is the answer
    (" 31441022334111044", True),
    ("31441022334111043\n#### 3", False),   # one wrong state
    ("3144102233411104\n#### 4", False),    # a state missing
    ("314410223341110440\n#### 4", False),  # a digit too many
    ("#### 31441022334111044", False),
    ("", False),
])
def test_scorer(prediction: str, ok: bool) -> None:
    assert chain.is_correct(prediction, "31441022334111044\n#### 4") is ok
    with pytest.raises(ValueError, match="without a path"):
        chain.is_correct(prediction, "#### 4")


def test_eval_harness_registration() -> None:
    items = datasets.load_items({"name": "chain", "limit": 3})
    assert [it["id"] for it in items] == ["chain-0000", "chain-0001", "chain-0002"]
    assert scoring.MATH_SCORERS["chain"](items[0], items[0]["answer"])[0] == 1.0
    assert prompts.BUILDERS["chain"](items[0], 0) == (items[0]["question"], "")


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_yardstick_rows(family: str) -> None:
    rows = chain_tables.table_settings("yardstick", family, chain.GEN_LENGTH)
    labels = [label for label, _ in rows]
    assert rows[0] == ("vanilla (one token a step)", {}) and len(set(labels)) == len(labels)
    aggressive = [label for label in labels if label.startswith("!")]
    assert len(aggressive) >= 10
    assert any(kw.get("cache_type") == "greedy" for _, kw in rows) == (family == "llada")
    # every random-order row has its reference: vanilla in that order, same seed (LLaDA only)
    random_rows = [kw for label, kw in rows if chain_tables.RANDOM_ORDER in label]
    assert all(kw["remasking"] == "random" and kw["seed"] == 0 for kw in random_rows)
    assert (("vanilla (random order)", {"remasking": "random", "seed": 0}) in rows) == (family == "llada")
    assert any(kw.get("shift_type") == "un" for _, kw in rows) == (family == "dream")  # the original's rule
    for _, kw in rows:  # Dream's threshold rows need a probability score
        if family == "dream" and "threshold" in kw:
            assert kw.get("alg") == "maskgit_plus"
    with pytest.raises(ValueError, match="family must be"):
        chain_tables.table_settings("yardstick", "gpt", 32)


def test_wilson_interval() -> None:
    lo, hi = chain_tables.wilson(270, 300)
    assert lo == pytest.approx(0.8606, abs=1e-3) and hi == pytest.approx(0.9290, abs=1e-3)
    assert chain_tables.wilson(300, 300)[1] == pytest.approx(1.0)
    assert chain_tables.wilson(0, 300)[0] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        chain_tables.wilson(3, 2)


def _row(setting: str, correct: int, n: int = 300) -> dict:
    return {"setting": setting, "accuracy": correct / n, "correct": correct, "n": n, "wall_time_s": 1.0,
            "tokens_per_forward": 1.0, "tokens_per_s": 10.0, "fed_fraction": 1.0}


def test_compare_ranking() -> None:
    a = [_row("v", 290), _row("x", 150), _row("y", 288)]
    same = chain_tables.compare(a, [_row("v", 285), _row("x", 120), _row("y", 286)])
    assert same["same_ranking"] and same["separated_pairs"] > 0
    flipped = chain_tables.compare(a, [_row("v", 100), _row("x", 280), _row("y", 286)])
    assert not flipped["same_ranking"] and ("v", "x") in flipped["inversions"]
    assert chain_tables.kendall_tau_b([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert chain_tables.kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # a table that gained a row is compared on the rows both runs have
    grown = chain_tables.compare([*a, _row("z", 10)], [_row("v", 285), _row("x", 120), _row("y", 286)])
    assert grown == same
    with pytest.raises(ValueError, match="share at least two rows"):
        chain_tables.compare(a, [_row("v", 285), _row("w", 120)])


def test_compare_by_row_group(capsys: pytest.CaptureFixture, tmp_path) -> None:
    """The two-seed check per group: an inversion between two parallel-decoding rows shows in "all rows" and
    "without a cache", not in the cache group; the CLI prints the group table."""
    labels = ["vanilla (one token a step)", "dKV prefill", "! dKV decoded, cache_steps 32 (never refreshed)",
              "Fast-dLLM dual + threshold 0.9", "decoder eb_sampler (defaults)", "! steps 8 (4 tokens a step)"]
    a = [_row(label, c) for label, c in zip(labels, [300, 299, 150, 280, 200, 10])]
    b = [_row(label, c) for label, c in zip(labels, [300, 298, 140, 270, 20, 150])]
    groups = chain_tables.compare_groups(a, b)
    assert {k: g["rows"] for k, g in groups.items()} == {
        "all rows": 6, "the defaults (no !)": 4, "one token a step with a cache, and vanilla": 3,
        "without a cache": 3}
    assert groups["one token a step with a cache, and vanilla"]["same_ranking"]
    assert ("decoder eb_sampler (defaults)", "! steps 8 (4 tokens a step)") in groups["without a cache"]["inversions"]
    assert not groups["all rows"]["same_ranking"]
    paths = []
    for name, rows in (("a", a), ("b", b)):
        chain_tables.save(rows, str(tmp_path / f"{name}.json"))
        paths.append(str(tmp_path / f"{name}.json"))
    assert chain_tables.main(paths) == 0
    assert "| one token a step with a cache, and vanilla | 3 | " in capsys.readouterr().out


def test_signal_criteria() -> None:
    """Defaults within 2 points of vanilla, an aggressive row 15+ below it, 300 items, vanilla >= 90 %."""
    rows = [_row("vanilla (one token a step)", 300), _row("dKV prefill", 295), _row("! steps 8 (4 tokens a step)", 250)]
    met = chain_tables.signal(rows)
    assert met["met"] and met["worst_default"] == ("dKV prefill", pytest.approx(5 / 3))
    assert met["strongest_aggressive"] == ("! steps 8 (4 tokens a step)", pytest.approx(50 / 3))
    over = chain_tables.signal([*rows, _row("decoder eb_sampler (defaults)", 293)])  # -2.33 points
    assert not over["met"] and not over["checks"]["defaults"] and over["checks"]["aggressive"]
    assert [name for name, _ in over["defaults_over"]] == ["decoder eb_sampler (defaults)"]
    weak = chain_tables.signal([rows[0], rows[1], _row("! steps 8 (4 tokens a step)", 256)])  # -14.67 points
    assert not weak["met"] and weak["checks"] == {"items": True, "vanilla": True, "defaults": True,
                                                  "aggressive": False}
    few = chain_tables.signal([_row(r["setting"], r["correct"] // 3, 100) for r in rows])
    assert not few["checks"]["items"] and few["items"] == 100
    with pytest.raises(ValueError, match="vanilla"):
        chain_tables.signal(rows[1:])


def test_random_order_rows_are_measured_against_random_order_vanilla() -> None:
    """dKV-Greedy needs random remasking: its Δ (table and signal) is against vanilla in that order when the run
    has that row (as the dKV-Cache paper's "Base (random)"), against the first row otherwise; the vanilla rows
    are references, not strategies, in the signal."""
    rows = [_row("vanilla (one token a step)", 300), _row("vanilla (random order)", 50),
            _row("dKV greedy, cache_steps 2 (random order)", 62), _row("! dKV greedy, cache_steps 8 (random order)", 5),
            _row("dKV prefill", 300)]
    assert [chain_tables.reference(rows, i)["setting"] for i in range(5)] == [
        "vanilla (one token a step)", "vanilla (one token a step)", "vanilla (random order)",
        "vanilla (random order)", "vanilla (one token a step)"]
    text = chain_tables.markdown(rows)
    assert "| dKV greedy, cache_steps 2 (random order) | 20.7 % [16.5, 25.6] (62/300) | +4.0 |" in text
    assert "| vanilla (random order) | 16.7 % [12.9, 21.3] (50/300) | -83.3 |" in text
    sig = chain_tables.signal(rows)
    assert sig["met"] and sig["strongest_aggressive"] == ("! dKV greedy, cache_steps 8 (random order)",
                                                          pytest.approx(15.0))
    without = [rows[0], *rows[2:]]  # an older table without the reference row: against the first row
    assert chain_tables.reference(without, 1) is rows[0]
    assert not chain_tables.signal(without)["checks"]["defaults"]


def test_chain_sweep_trains_tables_and_summarizes(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """examples/chain_sweep.py end to end at toy size: two seeds trained side by side, a yardstick each, the
    per-run signal and the pairwise ranking in summary.json; the sweep's own flags are refused after '--'."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chain_sweep", ROOT / "examples" / "chain_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep"
    code = sweep.main(["--arch", "llada", "--seeds", "1", "2", "--out", str(out), "--limit", "2", "--batch-size", "2",
                       "--", "--steps", "2", "--batch-size", "2", "--no-eval"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["signal"]) == {"llada-s1", "llada-s2"} and list(summary["ranking"]) == ["llada-s1 vs llada-s2"]
    assert summary["signal"]["llada-s1"]["items"] == 2 and not summary["signal"]["llada-s1"]["met"]
    rows = json.loads((out / "llada-s1" / "yardstick.json").read_text())
    assert rows[0]["setting"].startswith("vanilla") and len(rows) == len(
        chain_tables.table_settings("yardstick", "llada", chain.GEN_LENGTH))
    assert "| llada-s1 vs llada-s2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sweep.parse_args(["--arch", "llada", "--seeds", "1", "--out", "x", "--", "--seed", "3"])
    with pytest.raises(SystemExit):
        sweep.parse_args(["--arch", "llada", "--seeds", "1", "1", "--out", "x"])


def test_markdown_has_interval_and_drop() -> None:
    text = chain_tables.markdown([_row("v", 270), _row("x", 150)])
    assert "| x | 50.0 % [44.4, 55.6] (150/300) | -40.0 | 1.00× |" in text


def test_cli_errors() -> None:
    with pytest.raises(ValueError, match="--limit"):
        chain.main(["--model", "x", "--limit", "0"])
    with pytest.raises(SystemExit):
        chain.main(["--limit", "3"])  # no --model


def test_write_test_set_reproduces_the_shipped_file(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "chain_test.jsonl"
    assert chain.main(["--write-test-set", str(out)]) == 0
    assert out.read_bytes() == open(chain.DATA_PATH, "rb").read()
    assert f"wrote {chain.TEST_SIZE} held-out items" in capsys.readouterr().out


def test_commit_trace_errors_and_summary() -> None:
    from dkvcache.tasks import chain_trace

    with pytest.raises(ValueError, match="--limit"):
        chain_trace.main(["--model", "x", "--limit", "0"])
    with pytest.raises(ValueError, match="generation_tokens_hook_func"):
        chain_trace.trace(None, None, [], generation_tokens_hook_func=print)
    commit = chain_trace.Commit
    result = chain_trace.Trace(
        commits=[commit(0, 0, 0, 0, True, 1e-4, 2, False), commit(0, 0, 3, 3, False, 0.7, 2, True),
                 commit(0, 1, 4, 1, False, 1e-4, 1, True), commit(1, 0, 1, 1, True, 1e-4, 1, True)],
        correct_rows=[False, True])
    assert [(c.row, c.state) for c in result.first_errors()] == [(0, 3)]
    text = chain_trace.summary(result)
    assert "| 3 | 1 | 1 | 1 | - | 0.7 |" in text and "| 1 | 2 | 1 | 0 |" in text
    assert "1/2 paths right; 1 rows committed a wrong state." in text
    assert "in 1 of 1 it was the most uncertain" in text
