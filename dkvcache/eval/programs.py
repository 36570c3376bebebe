"""Turn a code completion into the test program the sandbox runs (humaneval, mbpp).

Post-processing (the same for both tasks, close to d2Cache's/evalplus' "sanitize" and Dream's postprocess_code):
  1. if the completion holds a fenced code block, keep the code of the first one (instruct models);
  2. keep the longest prefix of lines that parses (drops a trailing half-written line, prose, junk tokens);
  3. keep only top-level imports, functions, classes and assignments (drops example calls, prints,
     ``if __name__ == "__main__":`` blocks, stray asserts), so the tests decide alone.
humaneval program: sanitized(prompt + completion) + test + ``check(entry_point)``.
mbpp program: sanitized(completion) + test_setup_code + the test asserts (``test_list``).
"""

from __future__ import annotations

import ast
import re

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
         ast.AnnAssign)


def extract_fenced(text: str) -> str:
    """The code of the first fenced block, or ``text`` unchanged when there is none."""
    found = _FENCE.search(text)
    return found.group(1) if found else text


def longest_parsable_prefix(code: str) -> tuple[str, ast.Module | None]:
    """The longest prefix of whole lines that is valid Python, with its AST (None if no prefix parses)."""
    lines = code.split("\n")
    for end in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:end])
        try:
            return candidate, ast.parse(candidate)
        except (SyntaxError, ValueError):
            continue
    return "", None


def sanitize(code: str) -> str:
    """Steps 2 and 3 of the module doc. Code without any valid prefix is returned unchanged (it will fail)."""
    code = code.replace("\r\n", "\n")
    prefix, tree = longest_parsable_prefix(code)
    if tree is None:
        return code
    lines = prefix.split("\n")
    kept = []
    for node in tree.body:
        if isinstance(node, _KEEP):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[first - 1: node.end_lineno]))
    return "\n".join(kept) + "\n"


def humaneval_program(item: dict, completion: str, prefix: str = "") -> str:
    """``completion`` continues ``prefix`` (chat: the answer prefix) or the raw prompt (base)."""
    if prefix:  # "Here is the completed function:\n```python\n{prompt}" + completion, up to the closing fence
        code = (prefix + completion).split("```python\n", 1)[-1].split("```", 1)[0]
    elif "```" in completion:
        code = extract_fenced(completion)
        if f"def {item['entry_point']}" not in code:
            code = item["prompt"] + code
    else:
        code = item["prompt"] + completion
    return sanitize(code) + "\n" + item["test"] + f"\ncheck({item['entry_point']})\n"


def mbpp_program(item: dict, completion: str) -> str:
    code = sanitize(extract_fenced(completion))
    setup = item.get("test_setup_code") or ""
    return code + "\n" + setup + "\n" + "\n".join(item["test_list"]) + "\n"
