"""Prompt text per task: raw few-shot for base models, the tokenizer's chat template for instruct/tiny models.

Formats (as lm-eval's tasks that the anchors run; few-shot exemplars from :mod:`dkvcache.eval.fewshot`, joined
by a blank line; for chat models the whole few-shot context is one user turn, as d2Cache does):
  gsm8k      ``Question: {question}\\nAnswer:``                     stop ``Question:``
  math-500   ``Problem:\\n{problem}\\n\\nSolution:``               stop ``Problem:``
  mbpp       ``You are an expert Python programmer, … [BEGIN]\\n``   stop ``[DONE]``
  humaneval  base: the raw prompt (the completion is sanitized, see ``programs``);
             chat: lm-eval's humaneval_instruct turn + the answer prefix ``Here is the completed function:``
             and an open python fence (stop at the closing fence)
  arith      the question alone (the tiny checkpoints' training format)
  chain      the question alone (the chain checkpoints' training format)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dkvcache.eval import fewshot

STOP_STRINGS = {
    "gsm8k": ["Question:", "</s>", "<|im_end|>"],
    "math-500": ["Problem:"],
    "mbpp": ["[DONE]"],
    "humaneval": [],
    "arith": [],
    "chain": [],
}
HUMANEVAL_INSTRUCT = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
HUMANEVAL_PREFIX = "Here is the completed function:\n```python\n"


@dataclass
class Prompt:
    """text: what is tokenized (template applied). prefix: answer text already in ``text`` that the completion
    continues (scored as ``prefix + completion``). stop: strings that end the completion."""

    text: str
    prefix: str = ""
    stop: tuple[str, ...] = ()


def _gsm8k(item: dict, n_shot: int) -> tuple[str, str]:
    shots = [f"Question: {e['question']}\nAnswer: {e['answer']}" for e in fewshot.GSM8K[:n_shot]]
    return "\n\n".join([*shots, f"Question: {item['question']}\nAnswer:"]), ""


def _math(item: dict, n_shot: int) -> tuple[str, str]:
    shots = [f"Problem:\n{e['problem']}\n\nSolution: {e['solution']}" for e in fewshot.MATH[:n_shot]]
    return "\n\n".join([*shots, f"Problem:\n{item['problem']}\n\nSolution:"]), ""


def _mbpp_query(item: dict) -> str:
    tests = "\n".join(item["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {item['text']} Your code should pass "
            f"these tests:\n\n{tests}\n[BEGIN]\n")


def _mbpp(item: dict, n_shot: int) -> tuple[str, str]:
    shots = [_mbpp_query(e) + e["code"] + "\n[DONE]" for e in fewshot.MBPP[:n_shot]]
    return "\n\n".join([*shots, _mbpp_query(item)]), ""


def _arith(item: dict, n_shot: int) -> tuple[str, str]:
    return item["question"], ""


BUILDERS = {"gsm8k": _gsm8k, "math-500": _math, "mbpp": _mbpp, "arith": _arith, "chain": _arith}


def check_n_shot(task: str, n_shot: int) -> None:
    limit = fewshot.LIMITS.get(task, 0)
    if isinstance(n_shot, bool) or not isinstance(n_shot, int) or not 0 <= n_shot <= limit:
        raise ValueError(f"dataset.n_shot={n_shot!r} is invalid for {task!r}; allowed: 0..{limit} (the shipped "
                         "exemplars)")


def chat_text(tokenizer: Any, user: str) -> str:
    """One user turn through the tokenizer's chat template, with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use a base-model config (model.kind=base)")
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)


def build_prompt(task: str, item: dict, n_shot: int, chat: bool, tokenizer: Any = None) -> Prompt:
    """The prompt of one item (``chat``: through the tokenizer's template)."""
    check_n_shot(task, n_shot)
    stop = tuple(STOP_STRINGS.get(task, ()))
    if task == "humaneval":
        if not chat:
            return Prompt(item["prompt"], "", stop)
        user = HUMANEVAL_INSTRUCT + item["prompt"] + "\n```\n"
        prefix = HUMANEVAL_PREFIX + item["prompt"]
        return Prompt(chat_text(tokenizer, user) + prefix, prefix, ("```",))
    if task not in BUILDERS:
        raise ValueError(f"no prompt format for task {task!r}; allowed: {sorted([*BUILDERS, 'humaneval'])}")
    context, prefix = BUILDERS[task](item, n_shot)
    if chat:
        return Prompt(chat_text(tokenizer, context) + prefix, prefix, stop)
    return Prompt(context + prefix, prefix, stop)


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                end = min(end, i)
    return text[:end]
