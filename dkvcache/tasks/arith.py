"""The synthetic arithmetic task of the tiny checkpoints: generator, train/test split, scorer and evaluator.

Task: a GSM8K-like word problem -- add 4-6 single-digit counts of different fruits, writing the running total
line by line, then the final answer in GSM8K style::

    question: "Tom has 7 apples, 3 pears, 9 plums and 2 figs. How many fruits does he have?"
    answer:   "07+3=10\n10+9=19\n19+2=21\n#### 21"

Answers are 28-44 tokens (one token per character, ``####`` is one token). Each line reads
the total of the line before; the totals are also prefix sums of the prompt's counts, which a bidirectional
model can compute for all lines at once, so the task shows the cost of staleness and parallel decoding only at
the few-percent level (see the signal check in ``assets/README.md``).

Split: by content. An item belongs to the test split iff the SHA-256 of its list of counts (e.g. ``"7,3,9,2"``)
modulo 10 is 0, so no list of counts of a held-out item is ever seen in training, whatever the seed, fruit
names or phrasing. The held-out items shipped in ``dkvcache/tasks/data/arith_test.jsonl`` (schema
``{"id", "question", "answer"}``, ``answer`` ending ``#### N``) are drawn from the test split only.

CLI (the quality yardstick of every cache strategy)::

    python -m dkvcache.tasks.arith --model assets/tiny-dream [--limit N] [--batch-size N] [key=value ...]

Any ``diffusion_generate`` keyword can be given as ``key=value`` or ``--key value`` (numbers, true/false,
none and JSON lists are parsed); it is passed through unchanged. ``--table NAME`` prints one of the named
tables of ``dkvcache.tasks.arith_tables`` (``--signal`` = ``--table signal``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dkvcache.cli_values import parse_value
from dkvcache.tasks import arith_tables

MIN_TERMS = 4
MAX_TERMS = 6
GEN_LENGTH = 64  # the generation length every default setting uses (the longest answer is 44 tokens)
TEST_FRACTION_MOD = 10  # one list of counts in ten is held out
DATA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arith_test.jsonl")
TEST_SEED = 20250601
TEST_SIZE = 300

FRUITS = ("apples", "pears", "plums", "figs", "limes", "kiwis", "dates", "grapes", "lemons", "mangos", "melons",
          "peaches")
NAMES = (("Tom", "he"), ("Sam", "he"), ("Ann", "she"), ("Mia", "she"))
# Question phrasings; {items} is "7 apples, 3 pears and 9 plums".
TEMPLATES = (
    "{name} has {items}. How many fruits does {pron} have?",
    "{name} buys {items}. How many fruits does {pron} buy in total?",
    "A basket holds {items}. How many fruits are in the basket?",
    "{name} picks {items}. What is the total number of fruits?",
)

# Words the tiny tokenizers keep whole: WORDS with or without a leading space, FRUITS without one (a space before
# a fruit is its own token); everything else is one character.
WORDS = tuple(n for n, _ in NAMES) + (
    "he", "she", "has", "buys", "holds", "picks", "How", "many", "fruits", "does", "have", "buy", "in", "total",
    "are", "the", "basket", "What", "is", "number", "of", "and", "A", "You", "a", "helpful", "assistant", "system",
    "user", "####")


@dataclass(frozen=True)
class Item:
    """One problem: the counts, the fruit names, the question text and the gold answer text."""

    terms: tuple[int, ...]
    labels: tuple[str, ...]
    question: str
    answer: str

    @property
    def target(self) -> int:
        return sum(self.terms)


def content_key(terms: Sequence[int]) -> str:
    return ",".join(str(t) for t in terms)


def is_test(terms: Sequence[int]) -> bool:
    """The content split: True for the held-out lists of counts (about one in ten)."""
    digest = hashlib.sha256(content_key(terms).encode()).digest()
    return int.from_bytes(digest[:8], "big") % TEST_FRACTION_MOD == 0


def question_text(terms: Sequence[int], labels: Sequence[str], template: int, name: int = 0) -> str:
    parts = [f"{t} {label}" for t, label in zip(terms, labels)]
    items = ", ".join(parts[:-1]) + " and " + parts[-1]
    person, pron = NAMES[name]
    return TEMPLATES[template].format(name=person, pron=pron, items=items)


def answer_text(terms: Sequence[int]) -> str:
    """One addition per line, running totals written with two digits (so every line has the same width), then
    ``#### total``."""
    lines, total = [], terms[0]
    for t in terms[1:]:
        lines.append(f"{total:02d}+{t}={total + t:02d}")
        total += t
    return "\n".join(lines) + f"\n#### {total}"


