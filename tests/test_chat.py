"""`vlmkit chat`: the terminal REPL driven with fake stdin/stdout, and once as a real subprocess."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from vlmkit.infer.chat import ChatSession, run_chat
from vlmkit.infer.generate import Predictor
from vlmkit.models.generation import GenerationConfig

from conftest import random_image

ANSWER = "<ref>the red circle</ref><box>(100,200),(500,700)</box>"


class ScriptedPredictor(Predictor):
    """The real Predictor (template, preprocessing, decode-diff, box mapping) whose model always says ANSWER."""

    def __init__(self, model, answer: str = ANSWER) -> None:
        super().__init__(model)
        self.answer = answer
        self.calls: list[list] = []

    def generate(self, requests, *args, **kwargs):
        self.calls.append(list(requests))
        return super().generate(requests, *args, **kwargs)

    def _decode(self, batch, config, streamer) -> None:
        tokens = self.model.tokenizer.encode(self.answer, add_special_tokens=False)
        tokens.append(self.model.llm.eos_token_ids[0])
        for token in tokens[: config.max_new_tokens]:
            streamer(torch.full((batch["input_ids"].shape[0],), token))


@pytest.fixture
def images(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    random_image(1, (400, 300)).save(a)
    random_image(2, (200, 100)).save(b)
    return a, b


def test_repl_multi_turn_with_images_boxes_reset_and_quit(tiny_vlm, images, tmp_path):
    a, b = images
    predictor = ScriptedPredictor(tiny_vlm)
    script = (
        "\n".join(
            [
                "hello",
                f"/image {a}",
                "where is the red circle?",
                f"/image {b}",
                f"/image {tmp_path}/missing.png",
                "and here?",
                "/reset",
                "again",
                "/bogus",
                "",
                "/quit",
                "never read",
            ]
        )
        + "\n"
    )
    out = io.StringIO()
    assert run_chat(predictor, io.StringIO(script), out) == 0
    text = out.getvalue()

    assert len(predictor.calls) == 4  # hello, two image questions, again; nothing after /quit
    first, second, third, fourth = (calls[0] for calls in predictor.calls)
    assert len(first.messages) == 1 and first.images == []
    assert len(second.messages) == 3 and len(second.images) == 1  # history + the new turn with image a
    assert second.messages[-1]["content"][0] == {"type": "image"}
    assert second.messages[1]["content"][0]["text"] == ANSWER  # the answer became part of the history
    assert len(third.messages) == 5 and [im.size for im in third.images] == [(400, 300), (200, 100)]
    assert [p["type"] for p in third.messages[-1]["content"]] == ["image", "text"]  # only the new image
    assert len(fourth.messages) == 1 and fourth.images == []  # /reset forgot everything

    assert text.count(ANSWER) == 4  # streamed answers
    # boxes in pixels of the most recent image: qwen bins / 1000 * original size
    assert f"boxes in pixels of {a} (400x300):" in text
    assert "the red circle: [40, 60, 200, 210]" in text
    assert f"boxes in pixels of {b} (200x100):" in text
    assert "the red circle: [20, 20, 100, 70]" in text
    assert "[image 1: " in text and "[image 2: " in text
    assert "error: missing_file" in text
    assert "[conversation reset]" in text
    assert "unknown command /bogus" in text


def test_images_given_on_the_command_line_and_eof(tiny_vlm, images):
    a, _ = images
    predictor = ScriptedPredictor(tiny_vlm)
    out = io.StringIO()
    assert run_chat(predictor, io.StringIO("find it\n"), out, images=[a]) == 0  # EOF ends the chat
    request = predictor.calls[0][0]
    assert [im.size for im in request.images] == [(400, 300)]
    assert "the red circle: [40, 60, 200, 210]" in out.getvalue()


def test_session_with_the_real_tiny_model(tiny_vlm, images):
    session = ChatSession(Predictor(tiny_vlm), GenerationConfig(max_new_tokens=4, eos_token_ids=[-1]))
    session.add_image(images[0])
    pieces: list[str] = []
    result = session.ask("what is it?", on_text=lambda _row, delta: pieces.append(delta))
    assert result.completion_tokens == 4 and "".join(pieces) == result.text
    assert [m["role"] for m in session.messages] == ["user", "assistant"] and session.pending == 0


def test_cli_chat_subprocess(tiny_vlm, tmp_path):
    model_dir = tiny_vlm.save_pretrained(tmp_path / "model")
    proc = subprocess.run(
        [sys.executable, "-m", "vlmkit.cli", "chat", str(model_dir), "--max-tokens", "3"],
        input="/help\nhello\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "/image PATH" in proc.stdout  # the help text
    assert proc.stdout.count("> ") >= 3  # a prompt per line read
