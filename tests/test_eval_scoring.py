"""Eval scoring: math answers (correct / wrong / malformed), code post-processing, and the execution sandbox."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("math_verify", reason="the eval extras (pip install -e '.[eval]') are not installed")

from dkvcache.eval import programs, sandbox, scoring  # noqa: E402

GSM8K_ITEM = {"question": "q", "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,234"}
MATH_ITEM = {"problem": "p", "solution": "So the answer is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}"}
ARITH_ITEM = {"question": "q", "answer": "apples:7\npears:7+3=10\n#### 10"}


@pytest.mark.parametrize("completion, score, strict, flexible", [
    ("She sold 1234 clips in all.\n#### 1234", 1.0, 1.0, 1.0),
    ("so 1,234 clips.\n#### 1,234", 1.0, 1.0, 1.0),
    ("The answer is 1234.", 1.0, 0.0, 1.0),  # no "####": math-verify reads the final answer
    ("#### 1234.0", 1.0, 0.0, 0.0),  # numerically equal; lm-eval's exact match is stricter
    ("#### 1233", 0.0, 0.0, 0.0),
    ("= 1234. So the final answer is 41.", 0.0, 0.0, 0.0),
    ("", 0.0, 0.0, 0.0),
    ("I do not know ### ## %%", 0.0, 0.0, 0.0),
])
def test_gsm8k(completion: str, score: float, strict: float, flexible: float) -> None:
    got, metrics = scoring.score_gsm8k(GSM8K_ITEM, completion)
    assert got == score
    assert metrics["strict_match"] == strict and metrics["flexible_extract"] == flexible


@pytest.mark.parametrize("completion, score", [
    ("Thus $x = \\boxed{0.5}$.\nFinal Answer: The final answer is $\\frac12$. I hope it is correct.", 1.0),
    ("Final Answer: The final answer is $0.5$. I hope it is correct.", 1.0),
    ("we get \\boxed{\\dfrac{1}{2}}", 1.0),
    ("Final Answer: The final answer is $\\frac{1}{3}$. I hope it is correct.", 0.0),
    ("\\boxed{\\frac{1}{", 0.0),  # unbalanced braces
    ("", 0.0),
])
def test_math500(completion: str, score: float) -> None:
    assert scoring.score_math500(MATH_ITEM, completion)[0] == score


def test_math500_gold_from_the_solution_when_no_answer_field() -> None:
    item = {"problem": "p", "solution": "Hence $\\boxed{[2,5)}$."}
    assert scoring.math500_gold(item) == "[2,5)"
    assert scoring.score_math500(item, "Final Answer: The final answer is $[2,5)$. I hope it is correct.")[0] == 1


@pytest.mark.parametrize("completion, score", [
    ("apples:7\npears:7+3=10\n#### 10", 1.0),
    ("apples:7\npears:7+3=11\n#### 11", 0.0),
    ("garbage", 0.0),
])
def test_arith(completion: str, score: float) -> None:
    assert scoring.score_arith(ARITH_ITEM, completion)[0] == score


def test_math_verify_without_signal_in_a_thread() -> None:
    """parse() uses signal.alarm in the main thread only; scoring from a worker thread still works."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(scoring.score_gsm8k, GSM8K_ITEM, "#### 1234").result()[0] == 1.0


# -- code --------------------------------------------------------------------------------------------------------
HUMANEVAL = {"task_id": "HumanEval/x", "entry_point": "add",
             "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
             "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
MBPP = {"task_id": 1, "text": "Write a function to add.", "test_setup_code": "",
        "test_list": ["assert add(2, 3) == 5", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]}


def test_sanitize_keeps_definitions_drops_calls_and_junk() -> None:
    code = ("import math\n\ndef helper(x):\n    return x\n\n@staticmethod\ndef add(a, b):\n    return helper(a) + b\n"
            "\nprint(add(1, 2))\nif __name__ == '__main__':\n    input()\nK = 3\nthis is not python (")
    out = programs.sanitize(code)
    assert "import math" in out and "def helper" in out and "@staticmethod" in out and "K = 3" in out
    assert "print(" not in out and "__main__" not in out and "not python" not in out


def test_humaneval_and_mbpp_programs() -> None:
    base = scoring.build_program("humaneval", HUMANEVAL, "    return a + b\n\nprint(add(1, 2))\n<junk")
    assert base.startswith(HUMANEVAL["prompt"]) and "check(add)" in base and "print(" not in base
    prefix = "Here is the completed function:\n```python\n" + HUMANEVAL["prompt"]
    chat = scoring.build_program("humaneval", HUMANEVAL, "    return a + b\n```\nExplanation", prefix)
    assert "Here is" not in chat and "Explanation" not in chat and "return a + b" in chat
    fenced = scoring.build_program("mbpp", MBPP, "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.")
    assert fenced.startswith("def add(a, b):") and fenced.rstrip().endswith("assert add(-1, 1) == 0")


def test_score_batch_code_pass_fail_and_malformed() -> None:
    completions = ["    return a + b\n", "    return a - b\n", "    return (a +\n", ""]
    results = scoring.score_batch("humaneval", [HUMANEVAL] * 4, completions, scoring={"timeout_s": 5})
    assert [s for s, _ in results] == [1.0, 0.0, 0.0, 0.0]
    assert results[1][1]["result"].startswith("failed: AssertionError")
    mbpp = scoring.score_batch("mbpp", [MBPP, MBPP], ["def add(a, b):\n    return a + b\n[DONE]",
                                                      "def add(a, b):\n    return 5\n"])
    assert [s for s, _ in mbpp] == [1.0, 0.0]


def test_sandbox_kills_an_infinite_loop() -> None:
    start = time.perf_counter()
    result = sandbox.run_program("while True:\n    pass\n", timeout_s=1.0)
    assert not result.passed and result.status == "timed out"
    assert time.perf_counter() - start < 5


def test_sandbox_contains_a_memory_bomb() -> None:
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    result = sandbox.run_program(bomb, timeout_s=10.0, memory_mb=256)
    assert not result.passed and "MemoryError" in result.status
    swallowing = ("chunks = []\nwhile True:\n    try:\n        chunks.append(bytearray(50 * 1024 * 1024))\n"
                  "    except MemoryError:\n        pass\n")
    result = sandbox.run_program(swallowing, timeout_s=1.0, memory_mb=256)
    assert not result.passed and result.status == "timed out"


@pytest.mark.parametrize("source, status", [
    ("import os\nos._exit(0)\n", "failed: exit status 0"),  # early exit is not a pass
    ("raise SystemExit(0)\n", "failed: SystemExit"),
    ("import ctypes\nctypes.string_at(0)\n", "crashed: SIGSEGV"),
    ("print('noise')\nx = input()\n", "failed: EOFError"),
    ("def f(:\n", "failed: SyntaxError"),
])
def test_sandbox_failures_score_zero(source: str, status: str) -> None:
    result = sandbox.run_program(source, timeout_s=5.0)
    assert not result.passed and result.status.startswith(status)


def test_sandbox_pass_and_parallel() -> None:
    results = sandbox.run_programs(["assert sum([1, 2]) == 3"] * 3 + ["assert False"], workers=2)
    assert [r.passed for r in results] == [True, True, True, False]
