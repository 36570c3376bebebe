"""The arithmetic yardstick task: generator, content split, shipped held-out JSONL, scorer, CLI argument parsing."""

import random

import pytest

from dkvcache.tasks import arith


def test_item_format_and_value():
    item = arith.make_item([7, 3, 9, 2, 5], ["apples", "pears", "plums", "figs", "limes"], template=0, name=0)
    assert item.question == "Tom has 7 apples, 3 pears, 9 plums, 2 figs and 5 limes. How many fruits does he have?"
    assert item.answer == "07+3=10\n10+9=19\n19+2=21\n21+5=26\n#### 26"
    assert item.target == 26
    assert arith.make_item([1, 2, 3, 4], template=2).question == (
        "A basket holds 1 apples, 2 pears, 3 plums and 4 figs. How many fruits are in the basket?")
    with pytest.raises(ValueError):
        arith.make_item([1, 2, 3, 4], ["apples", "apples", "pears", "figs"])


def test_generator_is_deterministic_and_well_formed():
    a = [arith.sample_item(random.Random(5)) for _ in range(3)]
    b = [arith.sample_item(random.Random(5)) for _ in range(3)]
    assert a == b
    rng = random.Random(0)
    for _ in range(300):
        item = arith.sample_item(rng, "train")
        assert arith.MIN_TERMS <= len(item.terms) <= arith.MAX_TERMS
        assert all(1 <= t <= 9 for t in item.terms) and len(set(item.labels)) == len(item.labels)
        assert arith.extract_answer(item.answer) == str(sum(item.terms))
        for t, label in zip(item.terms, item.labels):
            assert f" {t} {label}" in item.question
        # every written step is a correct addition and chains from the previous total
        lines = item.answer.split("\n")
        assert len(lines) == len(item.terms)
        total = item.terms[0]
        for line, term in zip(lines[:-1], item.terms[1:]):
            assert line == f"{total:02d}+{term}={total + term:02d}"
            total += term


def test_split_is_by_content():
    rng = random.Random(1)
    train = {arith.sample_item(rng, "train").terms for _ in range(2000)}
    test = {arith.sample_item(rng, "test").terms for _ in range(300)}
    assert not train & test
    assert all(not arith.is_test(t) for t in train) and all(arith.is_test(t) for t in test)
    # the split does not depend on phrasing or seed: the same terms land on the same side
    assert arith.is_test((1, 8, 6, 8)) == arith.is_test([1, 8, 6, 8])
    assert sum(arith.is_test(t) for t in train | test) == len(test)


def test_shipped_heldout_jsonl():
    rows = arith.load_jsonl()
    assert len(rows) == arith.TEST_SIZE
    assert len({r["question"] for r in rows}) == len(rows)
    fresh = arith.make_test_items()
    for row, item in zip(rows, fresh):
        assert set(row) >= {"question", "answer"}
        assert row["question"] == item.question and row["answer"] == item.answer
        assert row["answer"].rsplit("\n", 1)[-1] == f"#### {item.target}"
        assert arith.is_test(item.terms)
    assert len(arith.load_jsonl(limit=7)) == 7


@pytest.mark.parametrize("text,expected", [
    ("01+2=03\n03+4=07\n#### 7", "7"),
    ("#### 12 apples", "12"),
    ("so the answer is 41", "41"),
    ("no number", None),
    ("3+4=7\n####", "7"),
    ("#### -5", "-5"),
])
def test_extract_answer(text, expected):
    assert arith.extract_answer(text) == expected


def test_is_correct():
    assert arith.is_correct("5+6=11\n#### 11", "5+6=11\n#### 11")
    assert arith.is_correct("#### 11.0", "#### 11")
    assert not arith.is_correct("5+6=12\n#### 12", "#### 11")
    assert not arith.is_correct("", "#### 11")


def test_parse_overrides():
    got = arith.parse_overrides(["steps=8", "--alg", "maskgit_plus", "--threshold=0.9", "use_cache=true",
                                 "--block-length", "none", "seed=[1,2]", "--eos_early_stop", "cache_type=decoded"])
    assert got == {"steps": 8, "alg": "maskgit_plus", "threshold": 0.9, "use_cache": True, "block_length": None,
                   "seed": [1, 2], "eos_early_stop": True, "cache_type": "decoded"}
    with pytest.raises(SystemExit):
        arith.parse_overrides(["oops"])


def test_merge_kwargs_family_defaults():
    dream = arith.merge_kwargs("dream", {"steps": 16})
    assert dream == {"max_new_tokens": 64, "steps": 16, "alg": "entropy", "temperature": 0.0}
    llada = arith.merge_kwargs("llada", {"max_new_tokens": 64, "alg": "maskgit_plus", "threshold": 0.9})
    assert "gen_length" not in llada and "remasking" not in llada
    assert llada["threshold"] == 0.9 and llada["block_length"] == 32
    with pytest.raises(ValueError):
        arith.default_generation_kwargs("gpt")


class _FakeTokenizer:
    """Characters as ids; id 0 is EOS (special)."""

    chat_template = None

    def apply_chat_template(self, messages, **_):
        return messages[0]["content"]

    def __call__(self, texts, **_):
        import torch

        width = max(len(t) for t in texts)
        ids = torch.tensor([[1] * (width - len(t)) + [ord(c) for c in t] for t in texts])
        return {"input_ids": ids, "attention_mask": (ids != 1).long()}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids if not (skip_special_tokens and int(i) == 0))


class _FakeModel:
    """Answers '#### 7', then EOS, then a stray '5' after the EOS (as a parallel decoder can leave)."""

    def diffusion_generate(self, input_ids, attention_mask=None, **_):
        import torch

        answer = [ord(c) for c in "#### 7"] + [0, 0, ord("5"), 0]
        gen = torch.tensor([answer] * input_ids.shape[0])

        class Out:
            sequences = torch.cat([input_ids, gen], dim=1)
            stats = {"response_tokens": [6] * input_ids.shape[0], "forwards": 3, "wall_time_s": 0.1,
                     "fed_fraction": 1.0}
        return Out()


def test_evaluate_cuts_the_answer_at_the_first_eos():
    rows = [{"question": "q?", "answer": "#### 7"}]
    res = arith.evaluate(_FakeModel(), _FakeTokenizer(), rows)
    assert res["predictions"][0]["prediction"] == "#### 7" and res["accuracy"] == 1.0
