"""Tiny random-weight models built locally from configs (no hub access), saved with
``save_pretrained`` so tests load them through exactly the path users' model dirs take."""

from __future__ import annotations

import json
from pathlib import Path


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode alphabet (256 printable stand-ins for the 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(out: Path) -> int:
    """A character-level CLIP BPE tokenizer (vocab.json + merges.txt); returns its vocab size."""
    out.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for ch in _byte_chars():
        tokens += [ch, ch + "</w>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    tok.save_pretrained(out)
    return len(tokens)


def build_tiny_sd(out: Path) -> Path:
    """A ~1 MB Stable Diffusion pipeline (VAE downscale 2) saved under ``out``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tok_dir = out.parent / f"{out.name}-tokenizer"
    vocab = write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=77,
    ))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def build_tiny_blip(out: Path) -> Path:
    """A tiny random-weight BLIP captioning model + processor (BERT word-piece vocab built here)."""
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog",
             "red", "blue", "the", "is", "on", "mat", "what", "this", "?", "."]
    words += [chr(c) for c in range(ord("a"), ord("z") + 1) if chr(c) not in words]
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(str(vocab), bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, encoder_hidden_size=32,
                         bos_token_id=words.index("[DEC]"), pad_token_id=0, sep_token_id=3,
                         eos_token_id=3),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
