"""Tiny random-weight models at the real module layouts, for tests, benchmarks and examples.

Every Linear is 64 or 128 wide so that bitsandbytes 4-bit runs on CPU. Nothing is downloaded.
``DispatchCount`` counts what a forward launches and reads back, the costs a GPU would see,
measured on a CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PreTrainedModel

VOCAB = 128
IMAGE_TOKEN = 127
BOS, EOS, PAD = 1, 2, 0


def tiny_llava(seed: int = 0, n_layers: int = 4, d: int = 64) -> PreTrainedModel:
    """LLaVA-1.5 layout: CLIP tower (32 px, patch 8 -> 16 image tokens) + MLP projector + Llama."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=_llama_config(n_layers, d),
        image_token_index=IMAGE_TOKEN, image_seq_length=16, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return _finish(LlavaForConditionalGeneration(config))


def tiny_llava_next(seed: int = 0, n_layers: int = 4, d: int = 64) -> PreTrainedModel:
    """LLaVA-NeXT layout (any-resolution tiles + ``image_newline``)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=_llama_config(n_layers, d), image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[32, 64], [64, 32]], vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return _finish(LlavaNextForConditionalGeneration(config))


def tiny_qwen2_5_vl(seed: int = 0, n_layers: int = 4, d: int = 64) -> PreTrainedModel:
    """Qwen2.5-VL layout (window-attention ViT + patch merger, multimodal rope)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                           out_hidden_size=d, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1]),
        text_config=dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                         max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[2, 3, 3])),
        image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN - 1,
        vision_start_token_id=IMAGE_TOKEN - 2, vision_end_token_id=IMAGE_TOKEN - 3)
    return _finish(Qwen2_5_VLForConditionalGeneration(config))


