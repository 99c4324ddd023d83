"""Terminal multi-turn chat: streamed answers, `/image PATH` mid-conversation, boxes in original pixels."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from vlmkit.data.images import ImageError, load_image
from vlmkit.infer.generate import ChatRequest, ChatResult, Predictor
from vlmkit.models.generation import GenerationConfig

HELP = """commands:
  /image PATH   attach an image to your next message (boxes then refer to it)
  /reset        forget the conversation and its images
  /help         this text
  /quit         leave (Ctrl-D works too)"""


@dataclass
class ChatSession:
    """A conversation with a `Predictor`: messages so far, their images, and images waiting for the next turn."""

    predictor: Predictor
    config: GenerationConfig = field(default_factory=GenerationConfig)
    max_pixels: int = 40_000_000
    max_bytes: int = 32 * 2**20
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    pending: int = 0  # images added since the last user turn

    def add_image(self, path: str | Path) -> Image.Image:
        """Load an image for the next user turn (raises `ImageError`)."""
        image = load_image(Path(path).expanduser(), max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        self.images.append(image)
        self.names.append(str(path))
        self.pending += 1
        return image

    def reset(self) -> None:
        self.messages, self.images, self.names, self.pending = [], [], [], 0

    def ask(self, text: str, on_text: Callable[[int, str], None] | None = None) -> ChatResult:
        """Send a user turn (with pending images first); the answer is added to the conversation."""
        content = [{"type": "image"} for _ in range(self.pending)] + [{"type": "text", "text": text}]
        messages = [*self.messages, {"role": "user", "content": content}]
        request = ChatRequest(messages, list(self.images), self.config, box_image=-1)
        result = self.predictor.generate([request], on_text=on_text)[0]
        self.messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": result.text}]}]
        self.pending = 0
        return result


def format_boxes(result: ChatResult, session: ChatSession) -> list[str]:
    """One line per box, in pixels of the most recent image of the conversation."""
    if not result.boxes or not session.images:
        return []
    image = session.images[-1]
    lines = [f"boxes in pixels of {session.names[-1]} ({image.width}x{image.height}):"]
    for ref, box in result.boxes:
        coords = ", ".join(str(round(v)) for v in box.to_xyxy())
        lines.append(f"  {ref or '(no phrase)'}: [{coords}]")
    return lines


def run_chat(
    predictor: Predictor,
    stdin: TextIO,
    stdout: TextIO,
    images: Sequence[str | Path] = (),
    config: GenerationConfig | None = None,
    prompt: str = "> ",
) -> int:
    """The REPL: read lines from `stdin` until /quit or EOF, stream answers to `stdout`. Returns an exit code."""
    session = ChatSession(predictor, config or GenerationConfig())

    def say(text: str = "") -> None:
        stdout.write(text + "\n")
        stdout.flush()

    def attach(path: str) -> None:
        try:
            image = session.add_image(path)
        except ImageError as err:
            say(f"error: {err}")
            return
        say(
            f"[image {len(session.images)}: {path} ({image.width}x{image.height}) attached to your next message]"
        )

    say("vlmkit chat - /help for commands")
    for path in images:
        attach(str(path))
    while True:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            say()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit", "/q"):
                return 0
            if command == "/reset":
                session.reset()
                say("[conversation reset]")
            elif command == "/image":
                if arg.strip():
                    attach(arg.strip())
                else:
                    say("usage: /image PATH")
            elif command == "/help":
                say(HELP)
            else:
                say(f"unknown command {command}; /help lists them")
            continue
        try:
            result = session.ask(line, on_text=lambda _row, delta: (stdout.write(delta), stdout.flush()))
        except ValueError as err:  # e.g. a prompt the template or the model refuses
            say(f"error: {err}")
            continue
        say()
        for text in format_boxes(result, session):
            say(text)


def session_config(**overrides: Any) -> GenerationConfig:
    """A `GenerationConfig` from CLI options (None values keep the defaults)."""
    return dataclasses.replace(GenerationConfig(), **{k: v for k, v in overrides.items() if v is not None})
