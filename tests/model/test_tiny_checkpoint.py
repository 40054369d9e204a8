"""The tiny Hugging Face checkpoint and the tiny model: special-token ids come from the word tokenizer."""

import torch
from transformers import AutoTokenizer, LlavaNextForConditionalGeneration

from avglab.core.builders import tiny_llava
from avglab.core.tiny_checkpoint import main
from avglab.data.tokenizer import EOS, build_word_tokenizer


def test_written_checkpoint_stops_generation_on_the_tokenizers_eos(tmp_path):
    main([str(tmp_path / "ckpt"), "--seed", "1"])
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    eos = tokenizer.convert_tokens_to_ids(EOS)
    assert tokenizer.eos_token_id == eos != tokenizer.unk_token_id
    # LlamaConfig's defaults (bos 1, eos 2) are <unk> and <s> here: generate() would stop on <s>.
    assert model.config.text_config.eos_token_id == model.generation_config.eos_token_id == eos
    assert model.config.text_config.bos_token_id == model.generation_config.bos_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_tiny_model_defaults_are_the_word_tokenizers_ids(tmp_path):
    tokenizer = build_word_tokenizer(["what color is it", "red"], tmp_path)
    model = tiny_llava(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    text = model.config.text_config
    ids = (text.pad_token_id, text.bos_token_id, text.eos_token_id)
    assert ids == (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_the_llm_init_range_is_a_model_setting(tmp_path):
    from omegaconf import OmegaConf

    from avglab.training.build import build_llava

    tokenizer = build_word_tokenizer(["what color is it", "red"], tmp_path)
    model_cfg = OmegaConf.load("conf/model/tiny.yaml")
    stds = {}
    for std in (0.02, 0.1):
        model_cfg.text_init_range = std
        llava = build_llava(OmegaConf.create({"model": model_cfg, "seed": 0}), tokenizer)
        lm = llava.model.language_model
        stds[std] = (
            lm.layers[0].self_attn.q_proj.weight.std().item(),
            lm.embed_tokens.weight.std().item(),
            next(llava.model.vision_tower.parameters()).detach().clone(),
        )
    for std, (q, embed, _) in stds.items():
        assert abs(q / std - 1) < 0.1 and abs(embed / std - 1) < 0.1
    assert torch.equal(stds[0.02][2], stds[0.1][2])  # the vision tower keeps its own init