def tiny_clip(seed: int = 0):
    """A ``CLIPModel`` with 64-wide towers and 64-d projections."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD),
        projection_dim=64)
    return CLIPModel(config).eval()


CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ {'system': '', 'user': 'USER: '}.get(message['role'], 'ASSISTANT: ') }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ image_marks }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ ' </s> ' if message['role'] == 'assistant' else ' ' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")
"""The tiny processors' chat template, LLaVA-1.5's layout (``USER: <image>\ntext ASSISTANT:``,
a system turn's text first, as ``llava_v1`` writes it); ``image_marks`` is each family's image
placeholder."""
QWEN_IMAGE_MARKS = {IMAGE_TOKEN - 2: "<|vision_start|>", IMAGE_TOKEN: "<|image_pad|>",
                    IMAGE_TOKEN - 3: "<|vision_end|>"}
"""Where ``tiny_qwen2_5_vl``'s config puts the image's tokens, by id, as Qwen2.5-VL names them."""
QWEN_VIDEO_TOKEN = {IMAGE_TOKEN - 1: "<|video_pad|>"}
"""The config's video token: the processor counts it in every text (without it in the vocabulary,
its id would be ``<unk>``'s, and every unknown word a video token)."""


def tiny_processor(model: PreTrainedModel):
    """The processor of a tiny model of this module: 32 px images, a chat template and a
    word-level tokenizer over the 128 ids, its special tokens at the models' ids (``<pad>``
    ``<s>`` ``</s>`` ``USER:`` as in ``llava_prompt``, ``ASSISTANT:``, ``<unk>``, words ``w0``..
    and the image token). LLaVA-NeXT tiles an image at the model's grid pinpoints;
    Qwen2.5-VL scales one to between 32 x 32 and 64 x 64 pixels (8 px patches merged 2 x 2) and
    marks it ``<|vision_start|><|image_pad|><|vision_end|>``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    kind = model.config.model_type
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if kind == "clip":
        return CLIPProcessor(image_processor=images, tokenizer=_tiny_tokenizer({}))
    if kind == "llava":
        return LlavaProcessor(image_processor=images, tokenizer=_tiny_tokenizer({}), patch_size=8,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=_chat("<image>\n"))
    if kind == "llava_next":
        tiles = LlavaNextImageProcessor(size={"shortest_edge": 32},
                                        crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=model.config.image_grid_pinpoints)
        return LlavaNextProcessor(
            image_processor=tiles, tokenizer=_tiny_tokenizer({}), patch_size=8,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            num_additional_image_tokens=1, chat_template=_chat("<image>\n"))
    if kind == "qwen2_5_vl":
        patches = dict(patch_size=8, merge_size=2, temporal_patch_size=2)
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**patches, min_pixels=32 * 32,
                                                  max_pixels=64 * 64),
            video_processor=Qwen2VLVideoProcessor(**patches),
            tokenizer=_tiny_tokenizer(QWEN_IMAGE_MARKS | QWEN_VIDEO_TOKEN,
                                      image_token="<|image_pad|>"),
            chat_template=_chat("".join(QWEN_IMAGE_MARKS.values())))
    raise ValueError(f"no tiny processor for a {kind!r} model")


def _chat(image_marks: str) -> str:
    """``CHAT_TEMPLATE`` with the family's image placeholder in it."""
    return CHAT_TEMPLATE.replace("image_marks", repr(image_marks))


def _tiny_tokenizer(names: dict[int, str], image_token: str = "<image>"):
    """The tiny word-level tokenizer, with ``names`` (id -> special token) in place of words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "USER:", "ASSISTANT:", "<unk>"]
    words += [f"w{i}" for i in range(IMAGE_TOKEN - len(words))] + [image_token]
    for token_id, name in names.items():
        words[token_id] = name
    assert [words.index(t) for t in ("<pad>", "<s>", "</s>", image_token)] == [PAD, BOS, EOS,
                                                                               IMAGE_TOKEN]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    marks = [name for name in names.values() if name != image_token]  # each one token
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", extra_special_tokens={"image_token": image_token, **{
            f"mark_{i}": name for i, name in enumerate(marks)}})


def _llama_config(n_layers: int, d: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                       max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS,
                       pad_token_id=PAD)


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    return model.eval()


def llava_prompt(text_ids: list[int], n_image_tokens: int = 16) -> list[int]:
    """``<s> USER <image>*n text`` as ids, LLaVA style (the image sits inside the prompt)."""
    return [BOS, 3] + [IMAGE_TOKEN] * n_image_tokens + list(text_ids)


def left_pad(rows: list[list[int]]) -> dict[str, Tensor]:
    """Batch prompts of different lengths with left padding, as ``generate`` wants them."""
    if not rows:
        raise ValueError("left_pad needs at least one prompt, got none")
    empty = [i for i, row in enumerate(rows) if not len(row)]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty: every row needs at least one token "
                         "(an empty one would be all padding, hidden by its attention mask)")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def random_space(model: PreTrainedModel, layer: int = 2, n_concepts: int = 256, k: int = 8,
                 seed: int = 1, site: str = "layer_input", aligner: bool = True):
    """An untrained VL-SAE space whose config says it belongs to ``model`` at ``layer``."""
    from vlsae_hooks.spaces import VLSAE, AuxAligner, SpaceConfig, VLSAESpace

    torch.manual_seed(seed)
    d = model.config.get_text_config().hidden_size
    config = SpaceConfig(kind="vlsae", d_model=d, n_concepts=n_concepts, k=k,
                         model_name=model.config._name_or_path or "vlsae-toy/random",
                         model_type=model.config.model_type, site=site, layer=layer,
                         has_aligner=aligner)
    return VLSAESpace(VLSAE(d, n_concepts, k), AuxAligner(d) if aligner else None, config)


def options_of(mode: str, options: dict) -> dict:
    """The entries of ``options`` that ``mode`` takes: one set of settings for a test that runs
    several modes (``attach`` refuses an option of another mode)."""
    from vlsae_hooks.modes import mode_spec

    return {k: v for k, v in options.items() if k in mode_spec(mode).option_names}


SYNCING = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
"""Operations after which the host holds a device value: a value read back (``.item()``,
``bool(tensor)``) and ``nonzero`` (its output's size is read back). Each waits for the device
on a GPU, though not on the CPU."""


class DispatchCount(TorchDispatchMode):
    """Counts the aten operations dispatched while ``running`` (launches, on a GPU), those of
    them that are views (``views``: metadata only, no kernel; how many of these an indexing
    expression dispatches changes with the torch release, as torch 2.6 dispatches a full slice
    that 2.14 skips), and those that read a device value back (``SYNCING``)."""

    def __init__(self, running: bool = True) -> None:
        super().__init__()
        self.running = running
        self.operations = self.views = self.host_reads = 0

    @property
    def kernels(self) -> int:
        """The operations that are not views: about what a GPU launches, and the same count on
        torch 2.6 as on 2.14 (the views are not)."""
        return self.operations - self.views

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.running:
            self.operations += 1
            self.views += func.is_view
            self.host_reads += func in SYNCING
        return func(*args, **(kwargs or {}))
