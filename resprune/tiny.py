"""Tiny randomly initialised LVLMs with offline processors, for demos, sweeps and tests
(``tiny:llava`` and its siblings on the command line; ``resprune.testing`` re-exports them).

Nothing is downloaded: the tokenizer is a byte-level BPE with no merges (256 byte tokens
plus the model family's special tokens) and the image processors are built from code.
Widths are tiny (vision 32, text 64, 2 layers each) but the image-token grids keep a
realistic shape, so pruning code sees the same structure as on the real checkpoints.

Default sizes and image-token counts ``N`` per image:

- ``"llava"``: CLIP tower, 84 px input, patch 14 -> 6x6 grid, ``N = 36`` for every image.
- ``"llava_next"``: 42 px base tile (3x3), pinpoints of 1-3 tiles of 42 px (like LLaVA-NeXT's
  336 px set), one newline feature per grid row; ``N`` depends on the aspect ratio
  (e.g. 51 for a square photo).
- ``"qwen2_5_vl"``: patch 14, 2x2 merge, 56*56 <= pixels <= 224*224; a 112x84 image gives
  12 tokens, a 448x448 photo 64.
- ``"llava_onevision"``: SigLIP tower (no CLS), 84 px tiles (6x6 patches), LLaVA-NeXT-style
  pinpoints of 1-3 tiles, Qwen2 LLM; an image is its base tile plus the unpadded crops with a
  newline per row (e.g. 192 for a square photo), a video frame is the 3x3 bilinear pooling of
  its tile, plus one newline per video (``N = 9 t + 1``).
- ``"gemma3"``: SigLIP tower at 168 px (12x12 patches), average-pooled 2x2 to ``N = 36`` tokens per
  image (6x6; at 896 px 4x4 to 256, as Gemma 3), a Gemma 3 LLM of one sliding-window (512 tokens, as
  Gemma 3 1B) and one full-attention layer, bidirectional attention among an image's tokens.
- ``"qwen3_vl"``: patch 16, 2x2 merge (32 px per token), 64*64 <= pixels <= 256*256; a 112x84
  image gives 12 tokens (a 448x448 photo 64); DeepStack features of both vision layers added
  after LLM layers 0 and 1; a Qwen3 LLM (per-head query/key norms) with interleaved M-RoPE.
- ``"qwen3_5"``: Qwen3-VL's vision side without DeepStack, and Qwen3.5's hybrid LLM: Gated
  DeltaNet (linear attention) layers and full-attention layers, one full layer in every 4 as on
  the released checkpoints (``linear, linear, linear, full, ...``); with fewer than 4 layers the
  first is full (the default 2 layers are ``full, linear``, so a stage at layer 1 can read
  attention).
- ``"internvl"``: InternVL3's layout: an InternViT tower with a CLS token on 112 px tiles (8x8
  patches of 14 px, pixel-shuffled 2x2 to ``16`` tokens a tile; at 448 px 32x32 to 256, as
  InternVL3), up to 6 tiles of the aspect ratio closest to the image's plus a thumbnail, a Qwen2 LLM;
  a square photo is one tile (16 tokens), a 2:1 photo 2 tiles and the thumbnail (48).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from PIL.Image import Image
    from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

__all__ = ["MODEL_TYPES", "tiny_inputs", "tiny_lvlm"]

ModelType = Literal["llava", "llava_next", "qwen2_5_vl", "llava_onevision", "gemma3", "qwen3_vl", "qwen3_5",
                    "internvl"]
MODEL_TYPES: tuple[str, ...] = ("llava", "llava_next", "qwen2_5_vl", "llava_onevision", "gemma3", "qwen3_vl", "qwen3_5",
                                "internvl")

_PATCH = 14
_DEFAULT_IMAGE_SIZE = {"llava": 84, "llava_next": 42, "qwen2_5_vl": 224, "llava_onevision": 84, "gemma3": 168,
                       "qwen3_vl": 256, "qwen3_5": 256, "internvl": 112}
_QWEN_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")  # dynamic-resolution grids, the Qwen tokenizer and chat template
_QWEN3_VISION = ("qwen3_vl", "qwen3_5")  # 16 px patches, Qwen3VLProcessor
_TEXT_ONLY_ROWS = ("qwen2_5_vl", "llava_onevision", "qwen3_vl", "qwen3_5", "internvl")  # ChatML: rows may lack images

_LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
_ONEVISION_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
_INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
_GEMMA3_SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                    "<end_of_image>", "<image_soft_token>"]
_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# "USER: <image>\n{text} ASSISTANT:" (the llava-1.5-hf template, without generation markers).
_LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ c['text'] + ' ' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def _chatml_template(after_role: str, image: str, video: str) -> str:
    """A ChatML chat template (``<|im_start|>role ... <|im_end|>``) that writes ``image`` and ``video``
    for the media parts of a turn, in order."""
    return (
        "{%- for message in messages -%}"
        f"{{{{ '<|im_start|>' + message['role'] + '{after_role}' }}}}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}"
        "{%- for c in message['content'] -%}"
        f"{{%- if c['type'] == 'image' -%}}{{{{ '{image}' }}}}"
        f"{{%- elif c['type'] == 'video' -%}}{{{{ '{video}' }}}}"
        "{%- elif c['type'] == 'text' -%}{{ c['text'] }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{ '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )


# "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
_QWEN_CHAT_TEMPLATE = _chatml_template("\n", "<|vision_start|><|image_pad|><|vision_end|>",
                                       "<|vision_start|><|video_pad|><|vision_end|>")
# "<|im_start|>user <image>\n{text}<|im_end|>\n<|im_start|>assistant\n" (llava-onevision-qwen2-hf's template,
# without the system turn)
_ONEVISION_CHAT_TEMPLATE = _chatml_template(" ", "<image>\n", "<video>\n")
# "<|im_start|>user\n<IMG_CONTEXT>\n{text}<|im_end|>\n<|im_start|>assistant\n" (InternVL3-hf's template without
# the system turn; the processor expands <IMG_CONTEXT> to <img>, 256 per tile, </img>)
_INTERNVL_CHAT_TEMPLATE = _chatml_template("\n", "<IMG_CONTEXT>\n", "<video>\n")
# "<start_of_turn>user\n<start_of_image>{text}<end_of_turn>\n<start_of_turn>model\n" (gemma-3-it's template
# without the system turn; the tokenizer adds <bos>, the processor expands <start_of_image>)
_GEMMA3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_CHAT_TEMPLATES = {"llava": _LLAVA_CHAT_TEMPLATE, "llava_next": _LLAVA_CHAT_TEMPLATE,
                   "qwen2_5_vl": _QWEN_CHAT_TEMPLATE, "llava_onevision": _ONEVISION_CHAT_TEMPLATE,
                   "gemma3": _GEMMA3_CHAT_TEMPLATE, "qwen3_vl": _QWEN_CHAT_TEMPLATE, "qwen3_5": _QWEN_CHAT_TEMPLATE,
                   "internvl": _INTERNVL_CHAT_TEMPLATE}


def _check_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")


def _tokenizer(model_type: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE with empty merges: 256 byte tokens, then the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    qwen_family = {  # (special tokens, the named ones) of the models with a Qwen2 LLM
        "qwen2_5_vl": (_QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}),
        "llava_onevision": (_ONEVISION_SPECIALS, {"image_token": "<image>", "video_token": "<video>"}),
    }
    qwen_family["qwen3_vl"] = qwen_family["qwen3_5"] = qwen_family["qwen2_5_vl"]
    qwen_family["internvl"] = (_INTERNVL_SPECIALS, {"start_image_token": "<img>", "end_image_token": "</img>",
                                                    "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    if model_type in qwen_family:
        specials, named = qwen_family[model_type]
        tok.add_special_tokens(specials)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                     extra_special_tokens=named)
    elif model_type == "gemma3":
        tok.add_special_tokens(_GEMMA3_SPECIALS)
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                     extra_special_tokens={"image_token": "<image_soft_token>",
                                                           "boi_token": "<start_of_image>",
                                                           "eoi_token": "<end_of_image>"})
    else:
        tok.add_special_tokens(_LLAVA_SPECIALS)
        # Llama tokenizers prepend <s>; do the same.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            extra_special_tokens={"image_token": "<image>"},
        )
    hf.padding_side = "left"
    return hf


def _pinpoints(base: int) -> list[list[int]]:
    """LLaVA-NeXT's 336 px pinpoint set, scaled to a ``base`` px tile ([height, width])."""
    return [[base, 2 * base], [2 * base, base], [2 * base, 2 * base], [3 * base, base], [base, 3 * base]]


