"""A CLIP text tower beside the LVLM, for CDPruner's and TRIM's text-to-patch relevance.

LLaVA keeps only CLIP's vision tower; the methods that compare patches with the question in
CLIP's joint space also load the full CLIP checkpoint the tower came from: its text model with
projection, its tokenizer and its ``visual_projection``. ``load_clip_text`` loads them once per
path (a local folder or a hub id; weights from safetensors), ``tiny_clip`` saves a random tiny
one for tests and demos.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = ["ClipText", "load_clip_text", "tiny_clip", "clip_checkpoint_of"]

KNOWN_TOWERS = {(1024, 24, 336, 14): "openai/clip-vit-large-patch14-336", (1024, 24, 224, 14): "openai/clip-vit-large-patch14"}
"""CLIP checkpoints by their vision tower's (hidden size, layers, image size, patch size)."""


def clip_checkpoint_of(vision_config: Any) -> str | None:
    """The CLIP checkpoint a LLaVA vision tower comes from: the one with its sizes (LLaVA-1.5 and
    LLaVA-NeXT: ``openai/clip-vit-large-patch14-336``), ``tiny:<hidden>`` for resprune's tiny
    models, ``None`` when unknown."""
    if getattr(vision_config, "resprune_tiny", False):
        return f"{TINY}{vision_config.hidden_size}"
    key = tuple(getattr(vision_config, name, None) for name in ("hidden_size", "num_hidden_layers", "image_size",
                                                                 "patch_size"))
    return KNOWN_TOWERS.get(key)


@dataclass
class ClipText:
    """CLIP's text side and its visual projection (float32, eval mode)."""

    tokenizer: Any
    text_model: Any  # CLIPTextModelWithProjection
    visual_projection: Any  # nn.Linear: vision hidden -> joint space
    max_positions: int

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    def to(self, device: Any) -> ClipText:
        self.text_model.to(device)
        self.visual_projection.to(device)
        return self

    @torch.no_grad()
    def embed_chunks(self, text: str) -> Tensor:
        """``[M, P]``: ``text`` tokenized whole, zero-padded to a multiple of the context length
        and cut into ``M`` chunks, each embedded (CDPruner)."""
        ids = self.tokenizer(text=[text], return_tensors="pt", verbose=False)  # longer than one chunk is fine
        chunks = (ids["input_ids"].shape[1] - 1) // self.max_positions + 1
        pad = self.max_positions * chunks - ids["input_ids"].shape[1]
        inputs = {name: torch.cat([value, value.new_zeros(1, pad)], dim=1).reshape(-1, self.max_positions)
                  .to(self.device) for name, value in ids.items() if name in ("input_ids", "attention_mask")}
        return self.text_model(**inputs).text_embeds.float()

    @torch.no_grad()
    def embed_truncated(self, texts: list[str]) -> Tensor:
        """``[B, P]``: each text truncated to the context length, padded together (TRIM)."""
        ids = self.tokenizer(text=texts, return_tensors="pt", truncation=True, padding=True)
        inputs = {name: value.to(self.device) for name, value in ids.items() if name in ("input_ids", "attention_mask")}
        return self.text_model(**inputs).text_embeds.float()

    @torch.no_grad()
    def project(self, features: Tensor) -> Tensor:
        """Vision features (after the tower's post-norm) in the joint space, float32."""
        return self.visual_projection(features.to(self.device, self.visual_projection.weight.dtype)).float()


TINY = "tiny:"
"""``tiny:<vision hidden size>``: a random tiny CLIP built in memory (what the tiny LVLMs pair with)."""


@functools.lru_cache(maxsize=4)
def load_clip_text(spec: str) -> ClipText:
    """The text tower, tokenizer and visual projection of the CLIP checkpoint ``spec`` (a folder,
    a hub id, or ``tiny:<vision hidden size>``)."""
    from transformers import AutoTokenizer, CLIPModel

    if spec.startswith(TINY):
        hidden = spec[len(TINY):]
        if not hidden.isdigit():
            raise ConfigError(f"clip_model='{spec}': a tiny CLIP is 'tiny:<vision hidden size>', e.g. 'tiny:32'.")
        model, tokenizer = _tiny_clip(int(hidden), seed=0)
    else:
        try:
            model = CLIPModel.from_pretrained(spec, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            where = "local folder" if Path(spec).exists() else "hub id (needs the hub or a local cache)"
            raise ConfigError(f"clip_model='{spec}': could not load a CLIP checkpoint as a {where}: {exc}") from exc
    from transformers import CLIPTextModelWithProjection

    text = CLIPTextModelWithProjection(model.config.text_config)
    text.text_model = model.text_model
    text.text_projection = model.text_projection
    text.float().eval()
    return ClipText(tokenizer=tokenizer, text_model=text, visual_projection=model.visual_projection.float().eval(),
                    max_positions=int(model.config.text_config.max_position_embeddings))


def tiny_clip(path: str | Path, *, vision_hidden: int = 32, seed: int = 0) -> Path:
    """Save a random tiny CLIP (text tower, projections, a byte-level tokenizer) to ``path``;
    ``vision_hidden`` must match the tower it sits beside (the tiny LLaVA's: 32). The same
    model as ``load_clip_text(f"tiny:{vision_hidden}")`` when ``seed`` is 0."""
    model, tokenizer = _tiny_clip(vision_hidden, seed)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _tiny_clip(vision_hidden: int, seed: int) -> tuple[Any, Any]:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    bos, eos = tok.token_to_id(specials[0]), tok.token_to_id(specials[1])
    tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A {specials[1]}",
                                                       special_tokens=[(specials[0], bos), (specials[1], eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                        pad_token=specials[1], model_max_length=16)
    text = transformers.CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                       bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, projection_dim=24)
    vision = transformers.CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                                           projection_dim=24)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config)
    return model.eval(), tokenizer
