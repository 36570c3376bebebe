"""The named accuracy-vs-speed tables of the tiny task (dkvcache.tasks.arith_tables) and their CLI."""

from __future__ import annotations

import os

import pytest

from dkvcache.tasks import arith, arith_tables

pytestmark = pytest.mark.slow  # deselect with -m "not slow" (README)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"dream": os.path.join(ROOT, "assets", "tiny-dream"), "llada": os.path.join(ROOT, "assets", "tiny-llada")}


def test_bad_table_or_family_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="table must be one of signal, dkv"):
        arith_tables.table_settings("fastdllm", "llada", 64)
    with pytest.raises(ValueError, match="family must be 'dream' or 'llada'"):
        arith_tables.table_settings("dkv", "gpt", 64)


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_every_table_starts_with_vanilla_and_has_unique_labels(family: str) -> None:
    for name in arith_tables.TABLES:
        rows = arith_tables.table_settings(name, family, arith.GEN_LENGTH)
        labels = [label for label, _ in rows]
        assert len(set(labels)) == len(labels)
        assert rows[0][1] == {}  # the speed-up reference is the task's vanilla decoding
    greedy = [kw for _, kw in arith_tables.table_settings("dkv", family, 64) if kw.get("cache_type") == "greedy"]
    assert bool(greedy) == (family == "llada")  # greedy is LLaDA's variant


@pytest.mark.parametrize("table", arith_tables.TABLES)
@pytest.mark.parametrize("family", ["dream", "llada"])
def test_table_cli_runs_every_setting(table: str, family: str, capsys: pytest.CaptureFixture) -> None:
    assert arith.main(["--model", MODELS[family], "--table", table, "--limit", "1", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("| setting |"):].strip().splitlines()
    settings = arith_tables.table_settings(table, family, arith.GEN_LENGTH)
    assert len(lines) == 2 + len(settings)
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == [label for label, _ in settings]
    assert "| 1.00× |" in lines[2]


def test_markdown_speedup_is_relative_to_the_first_row() -> None:
    rows = [{"setting": "a", "accuracy": 1.0, "wall_time_s": 4.0, "tokens_per_forward": 0.5, "tokens_per_s": 10,
             "fed_fraction": 1.0},
            {"setting": "b", "accuracy": 0.5, "wall_time_s": 1.0, "tokens_per_forward": 2.0, "tokens_per_s": 40,
             "fed_fraction": 0.25, "correct": 1, "n": 2}]
    text = arith_tables.markdown(rows)
    assert "| b | 50.0 % (1/2) | 4.00× | 2.00 | 40 | 0.25 |" in text
    assert "| a | 100.0 % | 1.00× |" in text
