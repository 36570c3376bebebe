"""The chain task: state tracking, a yardstick whose answer is a chain of dependent steps, so caches and parallel
decoding show their cost.

Task: five fixed shuffles of the digits 0-4 (``SHUFFLES[m]``, like five cups; drawn once from a fixed seed,
learned in training; together they generate all 120 permutations of five) are the moves; the prompt gives a
start digit and ``MOVES`` move digits, and the answer writes the start, then for every move the move digit and
the state after it (``state = SHUFFLES[move][state]``), then the end in GSM8K style::

    question: "Start at 3 and make the moves 1 4 0 2 3 1 1 4. Where do you end?"
    answer:   "31441022334111044\n#### 4"      (3, then move 1 → 4, move 4 → 1, move 0 → 2, ...)

Every state is a permutation of the state before it: it cannot be read off the prompt without the previous one,
and composing several moves in one forward means composing permutations of five elements (the word problem of
S5, the textbook example of a computation with no known shortcut for a shallow parallel model). A model that decodes
several states in one step must do that composition; a wrong state is never repaired by later moves (each move
is a bijection), so the final answer is right only if every step is. Answers are 21 tokens (17 digits, newline,
``####``, space, digit); 32-token generation window. Writing each move next to its state splits a step into two
skills a tiny model learns quickly -- copy the move from the prompt (a fixed distance away: the prompt's moves
are spaced, the answer's are every other digit) and apply the move to the state two digits back -- while the
states still form the chain; the move digits can be copied in parallel, the states cannot.

Split: by content. An item belongs to the test split iff the SHA-256 of ``"start|moves"`` modulo 10 is 0, so no
held-out (start, moves) pair is ever seen in training, whatever the seed. ``dkvcache/tasks/data/chain_test.jsonl``
(schema ``{"id", "question", "answer"}``, ``answer`` ending ``#### d``) holds 300 held-out items.

Scoring: exact match of the written chain -- the first number of the completion must equal the gold path
(start, then every move and state). The ``#### d`` summary line is not scored: under confidence (and entropy)
ordering the first (from-scratch) tiny Dream committed that digit before it had written the path (from a
shortcut it learned in training), which scored its vanilla decoding at ~21 % although its path was right on
every item; the chain is what every strategy must get right, and a wrong state makes the path wrong.

CLI (the same as the arith task's)::

    python -m dkvcache.tasks.chain --model assets/tiny-dream-chain [--limit N] [--table yardstick] [key=value ...]
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dkvcache.tasks import arith, arith_tables, chain_tables

DIGITS = 5  # states and move kinds are both the digits 0-4
MOVES = 8
SHUFFLE_SEED = 20261201
GEN_LENGTH = 32  # the generation window of every default setting (answers are 21 tokens + end of turn)
BLOCK_LENGTH = 32
TEST_FRACTION_MOD = 10
DATA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "chain_test.jsonl")
TEST_SEED = 20261201
TEST_SIZE = 300

# Words the tiny tokenizers keep whole (with or without a leading space); every other character, every digit
# included, is one token.
WORDS = ("Start", "at", "and", "make", "the", "moves", "Where", "do", "you", "end", "You", "are", "a", "helpful",
         "assistant", "system", "user", "####")



def _shuffles(seed: int = SHUFFLE_SEED) -> tuple[tuple[int, ...], ...]:
    """``DIGITS`` distinct permutations of 0..DIGITS-1, none with a fixed point (every move changes the state),
    that together generate every permutation (so no composition of moves has a shortcut)."""
    rng, out = random.Random(seed), []
    while len(out) < DIGITS:
        perm = list(range(DIGITS))
        rng.shuffle(perm)
        if all(perm[i] != i for i in range(DIGITS)) and tuple(perm) not in out:
            out.append(tuple(perm))
        if len(out) == DIGITS and len(generated_group(out)) < math.factorial(DIGITS):
            out.pop(0)
    return tuple(out)


def generated_group(perms: Sequence[Sequence[int]]) -> set[tuple[int, ...]]:
    """Every permutation that compositions of ``perms`` reach (closure from the identity)."""
    seen = {tuple(range(len(perms[0])))}
    frontier = list(seen)
    while frontier:
        current = frontier.pop()
        for p in perms:
            nxt = tuple(p[current[i]] for i in range(len(current)))
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return seen


SHUFFLES = _shuffles()


@dataclass(frozen=True)
class Item:
    """One problem: the start digit, the move digits, the question text and the gold answer text."""

    start: int
    moves: tuple[int, ...]
    question: str
    answer: str

    @property
    def path(self) -> list[int]:
        return walk(self.start, self.moves)


def walk(start: int, moves: Sequence[int], shuffles: Sequence[Sequence[int]] = SHUFFLES) -> list[int]:
    """The start and the state after each move."""
    path = [start]
    for m in moves:
        path.append(shuffles[m][path[-1]])
    return path


def content_key(start: int, moves: Sequence[int]) -> str:
    return f"{start}|" + "".join(str(m) for m in moves)


def is_test(start: int, moves: Sequence[int]) -> bool:
    """The content split: True for the held-out (start, moves) pairs (about one in ten)."""
    digest = hashlib.sha256(content_key(start, moves).encode()).digest()
    return int.from_bytes(digest[:8], "big") % TEST_FRACTION_MOD == 0


def question_text(start: int, moves: Sequence[int]) -> str:
    return f"Start at {start} and make the moves {' '.join(str(m) for m in moves)}. Where do you end?"


def answer_text(start: int, moves: Sequence[int]) -> str:
    path = walk(start, moves)
    return str(start) + "".join(f"{m}{s}" for m, s in zip(moves, path[1:])) + f"\n#### {path[-1]}"


def make_item(start: int, moves: Sequence[int]) -> Item:
    moves = tuple(int(m) for m in moves)
    if not 0 <= int(start) < DIGITS or len(moves) != MOVES or not all(0 <= m < DIGITS for m in moves):
        raise ValueError(f"need a start digit and {MOVES} move digits, got start={start!r} moves={moves!r}")
    return Item(int(start), moves, question_text(start, moves), answer_text(start, moves))


def sample_item(rng: random.Random, split: str = "train") -> Item:
    """Draw one item of ``split`` ("train" or "test") by rejection on the content hash."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    want_test = split == "test"
    while True:
        start, moves = rng.randrange(DIGITS), [rng.randrange(DIGITS) for _ in range(MOVES)]
        if is_test(start, moves) == want_test:
            return make_item(start, moves)


