"""A tiny byte-level BPE tokenizer with a ChatML chat template, built in code (no hub, no files).

Used by the ``tiny-llama`` / ``tiny-qwen2`` test models in :mod:`idistill_core.models.loading`. Every byte is a token,
so any text round-trips; a few hundred merges learned from a fixed built-in English text keep sequences from
being one token per character. The merges are learned by a small pure-Python loop (not ``tokenizers``'
trainer) so the vocabulary is identical on every machine and library version.
"""

from __future__ import annotations

import collections
import functools
import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, PAD)

# ChatML, as SmolLM2/Qwen2 use it. `{% generation %}` marks the supervised span (assistant content plus its
# closing <|im_end|>, so a fine-tuned model learns to stop) for `return_assistant_tokens_mask=True`; it renders
# to nothing otherwise.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Fixed training text for the merges: plain instruction-style English with numbers, the kind of text the
# built-in pools contain. Changing it changes every tiny model's vocabulary (and fingerprint).
_MERGE_TEXT = """
You are a helpful assistant. Answer the question in one sentence, and show your work when you compute.
The user asks a question and the assistant gives an answer. What is the capital of France? The capital of
France is Paris. What is the largest planet in the solar system? The largest planet is Jupiter.
Tom has 3 apples and buys 5 more. How many apples does he have now? He has 3 + 5 = 8 apples.
A train travels 120 miles in 2 hours. What is its average speed? Its speed is 120 / 2 = 60 miles per hour.
Sara had 24 cookies and gave 9 of them to her friends. How many cookies does she have left? 24 - 9 = 15.
Read the passage and answer the question that follows. The passage says that the river flows to the sea,
and that the town was built on the river bank in the year 1850. When was the town built? It was built in 1850.
Which of the following is a mammal? A. shark B. dolphin C. trout D. octopus. The answer is B.
Write a short story about a cat who finds a new home. The little cat walked through the rain until she
found a warm house with an open door, and the family who lived there gave her milk and a soft bed.
Explain why the sky is blue. Sunlight is scattered by the air, and blue light is scattered more than red
light because it has a shorter wavelength, so the sky looks blue during the day.
Translate the following sentence into French. The weather is nice today. Il fait beau aujourd'hui.
Summarize the text in two sentences. The report describes the results of the study and the methods that
were used. It finds that the new method is faster and more accurate than the old one.
Please list three fruits that are red. Apples, strawberries and cherries are red fruits.
def add(a, b): return a + b. This function returns the sum of the two numbers that are given to it.
If a shirt costs 15 dollars and is on sale for 20 percent off, the sale price is 15 * 0.8 = 12 dollars.
The answer is 42. The final answer is 7. Let us think step by step about the problem before answering.
Thank you for your question. I am happy to help you with this and with any other questions you have.
"""

NUM_MERGES = 300


@functools.lru_cache(maxsize=4)
def _learn_merges(text: str, num_merges: int) -> tuple[tuple[str, str], ...]:
    """Greedy BPE over the byte-level pre-tokenised words of ``text``; ties go to the smallest pair."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    word_counts = collections.Counter(piece for piece, _ in pre.pre_tokenize_str(text))
    words = {word: list(word) for word in word_counts}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pair_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, symbols in words.items():
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break
        best_count = max(pair_counts.values())
        if best_count < 2:
            break
        best = min(pair for pair, count in pair_counts.items() if count == best_count)
        merges.append(best)
        merged = best[0] + best[1]
        for word, symbols in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[word] = out
    return tuple(merges)


def build_tiny_tokenizer(num_merges: int = NUM_MERGES) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with ChatML special tokens and chat template.

    Ids: 0..255 are the 256 byte tokens (in ``ByteLevel.alphabet()`` order, sorted), then one id per merge,
    then ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|pad|>``. ``eos`` is ``<|im_end|>`` (the end
    of an assistant turn, where generation should stop); ``pad`` is ``<|pad|>``; there is no BOS.

    Args:
        num_merges: upper bound on learned merges (fewer if the built-in text runs out of repeated pairs).

    Returns:
        A ``PreTrainedTokenizerFast`` whose ``len()`` is the model vocabulary size.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges = _learn_merges(_MERGE_TEXT, num_merges)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))

    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[END_OF_TEXT, IM_START],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