def make_item(terms: Sequence[int], labels: Sequence[str] | None = None, template: int = 0, name: int = 0) -> Item:
    terms = tuple(int(t) for t in terms)
    labels = tuple(labels) if labels is not None else FRUITS[: len(terms)]
    if len(labels) != len(terms) or len(set(labels)) != len(labels):
        raise ValueError(f"need {len(terms)} distinct fruit names, got {labels!r}")
    return Item(terms, labels, question_text(terms, labels, template, name), answer_text(terms))


def sample_item(rng: random.Random, split: str = "train") -> Item:
    """Draw one item of ``split`` ("train" or "test") by rejection on the content hash."""
    want_test = split == "test"
    while True:
        n = rng.randint(MIN_TERMS, MAX_TERMS)
        terms = [rng.randint(1, 9) for _ in range(n)]
        labels = rng.sample(FRUITS, n)
        template, name = rng.randrange(len(TEMPLATES)), rng.randrange(len(NAMES))
        if is_test(terms) == want_test:
            return make_item(terms, labels, template, name)


def make_test_items(n: int = TEST_SIZE, seed: int = TEST_SEED) -> list[Item]:
    """``n`` held-out items with distinct lists of counts, deterministic in ``seed``."""
    rng, seen, items = random.Random(seed), set(), []
    while len(items) < n:
        item = sample_item(rng, "test")
        if item.terms not in seen:
            seen.add(item.terms)
            items.append(item)
    return items


def write_jsonl(items: Iterable[Any], path: str = DATA_PATH, id_prefix: str = "arith") -> None:
    """Held-out items (anything with ``question`` and ``answer``) as JSONL rows ``{"id", "question", "answer"}``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, item in enumerate(items):
            row = {"id": f"{id_prefix}-{i:04d}", "question": item.question, "answer": item.answer}
            f.write(json.dumps(row) + "\n")


def load_jsonl(path: str = DATA_PATH, limit: int | None = None) -> list[dict]:
    """The held-out items as dicts with ``question`` and ``answer`` (gsm8k schema)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


# -- scoring ---------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final number: the first number after the last ``####``, else the last number in the text."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        if found:
            return found.group(0)
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def gold_answer(answer: str) -> str:
    got = extract_answer(answer)
    if got is None:
        raise ValueError(f"gold answer without a number: {answer!r}")
    return got


def is_correct(prediction: str, answer: str) -> bool:
    got = extract_answer(prediction)
    if got is None:
        return False
    try:
        return float(got) == float(gold_answer(answer))
    except ValueError:
        return False


# -- evaluation ------------------------------------------------------------------------------------------------
def default_generation_kwargs(family: str, gen_length: int = GEN_LENGTH, block_length: int = 32) -> dict:
    """Vanilla decoding: one token per step over the answer window (64 tokens here), greedy."""
    if family == "dream":
        return {"max_new_tokens": gen_length, "steps": gen_length, "alg": "entropy", "temperature": 0.0}
    if family == "llada":
        return {"gen_length": gen_length, "steps": gen_length, "block_length": block_length,
                "remasking": "low_confidence", "temperature": 0.0}
    raise ValueError(f"unknown diffusion family {family!r}; expected 'dream' or 'llada'")


def merge_kwargs(family: str, overrides: dict, **window: int) -> dict:
    """Family defaults (``window``: gen_length / block_length of another task) updated by ``overrides``; a
    LLaDA-style name replaces its Dream-style twin and back."""
    kwargs = default_generation_kwargs(family, **window)
    twins = {"gen_length": "max_new_tokens", "max_new_tokens": "gen_length", "remasking": "alg", "alg": "remasking"}
    for key in overrides:
        if key in twins:
            kwargs.pop(twins[key], None)
    kwargs.update(overrides)
    return kwargs


def chat_prompts(tokenizer: Any, questions: Sequence[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=False) for q in questions]


