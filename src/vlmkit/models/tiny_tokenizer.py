"""A small byte-level BPE tokenizer trained offline on a fixed corpus (for tiny test models)."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmkit.templates import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = """
a an the is are was were be there here this that what which who where when how why many much of in on at to
from with and or not no yes left right above below top bottom middle center next near far between inside
outside color colour shape object objects image picture photo scene describe describes concisely briefly
detail question answer assistant user system human gpt red green blue yellow purple orange black white gray
grey brown pink circle square triangle star diamond rectangle hexagon cross small large big medium tiny one
two three four five six seven eight nine ten zero count number box boxes where give bounding coordinates
region located location position it its they them their you your i me my we our please thank thanks hello
hi can could would should will do does did have has had make made see look show shows shown tell say said
capital city country france paris water sky sun moon cat dog car tree house person people man woman boy
girl child children book table chair food apple banana day night good bad new old first last other some all
any each every only also very more most less least than then so but if because about into over under after
before while during up down out off again once
"""


def _corpus() -> list[str]:
    words = _WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [w.capitalize() + "." for w in words]
    lines += [f"{i} {i * 7 % 1000} ({i},{i + 3}),({i * 2},{i + 9})" for i in range(0, 1000, 7)]
    lines += ["<ref>the red circle</ref><box>(120,340),(560,780)</box>", "What is in the image?\n"]
    return lines * 3


@functools.lru_cache(maxsize=1)
def _trained_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """A deterministic ChatML tokenizer (~`vocab_size` tokens) that encodes any text (byte fallback)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
