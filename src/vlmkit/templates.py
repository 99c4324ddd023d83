"""Every chat template the project ships (ChatML, Vicuna v1, LLaVA's plain) and the template resolver."""

from __future__ import annotations

from typing import Any

# ChatML, as SmolLM2 and Qwen use it (without SmolLM2's default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# FastChat `vicuna_v1`: "<system> USER: <q> ASSISTANT: <a></s>USER: ..." (seps " " and EOS).
VICUNA_V1_TEMPLATE = (
    "{{ bos_token if bos_token is defined and bos_token else '' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    '{% else %}{{ "' + VICUNA_V1_SYSTEM + ' " }}{% endif %}'
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# LLaVA pretraining ("plain"): the user turn's image placeholders (its text dropped), then caption + EOS.
PLAIN_TEMPLATE = (
    "{{ bos_token if bos_token is defined and bos_token else '' }}"
    "{% set image_token = image_token if image_token is defined else '<image>' %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ image_token * message['content'].count(image_token) }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML_TEMPLATE,
    "vicuna_v1": VICUNA_V1_TEMPLATE,
    "plain": PLAIN_TEMPLATE,
}


def resolve_template(tokenizer: Any, name: str = "auto") -> str:
    """The jinja chat template for `name`: `auto` = the tokenizer's own (else chatml), a built-in name, or a
    jinja string itself."""
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        return own or BUILTIN_TEMPLATES["chatml"]
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    if "{{" in name or "{%" in name:
        return name
    raise ValueError(
        f"unknown chat template '{name}'; known: auto, {', '.join(BUILTIN_TEMPLATES)} (or a jinja string)"
    )