def _processor(model_type: str, tok: PreTrainedTokenizerFast, image_size: int) -> ProcessorMixin:
    import transformers
    from transformers.utils import is_torchvision_available

    tv = is_torchvision_available()
    crop = {"height": image_size, "width": image_size}
    if model_type in ("llava", "llava_next"):
        if model_type == "llava":
            cls = transformers.CLIPImageProcessor if tv else transformers.CLIPImageProcessorPil
            ip, processor = cls(size={"shortest_edge": image_size}, crop_size=crop), transformers.LlavaProcessor
        else:
            cls = transformers.LlavaNextImageProcessor if tv else transformers.LlavaNextImageProcessorPil
            ip = cls(size={"shortest_edge": image_size}, crop_size=crop, image_grid_pinpoints=_pinpoints(image_size))
            processor = transformers.LlavaNextProcessor
        return processor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=_LLAVA_CHAT_TEMPLATE,
        )
    if model_type == "internvl":
        cls = transformers.GotOcr2ImageProcessor if tv else transformers.GotOcr2ImageProcessorPil
        ip = cls(size=crop, crop_to_patches=True, min_patches=1, max_patches=12 if image_size >= 448 else 6,
                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        common = dict(image_processor=ip, tokenizer=tok, chat_template=_INTERNVL_CHAT_TEMPLATE,
                      image_seq_length=(image_size // _PATCH // 2) ** 2)
        if tv:
            return transformers.InternVLProcessor(**common, video_processor=transformers.InternVLVideoProcessor())
        from transformers.video_processing_utils import BaseVideoProcessor

        return _image_only_processor_cls("InternVLProcessor")(**common, video_processor=BaseVideoProcessor())
    if model_type == "gemma3":
        cls = transformers.Gemma3ImageProcessor if tv else transformers.Gemma3ImageProcessorPil
        return transformers.Gemma3Processor(image_processor=cls(size=crop), tokenizer=tok,
                                            chat_template=_GEMMA3_CHAT_TEMPLATE,
                                            image_seq_length=_gemma3_tokens_per_side(image_size) ** 2)
    if model_type == "llava_onevision":
        cls = transformers.LlavaOnevisionImageProcessor if tv else transformers.LlavaOnevisionImageProcessorPil
        ip = cls(size=crop, image_grid_pinpoints=_pinpoints(image_size))
        common = dict(image_processor=ip, tokenizer=tok, num_image_tokens=(image_size // _PATCH) ** 2,
                      vision_feature_select_strategy="full", chat_template=_ONEVISION_CHAT_TEMPLATE)
        if tv:
            return transformers.LlavaOnevisionProcessor(
                **common, video_processor=transformers.LlavaOnevisionVideoProcessor(size=crop))
        from transformers.video_processing_utils import BaseVideoProcessor

        return _image_only_processor_cls("LlavaOnevisionProcessor")(**common, video_processor=BaseVideoProcessor())
    cls = transformers.Qwen2VLImageProcessor if tv else transformers.Qwen2VLImageProcessorPil
    if model_type in _QWEN3_VISION:
        ip = cls(patch_size=16, size={"shortest_edge": 4 * 32 * 32, "longest_edge": image_size * image_size})
    else:
        ip = cls(min_pixels=4 * 28 * 28, max_pixels=image_size * image_size)
    name = "Qwen3VLProcessor" if model_type in _QWEN3_VISION else "Qwen2_5_VLProcessor"
    if tv:
        vp = (transformers.Qwen3VLVideoProcessor if model_type in _QWEN3_VISION
              else transformers.Qwen2VLVideoProcessor)()
        return getattr(transformers, name)(
            image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=_QWEN_CHAT_TEMPLATE
        )
    # Without torchvision the processor refuses a video processor of any type it knows:
    # accept a bare BaseVideoProcessor (images only; videos are unsupported here).
    from transformers.video_processing_utils import BaseVideoProcessor

    vp = BaseVideoProcessor()
    vp.merge_size, vp.temporal_patch_size = 2, 2
    return _image_only_processor_cls(name)(
        image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=_QWEN_CHAT_TEMPLATE
    )


@functools.cache
def _image_only_processor_cls(name: str) -> type:
    """The processor class ``name`` of transformers, accepting a bare video processor so that it
    builds without torchvision (its videos come from ``resprune.video`` instead)."""
    import transformers

    base = getattr(transformers, name)

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> type:
        if argument_name == "video_processor":
            return type(argument)
        return base.check_argument_for_proper_class(self, argument_name, argument)

    return type(f"ImageOnly{name}", (base,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                               "__doc__": f"{name} that builds without torchvision."})


def _config(model_type: str, tok: PreTrainedTokenizerFast, image_size: int, attn: str, layers: int = 2,
            vision_layers: int = 2) -> Any:
    import transformers

    ids = tok.convert_tokens_to_ids
    vocab = len(tok)
    text = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    if model_type == "gemma3":
        text_config = transformers.Gemma3TextConfig(
            **text, head_dim=16, sliding_window=512,
            layer_types=[("full_attention" if (i + 1) % 2 == 0 else "sliding_attention") for i in range(layers)],
            pad_token_id=ids("<pad>"), bos_token_id=ids("<bos>"), eos_token_id=ids("<end_of_turn>"))
        vision_config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=vision_layers, num_attention_heads=2,
                                                        image_size=image_size, patch_size=_PATCH)
        cfg = transformers.Gemma3Config(
            text_config=text_config, vision_config=vision_config,
            mm_tokens_per_image=_gemma3_tokens_per_side(image_size) ** 2, image_token_id=ids("<image_soft_token>"),
            boi_token_id=ids("<start_of_image>"), eoi_token_id=ids("<end_of_image>"))
    elif model_type == "qwen2_5_vl":
        text_config = transformers.Qwen2_5_VLTextConfig(
            **text,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        )
        vision_config = transformers.Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=text_config,
            vision_config=vision_config,
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
    elif model_type == "qwen3_vl":
        text_config = transformers.Qwen3VLTextConfig(
            **text, head_dim=16, bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                             "mrope_interleaved": True})
        vision_config = transformers.Qwen3VLVisionConfig(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        cfg = transformers.Qwen3VLConfig(
            text_config=text_config, vision_config=vision_config, image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"))
    elif model_type == "qwen3_5":
        if layers >= 4:  # as the released checkpoints: every 4th layer is full attention
            kinds = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
        else:  # the first, so a stage at layer 1 can read its attention (the strategy conformance suites)
            kinds = ["full_attention"] + ["linear_attention"] * (layers - 1)
        text_config = transformers.Qwen3_5TextConfig(
            **text, head_dim=16, bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            layer_types=kinds,
            linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, partial_rotary_factor=0.5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True, "partial_rotary_factor": 0.5})
        vision_config = transformers.Qwen3_5VisionConfig(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
        cfg = transformers.Qwen3_5Config(
            text_config=text_config, vision_config=vision_config, image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"))
    elif model_type == "internvl":
        text_config = transformers.Qwen2Config(**text, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                                               pad_token_id=ids("<|endoftext|>"))
        vision_config = transformers.InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
            image_size=[image_size, image_size], patch_size=[_PATCH, _PATCH])
        cfg = transformers.InternVLConfig(
            vision_config=vision_config, text_config=text_config, image_token_id=ids("<IMG_CONTEXT>"),
            image_seq_length=(image_size // _PATCH // 2) ** 2, downsample_ratio=0.5, vision_feature_layer=-1,
            vision_feature_select_strategy="default")
    elif model_type == "llava_onevision":
        text_config = transformers.Qwen2Config(**text, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                                               pad_token_id=ids("<|endoftext|>"))
        vision_config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=vision_layers, num_attention_heads=2,
                                                        image_size=image_size, patch_size=_PATCH)
        vision_config.resprune_tiny = True  # siglip_head: auto uses the tiny tower's own (random) pooling head
        cfg = transformers.LlavaOnevisionConfig(
            vision_config=vision_config, text_config=text_config, image_token_index=ids("<image>"),
            video_token_index=ids("<video>"), vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=_pinpoints(image_size))
    else:
        text_config = transformers.LlamaConfig(
            **text, bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>")
        )
        vision_config = transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=_PATCH,
            projection_dim=32,
        )
        vision_config.resprune_tiny = True  # clip_model: auto pairs it with a tiny CLIP text tower
        common = dict(
            vision_config=vision_config,
            text_config=text_config,
            image_token_id=ids("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        if model_type == "llava":
            cfg = transformers.LlavaConfig(**common, image_seq_length=(image_size // _PATCH) ** 2)
        else:
            cfg = transformers.LlavaNextConfig(**common, image_grid_pinpoints=_pinpoints(image_size))
    cfg._attn_implementation = attn
    return cfg


def _gemma3_tokens_per_side(image_size: int) -> int:
    """Gemma 3 pools its SigLIP patches to ``mm_tokens_per_image``: 4x4 from 64x64 at 896 px (256
    tokens); the tiny default pools 2x2 (12x12 patches at 168 px: 36 tokens)."""
    patches = image_size // _PATCH
    return patches // 4 if patches >= 64 and patches % 4 == 0 else patches // 2


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG and build in float32 without touching the caller's state."""
    import torch

    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


def tiny_lvlm(
    model_type: str,
    seed: int = 0,
    *,
    attn_implementation: str = "sdpa",
    image_size: int | None = None,
    text_layers: int = 2,
    vision_layers: int = 2,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny randomly initialised LVLM and an offline processor (no download).

    model_type: ``"llava"`` (LlavaForConditionalGeneration, CLIP tower), ``"llava_next"``
    (LlavaNextForConditionalGeneration), ``"qwen2_5_vl"`` (Qwen2_5_VLForConditionalGeneration),
    ``"llava_onevision"`` (LlavaOnevisionForConditionalGeneration, SigLIP tower, Qwen2 LLM), ``"gemma3"``
    (Gemma3ForConditionalGeneration, SigLIP tower, Gemma 3 LLM), ``"qwen3_vl"``
    (Qwen3VLForConditionalGeneration, DeepStack), ``"qwen3_5"`` (Qwen3_5ForConditionalGeneration,
    hybrid LLM), ``"internvl"`` (InternVLForConditionalGeneration, InternViT tower, Qwen2 LLM).
    Same ``seed`` -> bit-identical weights; the caller's RNG state is left untouched. The model
    is float32, on CPU, in eval mode, with ``attn_implementation`` for all sub-models.
    ``image_size``: LLaVA input side (multiple of 14, default 84), LLaVA-NeXT base tile side
    (multiple of 14, default 42), Qwen2.5-VL side of the max-pixels square (default 224; Qwen3-VL
    and Qwen3.5: 256), Gemma 3 input side (168), InternVL3 tile side (even multiple of 14, 112).
    ``text_layers``: decoder layers of the language model (in-LLM stages act on layers
    ``1..text_layers-1``; the shipped configs use layers up to 24). ``vision_layers``: encoder
    layers of the CLIP tower of the LLaVA models (features from the second-to-last; stages
    inside the tower act at ``vision_layer`` 0..vision_layers-1).
    """
    import torch
    import transformers

    _check_type(model_type)
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', not {attn_implementation!r}")
    size = _DEFAULT_IMAGE_SIZE[model_type] if image_size is None else int(image_size)
    if model_type in _QWEN_TYPES:
        if size < 4 * _PATCH:
            raise ValueError(f"image_size must be >= 56 for {model_type}, got {size}")
    elif size < _PATCH or size % _PATCH:
        raise ValueError(f"image_size must be a positive multiple of {_PATCH} for {model_type}, got {size}")
    elif model_type in ("gemma3", "internvl") and (size // _PATCH) % 2:
        raise ValueError(f"image_size must be an even multiple of {_PATCH} for {model_type} (its patches pool 2x2), "
                         f"got {size}")

    tok = _tokenizer(model_type)
    tok.chat_template = _CHAT_TEMPLATES[model_type]
    processor = _processor(model_type, tok, size)
    if isinstance(text_layers, bool) or not isinstance(text_layers, int) or text_layers < 1:
        raise ValueError(f"text_layers must be an int >= 1, got {text_layers!r}")
    if isinstance(vision_layers, bool) or not isinstance(vision_layers, int) or vision_layers < 2:
        raise ValueError(f"vision_layers must be an int >= 2 (LLaVA reads the second-to-last), got {vision_layers!r}")
    if model_type in _QWEN_TYPES and vision_layers != 2:
        raise ValueError(f"vision_layers sets the CLIP tower of the LLaVA models; the tiny {model_type} has its own")
    config = _config(model_type, tok, size, attn_implementation, text_layers, vision_layers)
    cls = {
        "llava": transformers.LlavaForConditionalGeneration,
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
        "gemma3": transformers.Gemma3ForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen3_5": transformers.Qwen3_5ForConditionalGeneration,
        "internvl": transformers.InternVLForConditionalGeneration,
    }[model_type]
    with _seeded(seed):
        model = cls(config)
        if model_type == "gemma3":  # Gemma 3 initialises its projection to zeros: every image would be 0
            weight = model.model.multi_modal_projector.mm_input_projection_weight
            with torch.no_grad():
                weight.normal_(std=config.get_text_config().initializer_range)
    model = model.to(device="cpu", dtype=torch.float32).eval()

    text_cfg = config.get_text_config()
    gen = model.generation_config
    gen.pad_token_id = text_cfg.pad_token_id
    gen.bos_token_id = text_cfg.bos_token_id
    gen.eos_token_id = (
        [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
        if model_type in _TEXT_ONLY_ROWS
        else [tok.convert_tokens_to_ids("<end_of_turn>"), tok.convert_tokens_to_ids("<eos>")]
        if model_type == "gemma3"
        else text_cfg.eos_token_id
    )
    gen.do_sample = False
    return model, processor


def tiny_inputs(
    model_type: str,
    processor: ProcessorMixin,
    images: Sequence[Image | None],
    prompts: Sequence[str],
) -> BatchFeature:
    """Chat-templated, left-padded batch: one image per prompt (``None``: text-only row, Qwen only)."""
    _check_type(model_type)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    texts: list[str] = []
    for image, prompt in zip(images, prompts):
        content: list[dict[str, str]] = [{"type": "text", "text": prompt}]
        if image is not None:
            content.insert(0, {"type": "image"})
        elif model_type not in _TEXT_ONLY_ROWS:
            raise ValueError(f"text-only rows (image None) are only supported for {', '.join(_TEXT_ONLY_ROWS)}, "
                             f"not {model_type}")
        messages = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    from .prompts import per_prompt_images

    present = [image for image in images if image is not None]
    counts = [int(image is not None) for image in images]
    return processor(images=per_prompt_images(processor, present, counts), text=texts, padding=True,
                     return_tensors="pt")
