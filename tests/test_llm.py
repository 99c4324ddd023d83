"""LLM loading: tiny random, local directory, and the packaged SmolLM2 GGUF (slow)."""

from __future__ import annotations

import pytest
import torch

from vlmkit.config import LLMConfig
from vlmkit.models.llm import LLM_LOADERS, build_llm, smollm2_dir


def test_tiny_llm_adds_image_token_and_resizes():
    torch.manual_seed(0)
    llm = build_llm(LLMConfig.make("tiny"))
    assert "<image>" in llm.tokenizer.get_vocab()
    assert llm.embeddings.num_embeddings == len(llm.tokenizer)
    ids = llm.tokenizer("a red <image><image> circle")["input_ids"]
    assert ids.count(llm.image_token_id) == 2  # the placeholder is one token, never split
    assert llm.hidden_size == 64 and len(llm.layers) == 2
    assert llm.block_cls[0].__name__ == "LlamaDecoderLayer"
    assert llm.tokenizer.convert_tokens_to_ids("<|im_end|>") in llm.eos_token_ids


def test_local_directory_round_trip(tmp_path):
    torch.manual_seed(0)
    llm = build_llm(LLMConfig.make("tiny"))
    llm.model.save_pretrained(tmp_path)
    llm.tokenizer.save_pretrained(tmp_path)
    again = build_llm(LLMConfig.make("hf", path=str(tmp_path)))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(again.model(input_ids=ids).logits, llm.model(input_ids=ids).logits, atol=1e-6)
    assert again.image_token_id == llm.image_token_id


def test_unknown_loader_lists_known():
    with pytest.raises(KeyError, match="hf, smollm2, tiny"):
        LLM_LOADERS.get("gpt5")


@pytest.mark.slow
def test_default_smollm2_from_installed_package(smollm2_vlm):
    assert (smollm2_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    llm = smollm2_vlm.llm
    assert llm.hidden_size == 576 and len(llm.layers) == 30
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    answer = smollm2_vlm.generate_text([prompt], max_new_tokens=12)[0]
    assert "Paris" in answer


def test_the_kv_cache_is_passed_under_the_installed_transformers_name():
    """transformers renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40): generation, the
    engine and the model's forward must use the name of the installed version, with no deprecation warning."""
    import warnings

    from vlmkit.infer.engine import Engine, RowSink
    from vlmkit.infer.generate import ChatRequest, Predictor
    from vlmkit.models.generation import GenerationConfig

    from conftest import lively_model, random_image, user_turn

    model = lively_model()
    requests = [
        ChatRequest(user_turn("what is it?", 1), [random_image(1)], GenerationConfig(max_new_tokens=4))
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        answer = Predictor(model).generate(requests)[0]
        engine = Engine(Predictor(model), lean=False)
        done = []
        engine.add(engine.prepare(requests[0]), RowSink(on_done=done.append))
        while engine.busy:
            engine.step()
    assert answer.completion_tokens == 4 and done[0].token_ids == answer.token_ids
