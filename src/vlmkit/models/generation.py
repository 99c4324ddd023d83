"""Decoding: greedy / sampling with temperature, top-k, top-p; EOS and stop strings; KV cache or not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from vlmkit.models.hf_compat import returned_cache


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    use_cache: bool = True


def select_next(
    logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] (argmax, or a sample after temperature / top-k / top-p)."""
    if not cfg.do_sample or cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, cfg), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """logits [B, V] -> the distribution sampled from [B, V], after temperature, top-k and top-p (row-wise)."""
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def select_rows(
    logits: torch.Tensor,
    configs: Sequence[GenerationConfig],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B], each row by its own settings and random stream: a row gets exactly the
    token `select_next(logits[i:i+1], configs[i], generators[i])` would give, whatever its batch-mates."""
    tokens = logits.argmax(dim=-1)  # [B]
    groups: dict[tuple[float, float, int], list[int]] = {}
    for row, cfg in enumerate(configs):
        if cfg.do_sample and cfg.temperature > 0:
            groups.setdefault((cfg.temperature, cfg.top_p, cfg.top_k), []).append(row)
    for rows in groups.values():
        probs = sampling_probs(logits[rows], configs[rows[0]])  # row-wise ops: the same as one row at a time
        for j, row in enumerate(rows):
            tokens[row] = torch.multinomial(probs[j : j + 1], 1, generator=generators[row])[0, 0]
    return tokens


def decode_loop(
    step: Callable[..., Any],
    inputs: Any,
    attention_mask: torch.Tensor,
    advance: Callable[[dict[str, Any], bool], dict[str, Any]],
    llm: Any,
    cfg: GenerationConfig,
    eos_token_ids: Sequence[int],
    streamer: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the token loop over `step(embeds, mask, position_ids, cache, kwargs) -> output with .logits`.

    `inputs` (an `LLMInputs`): embeds [B, T, D] (left padded, mask [B, T]) and the extra keyword arguments of the
    LLM call, which `advance(kwargs, cached)` carries to the next step (the fusion's business, not the loop's).
    Returns new tokens [B, L], padded after a row ends.
    """
    embeds, kwargs = inputs.embeds, inputs.kwargs
    batch = embeds.shape[0]
    device = embeds.device
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    pad_id = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else eos_token_ids[0]
    eos = torch.tensor(list(eos_token_ids), device=device)
    positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # [B, T]
    cache = DynamicCache() if cfg.use_cache else None
    cur_embeds, cur_pos = embeds, positions
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    for _ in range(cfg.max_new_tokens):
        out = step(cur_embeds, attention_mask, cur_pos, cache, kwargs)
        next_tok = select_next(out.logits[:, -1].float(), cfg, generator)
        next_tok = torch.where(finished, torch.full_like(next_tok, pad_id), next_tok)  # [B]
        tokens.append(next_tok)
        if streamer is not None:
            streamer(next_tok)
        finished |= torch.isin(next_tok, eos)
        if cfg.stop_strings:
            finished |= _hit_stop(torch.stack(tokens, dim=1), finished, llm.tokenizer, cfg.stop_strings)
        if bool(finished.all()):
            break
        new_embed = llm.embed(next_tok[:, None])  # [B, 1, D]
        new_pos = positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        positions = torch.cat([positions, new_pos], dim=1)
        kwargs = advance(kwargs, cache is not None)
        if cache is not None:
            cache = returned_cache(out)
            cur_embeds, cur_pos = new_embed, new_pos
        else:
            embeds = torch.cat([embeds, new_embed], dim=1)
            cur_embeds, cur_pos = embeds, positions
    if not tokens:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    return torch.stack(tokens, dim=1)


def _hit_stop(
    tokens: torch.Tensor, finished: torch.Tensor, tokenizer: Any, stops: Sequence[str]
) -> torch.Tensor:
    """Rows (not yet finished) whose decoded text contains a stop string. tokens [B, L] -> [B] bool."""
    hit = torch.zeros_like(finished)
    for row in range(tokens.shape[0]):
        if finished[row]:
            continue
        text = tokenizer.decode(tokens[row, -32:], skip_special_tokens=False)
        hit[row] = any(s in text for s in stops)
    return hit