def make_test_items(n: int = TEST_SIZE, seed: int = TEST_SEED) -> list[Item]:
    """``n`` held-out items with distinct (start, moves) pairs, deterministic in ``seed``."""
    rng, seen, items = random.Random(seed), set(), []
    while len(items) < n:
        item = sample_item(rng, "test")
        if (item.start, item.moves) not in seen:
            seen.add((item.start, item.moves))
            items.append(item)
    return items


# -- scoring ---------------------------------------------------------------------------------------------------
_PATH = re.compile(r"\s*(\d+)")


def extract_answer(text: str) -> str | None:
    """The written path: the digits the completion starts with (leading white space skipped), else None."""
    found = _PATH.match(text)
    return found.group(1) if found else None


def is_correct(prediction: str, answer: str) -> bool:
    """True iff the completion's path equals the gold path (every move and state; the ``####`` line unscored)."""
    gold = extract_answer(answer)
    if gold is None:
        raise ValueError(f"gold answer without a path: {answer!r}")
    return extract_answer(prediction) == gold


def write_jsonl(items: Iterable[Item], path: str = DATA_PATH) -> None:
    """The held-out items in the arith schema, ids ``chain-NNNN``."""
    arith.write_jsonl(items, path, id_prefix="chain")


def load_jsonl(path: str = DATA_PATH, limit: int | None = None) -> list[dict]:
    """The held-out items as dicts with ``question`` and ``answer`` (gsm8k schema)."""
    return arith.load_jsonl(path, limit)


# -- evaluation ------------------------------------------------------------------------------------------------
def default_generation_kwargs(family: str) -> dict:
    """Vanilla decoding: one token per step over the 32-token window, greedy (LLaDA: one block)."""
    return arith.default_generation_kwargs(family, GEN_LENGTH, BLOCK_LENGTH)


def merge_kwargs(family: str, overrides: dict) -> dict:
    """Family defaults updated by ``overrides`` (twin names replace each other, as in arith)."""
    return arith.merge_kwargs(family, overrides, gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH)


def evaluate(model: Any, tokenizer: Any, rows: Sequence[dict], batch_size: int = 100, **gen_kwargs: Any) -> dict:
    """Accuracy and speed on ``rows``: the arith evaluator (same statistics) with this task's scorer."""
    return arith.evaluate(model, tokenizer, rows, batch_size=batch_size, scorer=is_correct, **gen_kwargs)


# -- CLI -------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = arith.task_parser("chain", __doc__, "assets/tiny-dream-chain", DATA_PATH, 100, (TEST_SIZE, TEST_SEED))
    ap.add_argument("--table", choices=chain_tables.TABLES + arith_tables.TABLES,
                    help="run a named table of settings and print it as markdown (see dkvcache.tasks.chain_tables)")
    ap.add_argument("--save", metavar="JSON", help="with --table: write the rows (no predictions) to this file, "
                                                   "for python -m dkvcache.tasks.chain_tables A.json B.json")
    args, rest = ap.parse_known_args(argv)
    if arith.write_test_set_if_asked(args, make_test_items, write_jsonl):
        return 0
    model, tokenizer, overrides = arith.load_for_run(ap, args, rest)
    family = model.diffusion_family
    rows = load_jsonl(args.data, args.limit)
    results = chain_tables.run(model, tokenizer, rows, args.table, family, overrides, batch_size=args.batch_size,
                               show=args.show, as_json=args.json, label=args.model)
    if args.table:
        print(f"\n{args.model}, table {args.table!r}, {len(rows)} held-out items, batch size {args.batch_size}:\n")
        print(chain_tables.markdown(results))
        if args.save:
            chain_tables.save(results, args.save)
            print(f"wrote {args.save}")
        if args.plot:
            name = os.path.basename(os.path.normpath(args.model))
            arith_tables.plot(results, f"{name}: chain task, table {args.table!r}, {len(rows)} held-out items",
                              args.plot)
            print(f"wrote {args.plot}")
    return 0




if __name__ == "__main__":
    sys.exit(main())
