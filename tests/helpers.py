"""Shared by the training tests: the tiny config, a clean in-process run of one stage, checkpoint comparison and
the LR a schedule must reach."""

from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from ldm.config import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(output_dir: Path, **overrides):
    return load_config(REPO / "configs/tiny.yaml", {"output_dir": str(output_dir), **overrides})


def run(fn, cfg):
    # Each run builds its own Accelerator; the process-wide state must not leak between runs.
    AcceleratorState._reset_state(reset_partial_state=True)
    return fn(cfg)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every weight file (models, discriminator, EMA) and the optimizer state are bitwise equal."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in names:
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key} differs after resume"
    opt_a = torch.load(a / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(b / "optimizer.bin", weights_only=True)["state"]
    assert opt_a.keys() == opt_b.keys()
    for index in opt_a:
        for key, value in opt_a[index].items():
            assert torch.equal(value, opt_b[index][key]), f"optimizer state {index}.{key} differs after resume"


def reference_lrs(name: str, peak: float, warmup: int, total: int) -> list[float]:
    """The LR after each of `total` optimizer steps of one process without accumulation: what must be logged."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)
    lrs = []
    for _ in range(total):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    return lrs


def tiny_vae(channels: int = 3):
    """A 16 px autoencoder with 8x8x4 latents (the editing tests' models)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=(32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=8, sample_size=16, layers_per_block=1)


def tiny_unet(in_channels: int = 4, num_class_embeds: int | None = None):
    """A UNet over 8x8x4 latents; in_channels 4 + C makes it a super-resolution UNet for C-channel images."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8,
                       layers_per_block=1, num_class_embeds=num_class_embeds)


def saved_tiny_vae(path: Path) -> Path:
    """An untrained, seeded autoencoder of configs/tiny.yaml's shape (16 px grayscale, 8x8x4 latents), saved at
    `path`: the vae_path of stage-2 tests that need no trained autoencoder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16, scaling_factor=0.8)
    vae.save_pretrained(path)
    return path


def trained_tiny_vae(output_dir: Path) -> Path:
    """A 2-step autoencoder of the tiny config, quietly trained (no checkpoints, grids or logs); its model folder."""
    from ldm.train.vae import train_vae

    run(train_vae, tiny_config(output_dir, **{"vae.train.max_steps": 2, "vae.train.checkpointing_steps": 0,
                                              "vae.train.sample_every": 0, "vae.train.report_to": "none"}))
    return output_dir / "vae" / "model"


def tiny_text_models(prompts: list[str], tokenizer_dir: Path):
    """(tokenizer, from-scratch text encoder, 1-channel VAE, cross-attention UNet) of a tiny text model at 16 px."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldm.config import TextModelConfig
    from ldm.text_encoder import build_text_encoder
    from ldm.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(prompts, 1024, 8, tokenizer_dir)
    torch.manual_seed(0)
    encoder = build_text_encoder(TextModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                 tokenizer)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8)
    return tokenizer, encoder, vae, unet
