"""The built-in sources' generators: one seeded function per source, each returning one prompt/answer item.

People and towns of the dev/test splits never occur in the pool (``HELDOUT_NAMES``, ``HELDOUT_TOWNS``); a prompt's split is fixed by a hash of its text (:func:`prompt_bucket`). What the sources are and why: :mod:`idistill_core.data.builtin`.
"""


from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from idistill_core.data.formats import mc_prompt, squad_prompt

_NUM_BUCKETS = 20
_DEV_BUCKET, _TEST_BUCKET = 0, 1


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


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


def prompt_bucket(key: str) -> int:
    """Which of ``_NUM_BUCKETS`` an item's split key falls in: 0 is dev-only, 1 test-only, the rest pool."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % _NUM_BUCKETS
