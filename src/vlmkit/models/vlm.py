"""VisionLanguageModel: vision tower + bridge + LLM (+ fusion mode); forward, generate, save/load.

Over 400 lines: composition, forward, generate, the LoRA gate and save/load of one model class; the parts
with their own concerns already live apart (fusion/, generation.py, row_batch.py, hf_export.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoTokenizer

from vlmkit import __version__
from vlmkit.config import LLMConfig, LoRAConfig, ModelConfig, drop_unknown_keys, from_dict, to_dict
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.collate import Collator
from vlmkit.data.images import AnyResLayout
from vlmkit.data.processor import ImageTokenMismatchError, Processor, VisionGeometry
from vlmkit.faults import kill_point
from vlmkit.io import replace_dir, temp_dir_for
from vlmkit.log import get_logger
from vlmkit.models.adapters import LLMAdapters
from vlmkit.models.bridges import Bridge, build_bridge
from vlmkit.models.detection import DetectionHead
from vlmkit.models.fusion import LLMInputs, build_fusion
from vlmkit.models.generation import GenerationConfig, decode_loop
from vlmkit.models.hf_compat import returned_cache
from vlmkit.models.llm import LanguageModel, build_llm
from vlmkit.models.lora import ImageGate, has_lora, rows_with_image, wrap_lora
from vlmkit.models.vision import VisionTower, build_vision_tower

log = get_logger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclasses.dataclass
class VLMOutput:
    logits: torch.Tensor | None  # [B, T, V] (None when the loss was computed at labelled positions only)
    loss: torch.Tensor | None = None
    past_key_values: Any = None


class VisionLanguageModel(nn.Module):
    """Composes a `VisionTower`, a `Bridge` and a `LanguageModel` under one `ModelConfig`."""

    def __init__(self, cfg: ModelConfig, vision: VisionTower, bridge: Bridge, llm: LanguageModel) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.bridge = bridge
        self.llm = llm
        self.fusion = build_fusion(llm, cfg.fusion)  # how visual tokens enter the LLM (FUSIONS registry)
        if self.llava_next:  # LLaVA-NeXT: a learned token after each row of the unpadded tile grid
            _check_llava_next(cfg)
            dim = llm.hidden_size  # initialised as transformers does; trains with the bridge
            newline = torch.randn(dim, dtype=llm.embeddings.weight.dtype) / dim**0.5
            bridge.register_parameter("image_newline", nn.Parameter(newline))
        self.adapters: nn.Module | None = None
        if cfg.adapters is not None:
            self.adapters = LLMAdapters(llm, cfg.adapters)  # Lynx: bottleneck adapters in the LLM
        self.lora_gate: ImageGate | None = None  # set by `add_lora` for an image-gated adapter
        self.visual_rms: torch.Tensor | None = None  # RMS of the last forward's visual tokens (training logs)

    # ------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer: Any = None) -> VisionLanguageModel:
        """Build every part named in `cfg` (pretrained weights are loaded where a part's kind has them)."""
        vision = build_vision_tower(cfg.vision)
        llm = build_llm(cfg.llm, tokenizer)
        embed_rms = 1.0  # the output norm's initial gain (cfg.bridge.out_norm): the LLM's embedding scale
        if cfg.bridge.out_norm:
            embed_rms = float(llm.embeddings.weight.detach().float().pow(2).mean().sqrt())
        bridge = build_bridge(vision.feature_dim, llm.hidden_size, cfg.bridge, embed_rms)
        bridge.bind_llm(llm)  # word bridges start from the LLM's word embeddings
        model = cls(cfg, vision, bridge, llm)
        if cfg.lora is not None:  # a saved model's unmerged, image-gated adapter
            model.add_lora(cfg.lora)
        return model

    # ----------------------------------------------------------------------------------------- LoRA
    def add_lora(self, cfg: LoRAConfig) -> None:
        """Wrap the LLM with peft LoRA adapters. With `cfg.gate == "image"` they stay unmerged (saved with the
        model, recorded in `cfg.lora`) and run only for prompts that carry an image."""
        if has_lora(self.llm.model):
            raise ValueError("the LLM already has LoRA adapters")
        self.llm.model = wrap_lora(self.llm.model, cfg)
        if cfg.gate == "image":
            self.lora_gate = ImageGate(self.llm.model)
            self.cfg.lora = from_dict(LoRAConfig, to_dict(cfg))

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LLM weights (a plain transformers model again; ungated)."""
        if not has_lora(self.llm.model):
            return
        if self.lora_gate is not None:
            self.lora_gate.remove()
            self.lora_gate = None
        self.llm.model = self.llm.model.merge_and_unload()
        self.cfg.lora = None

    def image_rows(self, with_image: torch.Tensor) -> Any:
        """Context for LLM passes over rows of which only those where `with_image` ([B], or [B, T] for packed
        rows; bool) is true get the image-gated LoRA; nothing without one. For callers that run the LLM on rows
        they built themselves (the server's engine)."""
        if self.lora_gate is None:
            return contextlib.nullcontext()
        return self.lora_gate.rows(with_image)

    def _gated(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> Any:
        """Context for one LLM pass: an image-gated LoRA runs only on the rows (packed samples) with an image."""
        if self.lora_gate is None:
            return contextlib.nullcontext()
        return self.image_rows(rows_with_image(input_ids, self.image_token_id, position_ids))

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def llava_next(self) -> bool:
        """AnyRes images laid out as LLaVA-NeXT does (`processor.anyres_layout: llava_next`)."""
        proc = self.cfg.processor
        return proc.resize == "anyres" and proc.anyres_layout == "llava_next"

    @property
    def image_token_id(self) -> int:
        return self.llm.image_token_id

    def tokens_per_image(self, num_tiles: int = 1) -> int:
        """Placeholder tokens one image occupies in the text (1 under cross-attention fusion)."""
        return num_tiles * self.fusion.placeholders(self.bridge.num_tokens(self.vision.num_patches()))

    def image_placeholder(self, num_tiles: int = 1) -> str:
        """The exact placeholder string for one image (the image token repeated)."""
        return self.llm.image_token * self.tokens_per_image(num_tiles)

    @property
    def geometry(self) -> VisionGeometry:
        """The tower's input size and normalisation and the visual tokens per tower input, as numbers."""
        vision = self.vision
        return VisionGeometry(
            int(vision.image_size),
            tuple(float(x) for x in vision.image_mean),
            tuple(float(x) for x in vision.image_std),
            self.tokens_per_image(1),
        )

    @property
    def processor(self) -> Processor:
        """The `Processor` for this model: its `cfg.processor` settings, tokenizer and tower geometry."""
        return Processor(self.cfg.processor, self.tokenizer, self.geometry, self.llm.image_token)

    # -------------------------------------------------------------------------------------- forward
    def encode_images(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pixel_values [I, 3, S, S] (or precomputed tower output [I, N, Dv]) -> visual tokens [I, M, D_llm]."""
        features = vision_features if vision_features is not None else self.vision(pixel_values)  # [I, N, Dv]
        return self.bridge(features.to(self._bridge_dtype())).to(
            self.llm.embeddings.weight.dtype
        )  # [I, M, Dl]

    def _bridge_dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_counts: Sequence[int] | None = None,
        sample_ids: Sequence[str] | None = None,
        position_ids: torch.Tensor | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> LLMInputs:
        """Token ids [B, T] with placeholders + the images -> the LLM's inputs, through the fusion (one path for
        training and generation). Placeholder counts are checked against the images first, naming the sample.
        `image_sizes`: each image's original (width, height), needed by the `llava_next` layout."""
        embeds = self.llm.embed(input_ids)  # [B, T, D]
        visual = None
        if vision_features is not None and len(vision_features):
            visual = self.encode_images(vision_features=vision_features)  # [I, M, D]
        elif pixel_values is not None and len(pixel_values):
            visual = self.encode_images(pixel_values)
        is_image = input_ids == self.image_token_id  # [B, T]
        if visual is not None:  # read by the trainer's logs (one reduction over the tokens, no copy)
            self.visual_rms = torch.linalg.vector_norm(visual.detach(), dtype=torch.float32) / math.sqrt(
                visual.numel()
            )
        placeholders = is_image.sum(dim=1).tolist()
        if self.llava_next:
            visual = self._llava_next_tokens(visual, image_sizes, image_counts, placeholders, sample_ids)
        else:
            num_images = 0 if visual is None else len(visual)
            check_image_tokens(placeholders, image_counts, num_images, self.tokens_per_image(), sample_ids)
        return self.fusion.merge(is_image, embeds, visual, position_ids)

    def _llava_next_tokens(
        self,
        visual: torch.Tensor | None,
        image_sizes: Sequence[Sequence[int]] | None,
        image_counts: Sequence[int] | None,
        placeholders: list[int],
        sample_ids: Sequence[str] | None,
    ) -> torch.Tensor | None:
        """Tile tokens [I_tiles, M, D] -> each image's LLaVA-NeXT sequence, all images joined: [1, tokens, D]."""
        if visual is None:
            check_image_tokens(placeholders, image_counts, 0, 1, sample_ids)
            return None
        if image_sizes is None:
            raise ImageTokenMismatchError(
                "anyres_layout 'llava_next' needs each image's size: pass image_sizes (the processor's "
                "ChatInputs / dataset items carry them)"
            )
        images = self.processor.images
        layouts = [images.layout((int(w), int(h))) for w, h in image_sizes]
        tiles = [lay.num_tiles for lay in layouts]
        if sum(tiles) != len(visual):
            raise ImageTokenMismatchError(
                f"{len(image_sizes)} image sizes make {sum(tiles)} AnyRes tiles but {len(visual)} tiles were given"
            )
        grid = math.isqrt(visual.shape[1])
        newline = self.bridge.image_newline.to(visual.dtype)
        chunks = torch.split(visual, tiles)  # one [tiles_i, M, D] per image
        packed = [pack_llava_next(c, lay, grid, newline) for c, lay in zip(chunks, layouts)]
        counts = [len(p) for p in packed]
        check_llava_next_rows(placeholders, image_counts, tiles, counts, sample_ids)
        return torch.cat(packed).unsqueeze(0)  # [1, sum tokens, D]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_counts: Sequence[int] | None = None,
        sample_ids: Sequence[str] | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        vision_features: torch.Tensor | None = None,
        return_logits: bool = True,
        label_weights: torch.Tensor | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> VLMOutput:
        """input_ids [B, T] with image placeholders; pixel_values [I, 3, S, S] for all images, in order (or
        `vision_features` [I, N, Dv], a frozen tower's cached output).

        With labels and `return_logits=False` (training), the LM head runs only where a label is set: the same
        loss without the [B, T, vocab] logits. `label_weights` [B, T] (aligned with labels) turn the token mean
        into a weighted mean (`sample_label_weights`: the mean over samples).
        """
        inputs = self.embed_inputs(
            input_ids, pixel_values, vision_features, image_counts, sample_ids, position_ids, image_sizes
        )
        common = {
            "inputs_embeds": inputs.embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        with self._gated(input_ids, position_ids):
            return self._llm_pass(
                inputs, common, labels, past_key_values, use_cache, return_logits, label_weights
            )

    def _llm_pass(
        self,
        inputs: LLMInputs,
        common: dict[str, Any],
        labels: torch.Tensor | None,
        past_key_values: Any,
        use_cache: bool,
        return_logits: bool,
        label_weights: torch.Tensor | None,
    ) -> VLMOutput:
        """The LLM on the merged inputs: the loss at labelled positions only, or logits (+ loss)."""
        if labels is not None and not return_logits and not use_cache and self.llm.plain_lm_head:
            # use_cache=False also matters for packed rows: with a cache, transformers skips detecting
            # the packed samples from position_ids and lets them attend to each other.
            hidden = self.llm.decoder(
                **common, use_cache=False, **inputs.kwargs
            ).last_hidden_state  # [B, T, D]
            self.fusion.check(inputs.kwargs)
            return VLMOutput(None, labelled_lm_loss(hidden, labels, self.llm.lm_head, label_weights))
        out = self.llm(**common, past_key_values=past_key_values, use_cache=use_cache, **inputs.kwargs)
        self.fusion.check(inputs.kwargs)
        loss = causal_lm_loss(out.logits, labels, label_weights) if labels is not None else None
        return VLMOutput(out.logits, loss, returned_cache(out) if use_cache else None)

    # ------------------------------------------------------------------------------------ diagnostics
    def word_embedding_rms(self) -> float:
        """RMS of the LLM's input-embedding table: the scale its word tokens enter the first layer at."""
        return float(self.llm.embeddings.weight.detach().float().pow(2).mean().sqrt())

    @torch.no_grad()
    def visual_token_stats(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        """How the LLM reads this batch's visual tokens ({} without images, or when the fusion does not put them
        in the input sequence):

        `visual_rms_ratio`: their RMS over the word-embedding RMS (>> 1: too loud, read as a fixed vector);
        `visual_cos` / `text_cos`: per layer l = 1..L, the mean cosine between a token's hidden state after
        layer l and its input embedding, for visual tokens and for text tokens. A text token's falls to ~0 after
        a layer or two; visual tokens whose cosine stays near 1 are carried through the layers untransformed.
        """
        if pixel_values is None and vision_features is None:
            return {}
        inputs = self.embed_inputs(
            input_ids, pixel_values, vision_features, position_ids=position_ids, image_sizes=image_sizes
        )
        if inputs.kwargs:  # cross-attention: the images are not in the sequence
            return {}
        with self._gated(input_ids, position_ids):
            hidden = self.llm.decoder(
                inputs_embeds=inputs.embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=True,
                use_cache=False,
            ).hidden_states  # L + 1 tensors [B, T, D]
        is_image = input_ids == self.image_token_id
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_image)
        is_text = valid & ~is_image

        def cosines(where: torch.Tensor) -> list[float]:
            h0 = hidden[0][where].float()
            return [
                round(float(nn.functional.cosine_similarity(h[where].float(), h0, dim=-1).mean()), 4)
                for h in hidden[1:]
            ]

        return {
            "visual_rms_ratio": float(self.visual_rms) / max(self.word_embedding_rms(), 1e-12),
            "visual_cos": cosines(is_image),
            "text_cos": cosines(is_text),
        }

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_counts: Sequence[int] | None = None,
        config: GenerationConfig | None = None,
        streamer: Callable[[torch.Tensor], None] | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Decode from left-padded prompts; returns new token ids [B, L] (EOS-padded after a row ends).

        `overrides` set fields of `GenerationConfig` (max_new_tokens, do_sample, temperature, top_p, top_k,
        seed, stop_strings, use_cache, eos_token_ids).
        """
        config = dataclasses.replace(config or GenerationConfig(), **overrides)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = self.embed_inputs(
            input_ids, pixel_values, image_counts=image_counts, image_sizes=image_sizes
        )
        eos = config.eos_token_ids or self.llm.eos_token_ids
        with self._gated(input_ids):
            return decode_loop(
                self._step, inputs, attention_mask, self.fusion.advance, self.llm, config, eos, streamer
            )

    def _step(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any,
        kwargs: dict[str, Any],
    ) -> Any:
        """One LLM call for `decode_loop`: embeds [B, t, D] -> logits [B, 1, V] (+ cache)."""
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            logits_to_keep=1,  # the decode loop reads only the last position: skip the rest of the LM head
            **kwargs,
        )

    def generate_text(
        self, prompts: Sequence[str], images: Sequence[Sequence[Any]] | None = None, **overrides: Any
    ) -> list[str]:
        """Convenience: prompts with `<image>` markers (already chat-formatted) + PIL images -> texts."""
        batch = self.prepare_prompts(prompts, images)
        config = dataclasses.replace(GenerationConfig(), **overrides)
        new = self.generate(**batch, config=config)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [truncate_at_stop(t, config.stop_strings) for t in texts]

    def prepare_prompts(
        self, prompts: Sequence[str], images: Sequence[Sequence[Any]] | None = None
    ) -> dict[str, Any]:
        """Chat-formatted prompts with `<image>` markers + PIL images -> a left-padded batch, through the model's
        `processor` (the same image preprocessing as training)."""
        images = images or [[] for _ in prompts]
        processor = self.processor
        items = [processor.encode_prompt(p, imgs).item() for p, imgs in zip(prompts, images)]
        batch = Collator(self.tokenizer.pad_token_id, "left")(items)
        keep = ("input_ids", "attention_mask", "pixel_values", "image_counts", "image_sizes")
        return {k: batch[k] for k in keep if k in batch}

    # -------------------------------------------------------------------------------------- save/load
    def portable_config(self) -> ModelConfig:
        """A config that rebuilds this exact architecture without any download or pretrained source."""
        cfg = from_dict(ModelConfig, to_dict(self.cfg))
        common = {k: getattr(cfg.llm, k) for k in ("image_token", "chat_template", "dtype")}
        cfg.llm = LLMConfig.make("hf", hf_config=self.llm.model.config.to_dict(), **common)
        _portable_vision(cfg.vision, self.vision)
        heads = [m for m in self.bridge.modules() if isinstance(m, DetectionHead)]
        if heads:  # the saved model holds the head's weights; its label groups rebuild it
            cfg.bridge.detector.path, cfg.bridge.detector.groups = None, dict(heads[0].groups)
        return cfg

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write config.json + model.safetensors + tokenizer atomically (temp dir, then rename)."""
        out = Path(out_dir)
        tmp = temp_dir_for(out)
        meta = {"vlmkit_version": __version__, "model": to_dict(self.portable_config())}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        save_model(self, str(tmp / WEIGHTS_NAME))
        kill_point("model_save")
        self.processor.save_pretrained(tmp)  # processor_config.json + the tokenizer files
        replace_dir(tmp, out)
        return out

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> VisionLanguageModel:
        """Load a directory written by `save_pretrained` (no network, no pretrained sources needed)."""
        model_dir = Path(model_dir)
        if not (model_dir / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{model_dir} has no {CONFIG_NAME}: not a vlmkit model directory")
        meta = json.loads((model_dir / CONFIG_NAME).read_text())
        # written by vlmkit itself: keys an older version saved for every kind are dropped, not refused
        cfg = from_dict(ModelConfig, drop_unknown_keys(ModelConfig, meta["model"]))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = cls.from_config(cfg, tokenizer=tokenizer)
        missing, unexpected = load_model(model, str(model_dir / WEIGHTS_NAME), strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"weights do not match the config: missing={missing[:5]} unexpected={unexpected[:5]}"
            )
        return model.eval()


# ------------------------------------------------------------------------------------------- helpers
def check_image_tokens(
    placeholders_per_row: list[int],
    image_counts: Sequence[int] | None,
    num_images: int,
    tokens_per_image: int,
    sample_ids: Sequence[str] | None,
) -> None:
    """Raise `ImageTokenMismatchError` naming the sample whose placeholders and images disagree."""
    if image_counts is not None:
        if len(image_counts) != len(placeholders_per_row):
            raise ImageTokenMismatchError(
                f"image_counts has {len(image_counts)} entries for a batch of {len(placeholders_per_row)}"
            )
        if sum(image_counts) != num_images:
            raise ImageTokenMismatchError(
                f"image_counts sum to {sum(image_counts)} but {num_images} images given"
            )
        for row, (have, n_img) in enumerate(zip(placeholders_per_row, image_counts)):
            if have != n_img * tokens_per_image:
                name = f"sample '{sample_ids[row]}'" if sample_ids else "sample"
                raise ImageTokenMismatchError(
                    f"{name} (batch row {row}) has {have} image placeholder tokens but its {n_img} image(s) "
                    f"yield {n_img * tokens_per_image} visual tokens ({tokens_per_image} per image)"
                )
    total = sum(placeholders_per_row)
    if total != num_images * tokens_per_image:
        rows = [i for i, n in enumerate(placeholders_per_row) if n % max(tokens_per_image, 1)]
        which = f"; rows with a partial run: {rows}" if rows else ""
        names = f" (samples {[sample_ids[i] for i in rows]})" if sample_ids and rows else ""
        raise ImageTokenMismatchError(
            f"the batch has {total} image placeholder tokens but {num_images} image(s) yield "
            f"{num_images * tokens_per_image} visual tokens ({tokens_per_image} per image){which}{names}"
        )


def _check_llava_next(cfg: ModelConfig) -> None:
    if cfg.fusion.mode != "prefix":
        raise ValueError(
            f"processor.anyres_layout 'llava_next' needs prefix fusion (the image_newline tokens fill placeholders); "
            f"fusion is '{cfg.fusion.mode}'"
        )


def pack_llava_next(
    tiles: torch.Tensor, layout: AnyResLayout, grid: int, newline: torch.Tensor
) -> torch.Tensor:
    """One image's tile tokens [1 + rows·cols, grid², D] (global view first, then the grid's tiles row-major)
    -> LLaVA-NeXT's sequence [T, D]: the global view's tokens, then the tile grid's token map cut to the
    image (`AnyResLayout.unpadded_cells`) with `newline` [D] after each of its rows."""
    base, cells = tiles[0], tiles[1:]
    dim = tiles.shape[-1]
    fmap = cells.view(layout.rows, layout.cols, grid, grid, dim).permute(0, 2, 1, 3, 4)
    fmap = fmap.reshape(layout.rows * grid, layout.cols * grid, dim)  # [H, W, D]
    top, left, height, width = layout.unpadded_cells(grid)
    fmap = fmap[top : top + height, left : left + width]  # [h, w, D]
    rows = torch.cat([fmap, newline.view(1, 1, dim).expand(height, 1, dim)], dim=1)  # [h, w + 1, D]
    return torch.cat([base, rows.reshape(-1, dim)])  # [grid² + h·(w + 1), D]


def check_llava_next_rows(
    placeholders_per_row: list[int],
    image_counts: Sequence[int] | None,
    tiles: list[int],
    tokens: list[int],
    sample_ids: Sequence[str] | None,
) -> None:
    """Raise `ImageTokenMismatchError` naming the sample whose placeholders differ from its images' LLaVA-NeXT
    token counts (`image_counts`: tiles per row; `tiles` / `tokens`: per image, in order)."""
    if image_counts is not None:
        expected, at = [], 0
        for n_tiles in image_counts:
            start, covered = at, 0
            while covered < n_tiles and at < len(tiles):
                covered, at = covered + tiles[at], at + 1
            if covered != n_tiles:
                raise ImageTokenMismatchError(
                    f"image_counts {list(image_counts)} (tiles per row) do not split into whole images of "
                    f"{tiles} tiles"
                )
            expected.append(sum(tokens[start:at]))
        for row, (have, want) in enumerate(zip(placeholders_per_row, expected)):
            if have != want:
                name = f"sample '{sample_ids[row]}'" if sample_ids else "sample"
                raise ImageTokenMismatchError(
                    f"{name} (batch row {row}) has {have} image placeholder tokens but its images yield {want} "
                    "LLaVA-NeXT visual tokens (anyres_layout 'llava_next': the count depends on each image's size)"
                )
    if sum(placeholders_per_row) != sum(tokens):
        raise ImageTokenMismatchError(
            f"the batch has {sum(placeholders_per_row)} image placeholder tokens but its {len(tokens)} image(s) "
            f"yield {sum(tokens)} LLaVA-NeXT visual tokens ({tokens})"
        )


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy; labels are aligned with inputs and shifted here (the one place).
    `weights` [B, T] (aligned with labels): a weighted mean instead."""
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    if weights is None:
        return nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
    keep = shift_labels != IGNORE_INDEX
    return _selected_ce(shift_logits[keep], shift_labels[keep], weights[:, 1:][keep])


def _selected_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy over already selected label positions [K, V] / [K]: the mean, or the `weights` [K]
    weighted mean; 0 (still in the graph) when nothing is selected."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if weights is None:
        return nn.functional.cross_entropy(logits, target)
    nll = nn.functional.cross_entropy(logits, target, reduction="none")
    w = weights.to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp(min=1e-12)


def labelled_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """`causal_lm_loss` computed from hidden states [B, T, D], running the LM head only at positions whose
    next-token label is set (equal to the full computation; far cheaper for large vocabularies)."""
    target = labels[:, 1:]  # [B, T-1]
    keep = target != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][keep]).float()  # [K, V]
    return _selected_ce(logits, target[keep], None if weights is None else weights[:, 1:][keep])


def truncate_at_stop(text: str, stop_strings: Sequence[str] | None) -> str:
    """Cut `text` at the first occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings or ():
        at = text.find(stop)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]


def _portable_vision(cfg: Any, tower: VisionTower) -> None:
    """Replace hub ids / local paths of HF towers by their full configs (recursively for fused towers)."""
    hf = tower.hf_config_dict()
    if hf is not None:
        cfg.path, cfg.hf_config = None, hf
    elif cfg.kind == "vit":
        cfg.path = None  # the saved model holds the weights; a pretrained-weights path is not needed again
    for sub_cfg, sub_tower in zip(getattr(cfg, "towers", []), getattr(tower, "towers", [])):
        _portable_vision(sub_cfg, sub_tower)
