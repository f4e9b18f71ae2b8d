"""The real-model LexVLA recipe at its real module layouts, tiny and random: a saved
``Dinov2Model`` folder kept frozen, a Llama-family LM with PEFT LoRA on q/v (its LM head the
frozen text codebook), webdataset shards as CC3M comes, and a run that resumes from its
checkpoint; plus the language model read out of a llava-hf folder."""

from __future__ import annotations

import torch
from helpers.jsonl import read_jsonl
from helpers.lexvla import word_tokenizer
from transformers import Dinov2Config, Dinov2Model

from sae_training.lexvla.config import LexVLAConfig, LexVLATrainConfig
from sae_training.lexvla.model import LexVLA, load_text_model
from sae_training.lexvla.train import MODEL_DIR, train


def dinov2_folder(path):
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, mlp_ratio=2)).save_pretrained(path)
    return path


def test_frozen_dinov2_folder_lora_llama_and_webdataset_shards(tmp_path):
    from peft import PeftModel

    from eval_suites.toyworld.export import export_training_pairs
    from eval_suites.toyworld.language import vocabulary
    from vlsae_hooks.testing import tiny_llava

    llava = tmp_path / "llava"
    tiny_llava(seed=0).save_pretrained(llava)
    text = tmp_path / "llama"
    lm = load_text_model(str(llava))  # the llava-hf folder's language model, by its weights
    assert type(lm).__name__ == "LlamaForCausalLM"
    tokenizer = word_tokenizer(vocabulary())
    lm.resize_token_embeddings(len(tokenizer))
    lm.save_pretrained(text)
    tokenizer.save_pretrained(text)
    export_training_pairs(tmp_path / "shards", seed=0, n_pairs=16)
    assert any((tmp_path / "shards").glob("*.tar"))

    model = LexVLAConfig(text_model=str(text), backbone=str(dinov2_folder(tmp_path / "dino")),
                         freeze_backbone=True, prompt="{caption} the image shows a",
                         vocabulary=["red", "blue", "star", "ring"], phrases=["red star"],
                         image_size=32, adapter_heads=2, adapter_hidden=32, lora_r=4,
                         lora_alpha=8)

    config = LexVLATrainConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "run"),
                               model=model, steps=4, batch_size=8, warmup_steps=1,
                               checkpoint_every=2, log_every=1, lr=1e-2, lora_lr=1e-2,
                               presence_weight=1.0, shuffle_buffer=8)

    built = LexVLA.build(model)
    assert isinstance(built.text_lm, PeftModel)
    assert not any(p.requires_grad for p in built.space.backbone.parameters())
    train(config)
    train(config)  # run again: it resumes from the step-4 checkpoint and only saves
    log = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    trained = LexVLA.from_pretrained(tmp_path / "run" / MODEL_DIR)
    original = Dinov2Model.from_pretrained(tmp_path / "dino")
    for name, weight in original.state_dict().items():  # DINOv2 stayed frozen
        assert torch.equal(trained.space.backbone.state_dict()[name], weight), name
    lora = [n for n, _ in trained.text_lm.named_parameters() if "lora_" in n]
    assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
    head = trained.text_lm.get_output_embeddings().weight
    ids = trained.word_ids
    assert torch.equal(trained.space.text_codebook[:len(ids)], head[ids].float())
