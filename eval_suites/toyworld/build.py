"""Tokenizer, processors and configs of the tiny toy models, in the real llava-hf / CLIP layouts.

The tokenizer is word-level over the world's closed vocabulary, wrapped in a
``PreTrainedTokenizerFast`` so ``AutoProcessor.from_pretrained`` reloads it like any hub model.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .language import vocabulary
from .world import IMAGE_SIZE

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
# EOS must not be id 2: CLIP then pools at argmax(input_ids) (a legacy rule) instead of at EOS.
SPECIALS = [PAD, BOS, UNK, EOS, IMAGE]
VOCAB_ROWS = 128  # embedding rows: the word list padded to a multiple of 64
PATCH = 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2

# LLaVA-1.5's conversation format: "USER: <image>\n{prompt} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}"
    "{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def build_tokenizer(for_clip: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lowercase, split on whitespace and punctuation, BOS prepended.

    ``for_clip`` appends EOS (CLIP pools its text at EOS) and pads on the right (CLIP's text
    positions start at 0); the LLaVA tokenizer pads on the left for batched generation.
    """
    words = SPECIALS + vocabulary()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}" if for_clip else f"{BOS} $A",
        pair=f"{BOS} $A $B {EOS}" if for_clip else f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    tok.decoder = decoders.WordPiece(cleanup=True)
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right" if for_clip else "left",
        model_max_length=512,
    )


def build_image_processor() -> CLIPImageProcessor:
    """Pixels to [-1, 1] at the world's native size (mean = std = 0.5)."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def build_llava_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    tokenizer = tokenizer or build_tokenizer()
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
        image_token=IMAGE,
    )


def build_clip_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> CLIPProcessor:
    return CLIPProcessor(image_processor=build_image_processor(),
                         tokenizer=tokenizer or build_tokenizer(for_clip=True))


def vision_config() -> CLIPVisionConfig:
    """The tiny CLIP tower: 64x64 images, 8-px patches (64 tokens + CLS), width 128, 4 layers."""
    return CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=128,
    )


def clip_config(tokenizer: PreTrainedTokenizerFast) -> CLIPConfig:
    text = CLIPTextConfig(
        vocab_size=VOCAB_ROWS,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        projection_dim=128,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision_config().to_dict(),
                      projection_dim=128)


def llava_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """Tiny LLaVA-1.5: the CLIP tower above, a 2-layer GELU projector, a 4-layer Llama (d = 256)."""
    text = LlamaConfig(
        vocab_size=VOCAB_ROWS,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=N_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