def evaluate(model: Any, tokenizer: Any, rows: Sequence[dict], batch_size: int = 64, progress: bool = False,
             scorer: Callable[[str, str], bool] | None = None, **gen_kwargs: Any) -> dict:
    """Accuracy and speed of ``model.diffusion_generate(**gen_kwargs)`` on ``rows`` (dicts with question/answer).

    ``gen_kwargs`` are passed through unchanged (with ``return_dict_in_generate=True`` added); ``scorer``
    (prediction, gold answer) -> bool defaults to :func:`is_correct`. Returns accuracy,
    n, tokens_per_s (response tokens up to EOS over generation wall time), tokens_per_forward, forwards (per
    batch, summed), the predictions and the summed per-batch stats.
    """
    import torch

    gen_kwargs = dict(gen_kwargs)
    gen_kwargs["return_dict_in_generate"] = True
    device = getattr(model, "device", torch.device("cpu"))
    correct, predictions = 0, []
    tokens = forwards_x_rows = forwards = 0
    seconds = fed_x_rows = 0.0
    batches = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", unit="batch")
    for start in batches:
        chunk = rows[start:start + batch_size]
        enc = tokenizer(chat_prompts(tokenizer, [r["question"] for r in chunk]), return_tensors="pt",
                        padding=True, padding_side="left", add_special_tokens=False)
        out = model.diffusion_generate(enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                       **gen_kwargs)
        prompt_length = enc["input_ids"].shape[1]
        stats = out.stats or {}
        # The answer ends at the first EOS: whatever a row decoded after it is not part of the answer (the same
        # cut as the token count and the eval harness).
        lengths = stats.get("response_tokens") or [out.sequences.shape[1] - prompt_length] * len(chunk)
        texts = [tokenizer.decode(seq[:n], skip_special_tokens=True)
                 for seq, n in zip(out.sequences[:, prompt_length:].cpu(), lengths)]
        batch_tokens = int(sum(stats.get("response_tokens", [0])))
        tokens += batch_tokens
        forwards += int(stats.get("forwards", 0))
        forwards_x_rows += int(stats.get("forwards", 0)) * len(chunk)
        seconds += float(stats.get("wall_time_s", 0.0))
        fed_x_rows += float(stats.get("fed_fraction", 1.0)) * len(chunk)
        for row, text in zip(chunk, texts):
            ok = (scorer or is_correct)(text, row["answer"])
            correct += ok
            predictions.append({"question": row["question"], "prediction": text, "correct": bool(ok)})
    n = len(rows)
    return {
        "accuracy": correct / n if n else float("nan"),
        "correct": correct,
        "n": n,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "tokens_per_forward": tokens / forwards_x_rows if forwards_x_rows else float("nan"),
        "forwards": forwards,
        "fed_fraction": fed_x_rows / n if n else float("nan"),
        "response_tokens": tokens,
        "wall_time_s": seconds,
        "predictions": predictions,
    }


# -- CLI -------------------------------------------------------------------------------------------------------
def parse_overrides(args: Sequence[str]) -> dict:
    """``key=value``, ``--key value``, ``--key=value`` and bare ``--flag`` (True) → kwargs (dashes → underscores);
    values through :func:`dkvcache.cli_values.parse_value`."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
                out[key.replace("-", "_")] = parse_value(value)
            elif i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                out[body.replace("-", "_")] = parse_value(args[i + 1])
                i += 1
            else:
                out[body.replace("-", "_")] = True
        elif "=" in arg:
            key, value = arg.split("=", 1)
            out[key.replace("-", "_")] = parse_value(value)
        else:
            raise SystemExit(f"arith: cannot parse argument {arg!r}; use key=value or --key value")
        i += 1
    return out


def load_model(path: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint directory or Hub id (see :mod:`dkvcache.loading`)."""
    from dkvcache.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(path, dtype, device)


def _fmt(result: dict) -> str:
    return (f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['n']})  "
            f"tokens/s {result['tokens_per_s']:.1f}  tokens/forward {result['tokens_per_forward']:.3f}  "
            f"forwards {result['forwards']}")


