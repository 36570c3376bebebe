"""Score completions: math answers with math-verify (+ the anchors' extraction rules), code by execution.

Per task, ``score`` (what ``accuracy`` averages) and extra ``metrics``:
  gsm8k     score = math-verify(gold number, the ``#### N`` answer if present, else the whole completion);
            metrics ``strict_match`` / ``flexible_extract``: lm-eval gsm8k's exact match after its two filters
            (first ``#### N``; last number) and its normalisation (case, ``,``, ``$``, trailing ``.``).
  math-500  score = math-verify(gold answer, the Minerva ``Final Answer: The final answer is X. I hope it is
            correct.`` if present, else the last ``\\boxed{}``, else the whole completion); metric
            ``math_verify_full`` = math-verify(gold solution, whole completion) (lm-eval's minerva math_verify).
  humaneval, mbpp  score = the test program ran to its end in the sandbox (pass@1 with one greedy sample);
            metric ``result``: passed / failed: … / timed out / crashed: ….
  arith     score = :func:`dkvcache.tasks.arith.is_correct` (the tiny task's own rule).
  chain     score = :func:`dkvcache.tasks.chain.is_correct` (exact match of the written path).
math-verify's ``parse`` uses ``signal.alarm`` for its timeout, which only works in the main thread: elsewhere it
is called without a timeout (``parsing_timeout=None``); the harness scores in its main thread.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from dkvcache.eval import programs, sandbox

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]
_MINERVA = re.compile(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.", re.DOTALL)


def _timeouts() -> dict:
    main = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": 5 if main else None}


def math_equal(gold: str, prediction: str) -> bool:
    """math-verify equivalence of two answer texts (LaTeX or plain); False on anything unparsable."""
    from math_verify import parse, verify

    try:
        gold_parsed = parse(gold, **_timeouts())
        pred_parsed = parse(prediction, **_timeouts())
        if not gold_parsed or not pred_parsed:
            return False
        main = threading.current_thread() is threading.main_thread()
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=5 if main else None))
    except Exception:  # math-verify raises on pathological input despite raise_on_error=False
        return False


def _dollars(text: str) -> str:
    text = text.strip()
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def _lm_eval_normalize(text: str) -> str:
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def gsm8k_gold(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def gsm8k_extract(completion: str) -> tuple[str | None, str | None]:
    """(strict: the first ``#### N``, flexible: the last number) as lm-eval's gsm8k filters, or None."""
    strict = _STRICT.search(completion)
    flexible = [m for m in _FLEXIBLE.findall(completion)]
    last = None
    if flexible:
        group = flexible[-1]
        last = group[0] or group[1]
    return (strict.group(1) if strict else None), last


def score_gsm8k(item: dict, completion: str) -> tuple[float, dict]:
    gold = gsm8k_gold(item["answer"])
    strict, flexible = gsm8k_extract(completion)
    metrics = {
        "extracted": strict if strict is not None else flexible,
        "strict_match": float(strict is not None and _lm_eval_normalize(strict) == _lm_eval_normalize(gold)),
        "flexible_extract": float(flexible is not None and _lm_eval_normalize(flexible) == _lm_eval_normalize(gold)),
    }
    candidate = strict.rstrip(".").replace(",", "") if strict is not None else completion
    return float(bool(completion.strip()) and math_equal(_dollars(gold), candidate)), metrics


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


def math500_gold(item: dict) -> str:
    if item.get("answer"):
        return str(item["answer"])
    boxed = last_boxed(item["solution"])
    return boxed if boxed is not None else item["solution"]


def math500_extract(completion: str) -> str | None:
    found = _MINERVA.search(completion)
    if found:
        return found.group(1).strip()
    boxed = last_boxed(completion)
    return f"\\boxed{{{boxed}}}" if boxed is not None else None


def score_math500(item: dict, completion: str) -> tuple[float, dict]:
    gold = math500_gold(item)
    extracted = math500_extract(completion)
    candidate = _dollars(extracted) if extracted is not None else completion
    metrics = {"extracted": extracted,
               "math_verify_full": float(bool(completion.strip()) and math_equal(item["solution"], completion))}
    return float(bool(completion.strip()) and math_equal(_dollars(gold), candidate)), metrics


def score_arith(item: dict, completion: str) -> tuple[float, dict]:
    from dkvcache.tasks import arith

    return float(arith.is_correct(completion, item["answer"])), {"extracted": arith.extract_answer(completion)}


def score_chain(item: dict, completion: str) -> tuple[float, dict]:
    from dkvcache.tasks import chain

    return float(chain.is_correct(completion, item["answer"])), {"extracted": chain.extract_answer(completion)}


MATH_SCORERS = {"gsm8k": score_gsm8k, "math-500": score_math500, "arith": score_arith, "chain": score_chain}
CODE_TASKS = ("humaneval", "mbpp")


def build_program(task: str, item: dict, completion: str, prefix: str = "") -> str:
    if task == "humaneval":
        return programs.humaneval_program(item, completion, prefix)
    return programs.mbpp_program(item, completion)


def score_batch(task: str, items: list[dict], completions: list[str], prefixes: list[str] | None = None,
                scoring: dict[str, Any] | None = None) -> list[tuple[float, dict]]:
    """(score, metrics) per completion. Code runs in sandboxed processes, never in this one."""
    scoring = scoring or {}
    if task in MATH_SCORERS:
        return [MATH_SCORERS[task](item, c) for item, c in zip(items, completions)]
    if task not in CODE_TASKS:
        raise ValueError(f"no scorer for task {task!r}; allowed: {sorted([*MATH_SCORERS, *CODE_TASKS])}")
    prefixes = prefixes or [""] * len(items)
    sources = [build_program(task, item, c, p) for item, c, p in zip(items, completions, prefixes)]
    results = sandbox.run_programs(sources, timeout_s=float(scoring.get("timeout_s", 10.0)),
                                   memory_mb=int(scoring.get("memory_mb", 1024)),
                                   workers=int(scoring.get("workers", 2)))
    return [(float(r.passed), {"result": r.status}) for r in results]
