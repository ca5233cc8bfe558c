"""A tiny SDXL-structured pipeline from configs with random weights, for tests and examples.

Same structure as SDXL (the shapes of diffusers' own SDXL test components, a level deeper):
a U-Net with three levels, so that ``down.2.1``, ``mid.0`` and ``up.0.0``-``up.0.2`` exist
(``down_blocks[2].attentions[1]`` …), a tiny VAE, two tiny CLIP text encoders (the second with
a projection, whose pooled output conditions the U-Net) and a CLIP tokenizer built offline
from a vocabulary and merges written here (``model_max_length=77``). Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

# Words the tiny tokenizer merges whole (everything else falls back to byte tokens).
_WORDS = (
    "a photo of the cat dog car house tree red blue green on in with and painting city "
    "street night day sky sea mountain portrait woman man"
).split()
VOCAB_SIZE = 1000  # text encoders' embedding rows; the tokenizer uses fewer ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary (bytes, bytes + ``</w>``, merged words, the two specials) and its
    merges, merging each word of ``_WORDS`` left to right."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            rule = (merged, part)
            merged += part
            if rule not in merges:
                merges.append(rule)
                if merged not in vocab_list:
                    vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab_list)}, merges


def tiny_tokenizer() -> Any:
    """A ``CLIPTokenizer`` over :func:`tiny_vocab_and_merges` (77 tokens, padded with EOS)."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_components(
    size: int = 32,
    unet_channels: tuple[int, ...] = (8, 16, 32),
    text_width: int = 16,
    text_layers: int = 2,
    timestep_spacing: str = "trailing",
) -> dict[str, Any]:
    """The components of a tiny :class:`~diffusers.StableDiffusionXLPipeline` with random
    weights from the torch RNG (seed it first). ``size``: the image size it is meant for
    (the VAE downsamples by 2, the U-Net by 4 more)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    levels = len(unet_channels)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(unet_channels),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=tuple(max(1, c // 8) for c in unet_channels),
        transformer_layers_per_block=tuple(range(1, levels + 1)),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_width,
        cross_attention_dim=2 * text_width,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=size,
    )
    text_config = CLIPTextConfig(
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=VOCAB_SIZE - 1,
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_attention_heads=2,
        num_hidden_layers=text_layers,
        max_position_embeddings=77,
        vocab_size=VOCAB_SIZE,
        projection_dim=text_width,
        hidden_act="gelu",
    )
    tokenizer = tiny_tokenizer()
    # the specials' ids as the tokenizer has them (the config's are only defaults)
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = text_config.pad_token_id = tokenizer.eos_token_id
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing=timestep_spacing,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": CLIPTextModel(text_config),
        "text_encoder_2": CLIPTextModelWithProjection(text_config),
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_tokenizer(),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def build_tiny_pipeline(seed: int = 0, **kwargs: Any) -> Any:
    """A tiny :class:`~diffusers.StableDiffusionXLPipeline` (see :func:`tiny_components`),
    in eval mode on the CPU; the same ``seed`` builds the same weights, and the global RNG
    state is left as it was."""
    from diffusers import StableDiffusionXLPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = tiny_components(**kwargs)
    pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    return pipe