def task_parser(task: str, doc: str, example_model: str, data_path: str, batch_size: int,
                test_set: tuple[int, int]) -> argparse.ArgumentParser:
    """The options every synthetic task's CLI shares (model, data, limit, batch size, dtype, device, threads, the
    output switches and ``--write-test-set``; ``test_set`` = the held-out split's (size, seed), for its help)."""
    ap = argparse.ArgumentParser(prog=f"python -m dkvcache.tasks.{task}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help=f"checkpoint directory (e.g. {example_model})")
    ap.add_argument("--data", default=data_path, help="held-out JSONL (default: the shipped one)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--plot", metavar="PNG", help="with --table: also plot accuracy vs tokens/s to this file")
    ap.add_argument("--show", type=int, default=0, help="print the first N predictions")
    ap.add_argument("--json", action="store_true", help="also print each result as one JSON line")
    ap.add_argument("--write-test-set", metavar="PATH", nargs="?", const=data_path,
                    help=f"regenerate the held-out JSONL ({test_set[0]} items, seed {test_set[1]}) and exit")
    return ap


def write_test_set_if_asked(args: argparse.Namespace, make_items: Callable[[], list], write: Callable) -> bool:
    """``--write-test-set``: write the held-out items and say so (True: the CLI is done)."""
    if not args.write_test_set:
        return False
    items = make_items()
    write(items, args.write_test_set)
    print(f"wrote {len(items)} held-out items to {args.write_test_set}")
    return True


def load_for_run(ap: argparse.ArgumentParser, args: argparse.Namespace, rest: Sequence[str]) -> tuple[Any, Any, dict]:
    """After a task CLI parsed ``task_parser``'s options: check them (before any compute), apply ``--threads`` and
    load the model. Returns (model, tokenizer, the ``key=value`` overrides)."""
    if not args.model:
        ap.error("--model is required")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of items, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    overrides = parse_overrides(rest)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    return model, tokenizer, overrides


def main(argv: Sequence[str] | None = None) -> int:
    ap = task_parser("arith", __doc__, "assets/tiny-dream", DATA_PATH, 64, (TEST_SIZE, TEST_SEED))
    ap.add_argument("--table", choices=arith_tables.TABLES,
                    help="run a named table of settings and print it as markdown (see dkvcache.tasks.arith_tables)")
    ap.add_argument("--signal", action="store_true", help="same as --table signal")
    args, rest = ap.parse_known_args(argv)
    if write_test_set_if_asked(args, make_test_items, write_jsonl):
        return 0
    model, tokenizer, overrides = load_for_run(ap, args, rest)
    family = model.diffusion_family
    rows = load_jsonl(args.data, args.limit)
    table = "signal" if args.signal else args.table
    settings = arith_tables.table_settings(table, family, GEN_LENGTH) if table else [("run", {})]
    pc_table = None
    if table:  # untimed warm-up on two items, so the first row's wall time (the speed-up reference) is not inflated
        evaluate(model, tokenizer, rows[:2], batch_size=2, **merge_kwargs(family, {**settings[0][1], **overrides}))
    results = []
    for name, setting in settings:
        kwargs = merge_kwargs(family, {**setting, **overrides})
        if kwargs.get("decoding") == "pc_sampler" and "pc_frequencies" not in kwargs:
            if pc_table is None:  # built once, from train-split text only
                pc_table = arith_tables.pc_table_from_train_split(tokenizer, model.config.vocab_size)
            kwargs["pc_frequencies"] = pc_table
        start = time.perf_counter()
        result = evaluate(model, tokenizer, rows, batch_size=args.batch_size, **kwargs)
        shown = {k: (v if isinstance(v, (str, int, float, bool, list, type(None))) else f"<{type(v).__name__}>")
                 for k, v in kwargs.items()}
        result["setting"], result["kwargs"] = name, shown
        result["eval_s"] = time.perf_counter() - start
        results.append(result)
        print(f"[{args.model}] {name}: {shown}")
        print("  " + _fmt(result), flush=True)
        for p in result["predictions"][: args.show]:
            print(f"  {'OK ' if p['correct'] else 'BAD'} {p['question']!r} -> {p['prediction']!r}")
        if args.json:
            print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))
    if table:
        print(f"\n{args.model}, table {table!r}, {len(rows)} held-out items, batch size {args.batch_size}:\n")
        print(arith_tables.markdown(results))
        if args.plot:
            arith_tables.plot(results, f"{os.path.basename(os.path.normpath(args.model))}: table {table!r}, "
                                       f"{len(rows)} held-out items", args.plot)
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
