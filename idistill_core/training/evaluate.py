"""Target metrics for a (fine-tuned) causal LM on raw target rows (``research/paper.md`` §7).

Every row is ``{sample_id, messages, ...}`` whose final message is the assistant reference. The prompt is
the messages before it, rendered as training renders them (``data.render_chat``) plus the generation prompt.

Metrics (scores are fractions in [0, 1], except ``nll`` in nats per token):

* ``em-number`` – greedy generation; the final number (``extract_number``) must equal ``answer``.
* ``squad`` – greedy generation; first non-empty line vs ``answers`` with the SQuAD normalisation; the
  score is F1, ``details`` holds EM and F1 (max over the gold answers, as in the official script).
* ``mc`` – no generation: the log-likelihood (sum over its tokens) of the continuation
  ``EvalConfig.mc_template`` (default ``"The answer is {letter}."``) for every choice; the argmax letter
  must equal ``answer``. The prompt is expected to list the choices itself. A fixed template keeps the
  continuations the same length, so summed log-probs are comparable without length normalisation.
* ``nll`` – teacher-forced mean NLL of the reference answer tokens (pooled over all tokens).

Every metric also reports ``details["answer_nll"]`` (the ``nll`` score) unless ``EvalConfig.answer_nll``
is off.

Why one module of ~600 lines: the four metrics share the prompt rendering, the greedy decoder and the
stop tokens, and the lm-evaluation-harness bridge must render prompts exactly as they do (same functions), so
splitting would scatter one contract over files.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from idistill_core.data.batch import pad_id
from idistill_core.data.chat import render_chat
from idistill_core.data.formats import normalize_number
from idistill_core.errors import ConfigError, DataError
from idistill_core.project.targets import LM_EVAL_TASKS
from idistill_core.store.hashing import config_fingerprint

logger = logging.getLogger("idistill")

METRICS = ("em-number", "squad", "mc", "nll")
# End-of-turn markers of common chat templates; generation stops at any of them that the vocab has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate."""

    max_new_tokens: int = 64
    """Greedy generation budget per prompt (``em-number``, ``squad``); >= 1."""
    batch_size: int = 16
    """Prompts (or prompt+continuation pairs) per forward/generate call; >= 1."""
    max_length: int = 512
    """Longest prompt (+ continuation) in tokens; longer prompts keep their LAST tokens. >= 2."""
    mc_template: str = "The answer is {letter}."
    """Continuation scored per choice for ``mc``; may use ``{letter}`` and ``{choice}`` (the choice text)."""
    answer_nll: bool = True
    """Also compute the reference-answer NLL for the generation/``mc`` metrics (one extra forward per row)."""
    precision: str = "auto"
    """``auto`` (bfloat16 autocast where the device runs it natively and faster), ``float32`` or ``bfloat16``
    (autocast: weights stay as loaded, matmuls in bf16)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"EvalConfig.max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"EvalConfig.batch_size must be >= 1; got {self.batch_size}")
        if self.max_length < 2:
            raise ConfigError(f"EvalConfig.max_length must be >= 2; got {self.max_length}")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"EvalConfig.precision must be auto, float32 or bfloat16; got {self.precision!r}")
        if "{letter}" not in self.mc_template and "{choice}" not in self.mc_template:
            raise ConfigError(
                f"EvalConfig.mc_template must contain {{letter}} or {{choice}}; got {self.mc_template!r}"
            )

    def fingerprint(self) -> str:
        return config_fingerprint(self)


@dataclass
class EvalResult:
    """``score`` is the metric's headline number; ``predictions`` has one dict per row, in row order."""

    metric: str
    score: float
    n: int
    details: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Iterable[Mapping],
    metric: str,
    config: EvalConfig = EvalConfig(),
    progress: bool = False,
) -> EvalResult:
    """Score ``model`` on target ``rows`` with ``metric``.

    Args:
        model: a ``transformers`` causal LM.
        tokenizer: its tokenizer; prompts are rendered exactly as training renders them
            (``data.render_chat``: the chat template, or data.py's plain template when there is none).
        rows: target rows (list or ``datasets.Dataset``); see the module docstring for the fields per metric.
        metric: one of ``"em-number"``, ``"squad"``, ``"mc"``, ``"nll"``.
        config: generation/batching settings.
        progress: show tqdm bars.

    Returns:
        EvalResult; ``predictions[i]`` has ``sample_id``, ``prediction``, ``reference`` and ``correct``
        (``em-number``, ``mc``) or ``score`` (``squad`` F1, ``nll``), plus metric-specific extras.

    Raises:
        ConfigError: unknown metric.
        DataError: no rows, or a row without the fields its metric needs (names the sample id).
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {METRICS}")
    rows = [dict(r) for r in rows]
    if not rows:
        raise DataError(f"evaluate(metric={metric!r}) got no rows")
    prompts, references = zip(*(_split_reference(r) for r in rows))
    full_prompt_ids = [_render(tokenizer, p) for p in prompts]
    # Keep the end of an over-long prompt: the question and the generation prompt sit there.
    prompt_ids = [ids[-config.max_length :] for ids in full_prompt_ids]

    from idistill_core.models.precision import PrecisionResolver

    decision = PrecisionResolver().resolve_for_model(config.precision, model)
    device_type = next(model.parameters()).device.type
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=decision.autocast):
            if metric == "em-number":
                result = _eval_em_number(model, tokenizer, rows, prompt_ids, references, config, progress)
            elif metric == "squad":
                result = _eval_squad(model, tokenizer, rows, prompt_ids, references, config, progress)
            elif metric == "mc":
                result = _eval_mc(model, tokenizer, rows, prompt_ids, references, config, progress)
            else:
                result = _eval_nll(model, tokenizer, rows, prompt_ids, references, config, progress)
            if metric != "nll" and config.answer_nll:
                nll = _eval_nll(model, tokenizer, rows, prompt_ids, references, config, progress)
                result.details["answer_nll"] = nll.score
                for pred, nll_pred in zip(result.predictions, nll.predictions):
                    pred["answer_nll"] = nll_pred["score"]
    finally:
        model.train(was_training)
    result.details["num_truncated_prompts"] = sum(len(ids) > config.max_length for ids in full_prompt_ids)
    result.details["precision"] = decision.summary()
    return result


def item_scores(result: EvalResult) -> np.ndarray:
    """One number per test row, in row order: 1/0 correctness (``mc``, ``em-number``), else the row's score
    (``squad`` F1, ``nll``)."""
    return np.array([float(p["correct"]) if "correct" in p else float(p["score"]) for p in result.predictions])


def paired_interval(diff: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``diff.mean()``, resampling rows: for two models scored on the same
    rows, ``diff`` is their per-row difference, and an interval that holds 0 says the gap is within the noise
    of that many rows."""
    diff = np.asarray(diff, dtype=np.float64).reshape(-1)
    if diff.size == 0:
        raise DataError("paired_interval() got no rows")
    means = diff[np.random.default_rng(seed).integers(0, diff.size, size=(draws, diff.size))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def paired_gap(a: EvalResult, b: EvalResult) -> dict[str, float | bool]:
    """``a``'s score minus ``b``'s, row by row on the same test rows, with its 95% bootstrap interval and whether
    that interval holds 0 (the gap is then within the noise of this many rows).

    Raises:
        DataError: the two results were not scored on the same rows in the same order.
    """
    if [p["sample_id"] for p in a.predictions] != [p["sample_id"] for p in b.predictions]:
        raise DataError("paired_gap() needs two results on the same test rows in the same order")
    diff = item_scores(a) - item_scores(b)
    low, high = paired_interval(diff)
    return {"mean": float(diff.mean()), "ci95_low": low, "ci95_high": high, "within_noise": bool(low <= 0.0 <= high)}


# --- number and SQuAD normalisation ------------------------------------------------------------------

_NUMBER = r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_MARKED_RE = re.compile(r"(?:####|answer\s+is)\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE)


def extract_number(text: str, fallback: bool = True) -> str | None:
    """The answer number in a model output, normalised with ``normalize_number``.

    Looks for the last ``#### N`` / ``answer is N`` marker first (GSM8K and the built-in templates), and
    otherwise, when ``fallback``, takes the last number in the text. Returns None when there is none.
    """
    marked = _MARKED_RE.findall(text)
    if marked:
        return normalize_number(marked[-1])
    if not fallback:
        return None
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def normalize_squad(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lowercase, drop punctuation and a/an/the, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 after ``normalize_squad`` (official definition; two empty strings give 1.0)."""
    pred_tokens = normalize_squad(prediction).split()
    gold_tokens = normalize_squad(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, gold: str) -> float:
    return float(normalize_squad(prediction) == normalize_squad(gold))


# --- prompts and stop tokens -------------------------------------------------------------------------


def _split_reference(row: Mapping) -> tuple[list[dict], str]:
    sid = row.get("sample_id", "?")
    messages = row.get("messages")
    if not messages:
        raise DataError(f"target row '{sid}' has no messages")
    if messages[-1].get("role") != "assistant":
        raise DataError(
            f"target row '{sid}': the last message must be the assistant reference; got role "
            f"{messages[-1].get('role')!r}"
        )
    if len(messages) < 2:
        raise DataError(f"target row '{sid}' has no prompt before the assistant reference")
    return [dict(m) for m in messages[:-1]], str(messages[-1]["content"])


def _render(tokenizer: Any, messages: list[dict]) -> list[int]:
    text = render_chat(messages, tokenizer, add_generation_prompt=True)
    # The template already contains any BOS it wants; adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any, model: torch.nn.Module | None = None) -> list[int]:
    """Ids that end an assistant turn: eos, the template's end-of-turn token(s), the model's eos."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(int(vocab[token]))
    gen_config = getattr(model, "generation_config", None)
    eos = getattr(gen_config, "eos_token_id", None)
    if eos is not None:
        ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(ids)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- generation --------------------------------------------------------------------------------------


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    config: EvalConfig,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of ``prompt_ids`` (in input order), decoded up to the first stop token.

    Prompts are batched by length and LEFT-padded, so every row's next token sits in the last column.
    """
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer, model)
    pad = pad_id(tokenizer)
    # An explicit config, so sampling settings shipped with the model (temperature, top_p) never apply.
    gen_config = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    outputs: list[str] = [""] * len(prompt_ids)
    device = _device(model)
    for start in tqdm(range(0, len(order), config.batch_size), desc="generate", disable=not progress):
        chunk = order[start : start + config.batch_size]
        width = max(len(prompt_ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = prompt_ids[i]
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=gen_config,
        )
        for row, i in enumerate(chunk):
            new = generated[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            outputs[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    return outputs


# --- teacher-forced log-likelihoods -----------------------------------------------------------------


def continuation_logprobs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    pad_token: int,
    max_length: int,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Per-token log p(continuation | prompt) for each ``(prompt_ids, continuation_ids)`` pair.

    Pairs longer than ``max_length`` lose prompt tokens from the left. Batches are right-padded, so no
    position ids are needed.

    Returns:
        one float32 (len(continuation),) tensor per pair, in input order.
    """
    seqs = []
    for prompt, cont in pairs:
        if not cont:
            raise DataError("continuation_logprobs() got an empty continuation")
        keep = max(1, max_length - len(cont))
        seqs.append((prompt[-keep:], cont))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    device = _device(model)
    for start in tqdm(range(0, len(order), batch_size), desc="score", disable=not progress):
        chunk = order[start : start + batch_size]
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_token, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = seqs[i][0] + seqs[i][1]
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, i in enumerate(chunk):
            prompt, cont = seqs[i]
            # Token t is predicted by the logits at t - 1; only those rows get a log_softmax (V is large).
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(cont) - 1, device=logits.device)
            logp = torch.log_softmax(logits[row, positions].float(), dim=-1)
            target = torch.as_tensor(cont, device=logits.device)
            out[i] = logp.gather(1, target[:, None]).squeeze(1).cpu()
    return out


def _answer_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- metrics -----------------------------------------------------------------------------------------


def _require(row: Mapping, key: str, metric: str) -> Any:
    value = row.get(key)
    if value is None or (isinstance(value, (list, str)) and len(value) == 0):
        raise DataError(
            f"target row '{row.get('sample_id', '?')}' has no '{key}' (needed by metric {metric!r})"
        )
    return value


def _eval_em_number(model, tokenizer, rows, prompt_ids, references, config, progress) -> EvalResult:
    answers = [str(_require(r, "answer", "em-number")) for r in rows]
    texts = generate_greedy(model, tokenizer, prompt_ids, config, progress)
    predictions = []
    correct = strict = 0
    for row, text, answer, reference in zip(rows, texts, answers, references):
        gold = normalize_number(answer) or answer.strip()
        extracted = extract_number(text)
        ok = extracted is not None and extracted == gold
        marked = extract_number(text, fallback=False)
        correct += ok
        strict += marked is not None and marked == gold
        predictions.append(
            {
                "sample_id": str(row["sample_id"]),
                "prediction": text,
                "extracted": extracted,
                "reference": reference,
                "answer": gold,
                "correct": ok,
            }
        )
    n = len(rows)
    return EvalResult("em-number", correct / n, n, {"em": correct / n, "em_marked": strict / n}, predictions)


def _eval_squad(model, tokenizer, rows, prompt_ids, references, config, progress) -> EvalResult:
    golds = [[str(a) for a in _require(r, "answers", "squad")] for r in rows]
    texts = generate_greedy(model, tokenizer, prompt_ids, config, progress)
    predictions = []
    em_total = f1_total = 0.0
    for row, text, gold, reference in zip(rows, texts, golds, references):
        # Chat models often add an explanation after the span; the answer is the first line.
        answer = next((line.strip() for line in text.splitlines() if line.strip()), "")
        em = max(squad_em(answer, g) for g in gold)
        f1 = max(squad_f1(answer, g) for g in gold)
        em_total += em
        f1_total += f1
        predictions.append(
            {
                "sample_id": str(row["sample_id"]),
                "prediction": answer,
                "generation": text,
                "reference": reference,
                "answers": gold,
                "em": em,
                "score": f1,
                "correct": bool(em),
            }
        )
    n = len(rows)
    return EvalResult("squad", f1_total / n, n, {"em": em_total / n, "f1": f1_total / n}, predictions)


def _eval_mc(model, tokenizer, rows, prompt_ids, references, config, progress) -> EvalResult:
    pairs, owners = [], []
    letters_per_row = []
    for r, (row, prompt) in enumerate(zip(rows, prompt_ids)):
        choices = [str(c) for c in _require(row, "choices", "mc")]
        answer = str(_require(row, "answer", "mc")).strip().upper()
        letters = LETTERS[: len(choices)]
        if answer not in letters:
            raise DataError(
                f"target row '{row['sample_id']}' has answer {answer!r}; expected one of {list(letters)}"
            )
        letters_per_row.append(letters)
        for letter, choice in zip(letters, choices):
            pairs.append(
                (prompt, _answer_ids(tokenizer, config.mc_template.format(letter=letter, choice=choice)))
            )
            owners.append(r)
    scores = continuation_logprobs(
        model, pairs, config.batch_size, pad_id(tokenizer), config.max_length, progress
    )
    per_row: list[list[float]] = [[] for _ in rows]
    for r, logp in zip(owners, scores):
        per_row[r].append(float(logp.sum()))
    predictions = []
    correct = 0
    for row, letters, logps, reference in zip(rows, letters_per_row, per_row, references):
        pick = letters[max(range(len(logps)), key=logps.__getitem__)]
        answer = str(row["answer"]).strip().upper()
        correct += pick == answer
        predictions.append(
            {
                "sample_id": str(row["sample_id"]),
                "prediction": pick,
                "reference": reference,
                "answer": answer,
                "correct": pick == answer,
                "choice_logprobs": dict(zip(letters, logps)),
            }
        )
    n = len(rows)
    # A model that cannot do the task answers by a letter prior: its accuracy is then the test's share of that
    # letter, so these two numbers say whether an accuracy (or a gap between two models) is more than that.
    top_pick = max(Counter(p["prediction"] for p in predictions).values()) / n
    majority = max(Counter(p["answer"] for p in predictions).values()) / n
    details = {"accuracy": correct / n, "continuation": config.mc_template, "top_pick_share": top_pick,
               "majority_letter_accuracy": majority,
               "letter_calibrated_accuracy": _letter_calibrated_accuracy(predictions)}
    return EvalResult("mc", correct / n, n, details, predictions)


def _letter_calibrated_accuracy(predictions: list[dict]) -> float:
    """Accuracy of the argmax of each choice's log-likelihood minus that letter's mean over the scored rows: what
    is left once the model's preference for a letter is removed (contextual calibration, Zhao et al. 2021, with
    the rows themselves as the content-free estimate). Needs many rows per letter to mean anything. Each
    prediction gets its ``calibrated_prediction``."""
    by_letter: dict[str, list[float]] = {}
    for pred in predictions:
        for letter, logp in pred["choice_logprobs"].items():
            by_letter.setdefault(letter, []).append(logp)
    prior = {letter: sum(v) / len(v) for letter, v in by_letter.items()}
    hits = 0
    for pred in predictions:
        shifted = {letter: logp - prior[letter] for letter, logp in pred["choice_logprobs"].items()}
        pred["calibrated_prediction"] = max(shifted, key=shifted.__getitem__)
        hits += pred["calibrated_prediction"] == pred["answer"]
    return hits / len(predictions)


def _eval_nll(model, tokenizer, rows, prompt_ids, references, config, progress) -> EvalResult:
    pairs = []
    for row, prompt, reference in zip(rows, prompt_ids, references):
        ids = _answer_ids(tokenizer, reference)
        if not ids:
            raise DataError(f"target row '{row['sample_id']}' has an empty assistant reference")
        pairs.append((prompt, ids))
    logps = continuation_logprobs(
        model, pairs, config.batch_size, pad_id(tokenizer), config.max_length, progress
    )
    predictions = []
    total = 0.0
    count = 0
    for row, reference, logp in zip(rows, references, logps):
        total += -float(logp.sum())
        count += len(logp)
        predictions.append(
            {
                "sample_id": str(row["sample_id"]),
                "prediction": None,
                "reference": reference,
                "score": -float(logp.mean()),
                "tokens": len(logp),
            }
        )
    # Pooled over tokens (nats per reference token), as in research/feasibility.md §5.2.
    score = total / count
    return EvalResult("nll", score, len(rows), {"answer_nll": score, "tokens": count}, predictions)


# --- lm-evaluation-harness (optional, beside the built-in metrics) -----------------------------------



def lm_eval_task_config(name: str, data_file: str | Path, max_new_tokens: int, stops: Sequence[str]) -> dict:
    """The harness task config (what its YAML holds) of template ``name`` over a local JSON-lines file.

    ``gsm8k-local`` is the harness's own ``gsm8k`` task (its ``flexible-extract`` filter and ``exact_match``
    settings) pointed at ``data_file`` (fields ``prompt``, ``answer``), zero-shot, with our rendered prompt.
    """
    if name not in LM_EVAL_TASKS:
        raise ConfigError(f"unknown lm_eval task {name!r}; expected one of {LM_EVAL_TASKS}")
    return {
        "task": f"idistill-{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "num_fewshot": 0,
        "generation_kwargs": {"until": list(stops), "do_sample": False, "max_gen_toks": max_new_tokens},
        "filter_list": [
            {
                "name": "flexible-extract",
                "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
            }
        ],
        "metadata": {"version": 1.0},
    }


def evaluate_lm_eval(
    model: torch.nn.Module, tokenizer: Any, rows: Iterable[Mapping], task: str, config: EvalConfig = EvalConfig()
) -> dict[str, Any]:
    """Score ``model`` with lm-evaluation-harness on target ``rows`` (no hub: a task YAML over a local file).

    The prompts are rendered as ``evaluate`` renders them (chat template + generation prompt), written with
    their ``answer`` to a JSON-lines file, and a generated custom task YAML points the harness at it.

    Returns:
        ``{"lm_eval_version", "task", "task_config", "results"}`` with the harness's own metric numbers.
    """
    import tempfile
    from importlib.metadata import version

    import lm_eval
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = [dict(r) for r in rows]
    if not rows:
        raise DataError(f"evaluate_lm_eval(task={task!r}) got no rows")
    vocab = tokenizer.get_vocab()
    stops = [t for t in END_OF_TURN_TOKENS if t in vocab]
    with tempfile.TemporaryDirectory(prefix="idistill-lmeval-") as folder:
        data = Path(folder) / "test.jsonl"
        with data.open("w") as f:
            for row in rows:
                prompt, _ = _split_reference(row)
                answer = str(_require(row, "answer", f"lm_eval:{task}"))
                text = render_chat(prompt, tokenizer, add_generation_prompt=True)
                f.write(json.dumps({"prompt": text, "answer": normalize_number(answer) or answer.strip()}) + "\n")
        task_config = lm_eval_task_config(task, data, config.max_new_tokens, stops)
        (Path(folder) / f"{task_config['task']}.yaml").write_text(yaml.safe_dump(task_config))
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=config.batch_size,
            device=str(_device(model)),
            max_length=config.max_length + config.max_new_tokens,
            add_bos_token=False,  # the rendered template already holds any BOS it wants
        )
        was_training = model.training
        model.eval()
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task_config["task"]],
                task_manager=TaskManager(include_path=folder, include_defaults=False),
                num_fewshot=0,
                log_samples=False,
            )
        finally:
            model.train(was_training)
    task_config["dataset_kwargs"] = {"data_files": {"test": "<rendered target test rows>"}}
    results = {k: v for k, v in out["results"][task_config["task"]].items() if isinstance(v, (int, float))}
    return {"lm_eval_version": version("lm_eval"), "task": task, "task_config": task_config, "results": results}
