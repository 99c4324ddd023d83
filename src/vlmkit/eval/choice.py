"""Multiple choice scored by the model itself: decoding constrained by an option trie; option likelihoods."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vlmkit.models.vlm import VisionLanguageModel


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    options: list[int] = field(default_factory=list)  # indices of the options whose tokens pass through here


class OptionTrie:
    """A prefix trie over tokenized options: which tokens may follow a prefix, which options remain."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.root = _Node()
        for index, seq in enumerate(sequences):
            node = self.root
            node.options.append(index)
            for token in seq:
                node = node.children.setdefault(int(token), _Node())
                node.options.append(index)

    def node(self, prefix: Sequence[int]) -> _Node | None:
        node: _Node | None = self.root
        for token in prefix:
            node = node.children.get(int(token)) if node is not None else None
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that continue `prefix` towards some option ([] at an option's end or off the trie)."""
        node = self.node(prefix)
        return sorted(node.children) if node is not None else []

    def options(self, prefix: Sequence[int]) -> list[int]:
        """Indices of the options that start with `prefix`."""
        node = self.node(prefix)
        return list(node.options) if node is not None else []


def _forward_logits(
    model: VisionLanguageModel,
    rows: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None,
    images_per_row: int,
    pad_id: int,
) -> torch.Tensor:
    """Right-padded rows, each with the same images (`pixel_values` [n, 3, S, S], `images_per_row` = n image
    tensors, tiles counted) -> logits [B, T, V] as float32."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    pixels = None
    if pixel_values is not None and images_per_row:
        pixels = torch.cat([pixel_values] * len(rows)).to(device)  # [B * n, 3, S, S]
    with torch.no_grad():
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixels,
            image_counts=[images_per_row] * len(rows),
        )
    return out.logits.float()


def constrained_choice(
    model: VisionLanguageModel,
    prompt_ids: Sequence[int],
    pixel_values: torch.Tensor | None,
    option_ids: Sequence[Sequence[int]],
    images: int = 1,
) -> int:
    """Greedy decoding restricted at each step to tokens that continue some option (OFA-style trie
    constraint); returns the index of the option decoded.

    Each option ends with an end-of-option token (EOS), so an option that is a prefix of another can still be
    chosen. Decoding stops as soon as a single option (or several with identical tokens) remains.
    """
    eos = model.llm.eos_token_ids[0]
    trie = OptionTrie([list(o) + [eos] for o in option_ids])
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else eos
    generated: list[int] = []
    node = trie.root
    while len(set(node.options)) > 1 and node.children:
        logits = _forward_logits(model, [list(prompt_ids) + generated], pixel_values, images, pad)[0, -1]
        allowed = torch.tensor(sorted(node.children))
        token = int(allowed[logits[allowed].argmax()])
        generated.append(token)
        node = node.children[token]
    return node.options[0]


def option_logprobs(
    model: VisionLanguageModel,
    prompt_ids: Sequence[int],
    pixel_values: torch.Tensor | None,
    option_ids: Sequence[Sequence[int]],
    images: int = 1,
) -> list[tuple[float, float]]:
    """(sum, mean) log-probability of each option's tokens following the prompt, all options in one batch."""
    eos = model.llm.eos_token_ids[0]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else eos
    rows = [list(prompt_ids) + list(o) for o in option_ids]
    logprobs = _forward_logits(model, rows, pixel_values, images, pad).log_softmax(dim=-1)  # [K, T, V]
    start = len(prompt_ids) - 1  # logits at position t predict token t + 1
    out = []
    for k, option in enumerate(option_ids):
        if not option:
            out.append((float("-inf"), float("-inf")))
            continue
        targets = torch.tensor(list(option), device=logprobs.device)
        picked = logprobs[k, start : start + len(option)].gather(-1, targets[:, None]).squeeze(-1)  # [L]
        out.append((float(picked.sum()), float(picked.mean())))
    return out
