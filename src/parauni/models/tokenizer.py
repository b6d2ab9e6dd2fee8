"""Small byte-level BPE tokenizers trained locally, in Hugging Face format.

Used where no pretrained tokenizer exists: the tiny test preset and the shapes world's VLM. The special tokens
of the InternVL3 / Qwen chat format are always added, so the same prompt templates work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
]

BASIC_CORPUS = [
    "Generate an image: a photo of a red circle and a blue square.",
    "Generate an image. Keep the image as it is. Describe the image.",
    "a cat sitting on a wooden table next to a green cup, three dogs left of a car above a tree",
    "the quick brown fox jumps over the lazy dog; orange yellow purple pink black white",
]


def train_bpe_tokenizer(
    corpus: Iterable[str], vocab_size: int = 512, special_tokens: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``; deterministic for a given corpus.

    Returns a ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as pad / eos token and the chat special
    tokens, which ``save_pretrained`` writes in the standard Hugging Face layout.
    """
    specials = list(dict.fromkeys(CHAT_SPECIAL_TOKENS + list(special_tokens or [])))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
