"""What the UNet is conditioned on in training equals what the saved pipeline gives it at inference, for the same
input: the low-res image of a super-resolution model (range, resize) and the caption of a text model (tokens,
padding, hidden states, no attention mask). Either side can change alone and every other test still pass: the model
then trains on one input and is sampled with another. Tiny untrained models; the training side is read off the
conditioning's `model_output` with a recording model, the inference side off the pipeline's own UNet call."""

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from helpers import tiny_config, tiny_unet, tiny_vae
from PIL import Image
from transformers import CLIPTokenizer

from ldm.data import build_datasets, collate
from ldm.eval import editing
from ldm.eval.editing import holdout_tensors
from ldm.text_encoder import PromptTokenizer
from ldm.train import latent_cache, prompt_cache
from ldm.train.superres import SuperResConditioning
from ldm.train.text_conditioning import TextConditioning

LATENT = 4  # latent channels of tiny_vae
# The long caption is cut at the tokenizer's 8 tokens on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::ldm.text_encoder.CaptionTruncationWarning")


class RecordingUNet:
    """Stands in for the UNet in `model_output`: records its input, predicts zeros of the latents' shape."""

    def __init__(self):
        self.inputs = []

    def __call__(self, sample, timestep, *args, **kwargs):
        self.inputs.append((sample, args, kwargs))
        return SimpleNamespace(sample=torch.zeros_like(sample[:, :LATENT]))


# ----- super-resolution: the low-res conditioning -----


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Ten 32x32 RGB images with smooth and sharp parts (a bicubic resize of noise alone is near its mean)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 32)
    for i in range(10):
        image = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (32, 1)), np.full((32, 32), 25.0 * i)], -1)
        image[8:20, 4 + i:16 + i] = rng.integers(0, 256, (12, 12, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def superres_setup(tmp_path, folder, factor: int):
    cfg = tiny_config(tmp_path / "run", **{"data.source": "folder", "data.path": str(folder), "data.color_mode": "rgb",
                                           "data.degrade.factor": factor, "denoiser.task": "superres"})
    train, holdout, info = build_datasets(cfg.data, low_res=True)
    torch.manual_seed(0)
    vae = tiny_vae()
    conditioning = SuperResConditioning(cfg, train)
    pipe = conditioning.make_pipeline(tiny_unet(in_channels=LATENT + 3), vae, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return cfg, vae, conditioning, pipe, train, holdout, info


@contextlib.contextmanager
def unet_conditions(pipe):
    """Collects the low-res channels of the UNet's input at every step of the pipeline's runs inside the block."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, LATENT:].clone()))
    try:
        yield seen
    finally:
        hook.remove()


def pipeline_condition(pipe, image) -> torch.Tensor:
    """The low-res channels of the UNet's input at the pipeline's first step."""
    with unet_conditions(pipe) as seen:
        pipe(image=image, num_inference_steps=1, output_type="pt", generator=torch.Generator().manual_seed(0))
    return seen[0]


def training_condition(conditioning, batch: dict, latent_size=(8, 8), train: bool = True) -> torch.Tensor:
    unet = RecordingUNet()
    n = len(batch["label"])
    noisy = torch.zeros(n, LATENT, *latent_size)
    conditioning.model_output(unet, noisy, torch.zeros(n, dtype=torch.long), batch, train=train)
    return unet.inputs[0][0][:, LATENT:]


def source_of(row: dict, folder) -> Image.Image:
    """The source file of a training row: the one whose 16 px resize is the row's image."""
    sources = [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.png"))]
    full = ((row["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    errors = [np.abs(np.asarray(s.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float64) - full).max()
              for s in sources]
    first, second = sorted(errors)[:2]
    assert first < 1 < second  # exactly one source matches
    return sources[int(np.argmin(errors))]


@pytest.mark.parametrize("factor", [2, 4])  # low-res 8 px (the latent grid itself) and 4 px (bicubic to the grid)
def test_superres_pipeline_conditions_on_what_training_conditioned_on(tmp_path, photo_folder, factor, monkeypatch):
    cfg, vae, conditioning, pipe, train, holdout, info = superres_setup(tmp_path, photo_folder, factor)
    low_size = 16 // factor
    assert pipe.config.low_res_size == low_size

    # 1. A user's low-res file: the source image shrunk to the model's low-res size (PIL bicubic), given as PIL.
    rows = [train[i] for i in range(3)]
    trained = training_condition(conditioning, collate(rows))
    users = [source_of(row, photo_folder).resize((low_size, low_size), Image.Resampling.BICUBIC) for row in rows]
    sampled = pipeline_condition(pipe, users)
    assert sampled.shape == trained.shape == (3, 3, 8, 8)
    assert trained.min() < -0.5 and trained.max() > 0.5  # [-1, 1], not [0, 1]
    torch.testing.assert_close(sampled, trained, rtol=0, atol=1e-5)

    # 2. The latent cache (training's default): the stored low-res image, as the step reads it.
    with torch.no_grad():
        cache = latent_cache.build_or_load(vae, cfg.data, info, tmp_path / "cache", batch_size=4, cpu=True,
                                           low_res=True)
    cached = latent_cache.choose_orientation(latent_cache.collate([cache[i] for i in range(3)]))
    torch.testing.assert_close(training_condition(conditioning, cached), trained, rtol=0, atol=0)

    # 3. Evaluation (`ldm eval --task superres`): the held-out low-res images, through evaluate_superres.
    images, low_res = holdout_tensors(holdout, 2)
    monkeypatch.setattr(editing, "_scores", lambda *args, **kwargs: {})  # the run, not the metrics
    with unet_conditions(pipe) as seen:
        editing.evaluate_superres(pipe, None, {}, images, low_res, steps=1, batch_size=2, seed=0, device="cpu")
    held = training_condition(conditioning, collate([holdout[i] for i in range(len(low_res))]))
    torch.testing.assert_close(seen[0], held, rtol=0, atol=1e-6)

    # 4. The sample grids written while training: the first training images' low-res versions.
    with unet_conditions(pipe) as seen:
        conditioning.sample_grid(pipe, n=6, seed=0, steps=1)
    torch.testing.assert_close(seen[0], trained, rtol=0, atol=1e-6)


# ----- text: the caption's hidden states -----


# Plain, upper case and punctuation, longer than the tokenizer's 8 tokens, empty (the unconditional prompt).
CAPTIONS = ["a handwritten digit 3", "A RED Car, on the road!", "a digit 7 on a red car on the road by a digit 3", ""]
SHORT = ["a handwritten digit 3", ""]  # no caption fills the 8 tokens: padding to the maximum shows


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    from ldm.tokenizer import build_clip_tokenizer

    corpus = [f"a handwritten digit {d}" for d in "0123456789"] + ["a red car on the road", "a digit by a car"]
    return build_clip_tokenizer(corpus, vocab_size=1024, max_length=8, directory=tmp_path_factory.mktemp("tok"))


def text_conditioning(tokenizer: CLIPTokenizer, cond_dropout: float, **frozen) -> TextConditioning:
    return TextConditioning(tokenizer=PromptTokenizer(tokenizer), cond_dropout=cond_dropout, guidance_scale=2.0,
                            prompts=CAPTIONS[:1], prompt_labels=None, **frozen)


def record_text_encoder(encoder) -> list:
    """(input_ids, attention_mask) of every call of the text encoder."""
    calls = []

    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        calls.append((ids.clone(), kwargs.get("attention_mask")))

    encoder.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def saved_pipeline(conditioning, model, vae, path) -> StableDiffusionPipeline:
    """The text model as training saves it, loaded back as a user loads it: a stock StableDiffusionPipeline."""
    from ldm.pipelines.text_to_image import save_text_pipeline

    save_text_pipeline(conditioning.make_pipeline(model, vae, DDIMScheduler(clip_sample=False)), path)
    pipe = StableDiffusionPipeline.from_pretrained(path)
    return pipe


def encode_prompt(pipe: StableDiffusionPipeline, captions: list[str]):
    """(prompt embeds, negative prompt embeds, encoder calls) of Stable Diffusion's own prompt encoding."""
    calls = record_text_encoder(pipe.text_encoder)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=True)
    return embeds, negative, calls


@pytest.mark.parametrize("captions", [CAPTIONS, SHORT], ids=["with-a-long-caption", "short-captions"])
def test_text_conditioning_of_training_is_stable_diffusions_encode_prompt(tmp_path, clip_tokenizer, captions):
    """The from-scratch encoder, trained with the UNet: the states the UNet cross-attends to in training are the
    states `encode_prompt` of the saved folder gives, for plain, padded, truncated and empty captions."""
    cfg = tiny_config(tmp_path / "run")  # its denoiser.model and denoiser.text_model
    torch.manual_seed(0)
    vae = tiny_vae()
    conditioning = text_conditioning(clip_tokenizer, cond_dropout=0.0)
    model = conditioning.build_model(cfg, vae).eval()
    states, encoder_calls = [], record_text_encoder(model.text_encoder)
    model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: states.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    noisy, timesteps = torch.zeros(len(captions), LATENT, 8, 8), torch.zeros(len(captions), dtype=torch.long)
    with torch.no_grad():
        conditioning.model_output(model, noisy, timesteps, {"caption": captions}, train=True)
        text_conditioning(clip_tokenizer, cond_dropout=1.0).model_output(  # condition dropout: every caption ""
            model, noisy, timesteps, {"caption": captions}, train=True)

    pipe = saved_pipeline(conditioning, model, vae, tmp_path / "pipeline")
    embeds, negative, pipe_calls = encode_prompt(pipe, captions)
    # Tokens: the same ids, padded with the end token to the tokenizer's maximum (8), a long caption cut; no mask.
    (train_ids, train_mask), (pipe_ids, pipe_mask) = encoder_calls[0], pipe_calls[0]
    assert train_ids.shape == (len(captions), 8) and torch.equal(train_ids, pipe_ids)
    assert train_mask is None and pipe_mask is None
    end = clip_tokenizer.eos_token_id
    assert train_ids[0, -1] == end and train_ids[-1, 2:].eq(end).all()  # padded; "" is [start, end, end, ...]
    # Hidden states: the last hidden state of the same encoder, for the captions and for the unconditional branch.
    torch.testing.assert_close(states[0], embeds)
    torch.testing.assert_close(states[1], negative)


@pytest.mark.parametrize("captions", [CAPTIONS, SHORT], ids=["with-a-long-caption", "short-captions"])
def test_frozen_encoders_cached_embeddings_are_stable_diffusions_encode_prompt(tmp_path, clip_tokenizer, captions):
    """A frozen pretrained encoder: the prompt cache that training reads holds what `encode_prompt` gives."""
    from ldm.config import TextModelConfig
    from ldm.models import build_text_unet
    from ldm.text_encoder import build_text_encoder

    cfg = tiny_config(tmp_path / "run")  # its denoiser.model
    torch.manual_seed(0)
    vae = tiny_vae()
    encoder = build_text_encoder(TextModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                 clip_tokenizer).requires_grad_(False).eval()
    tokenizer = PromptTokenizer(clip_tokenizer)
    cache_calls = record_text_encoder(encoder)
    embeddings = prompt_cache.build_or_load(encoder, tokenizer, captions, tmp_path / "cache", cpu=True)
    conditioning = text_conditioning(clip_tokenizer, cond_dropout=0.0, frozen_encoder=encoder, embeddings=embeddings)
    unet = RecordingUNet()
    conditioning.model_output(unet, torch.zeros(len(captions), LATENT, 8, 8), torch.zeros(len(captions)),
                              {"caption": captions}, train=True)
    trained = unet.inputs[0][2]["encoder_hidden_states"]

    pipe = saved_pipeline(conditioning, build_text_unet(cfg.denoiser.model, vae, 32), vae, tmp_path / "pipeline")
    embeds, negative, pipe_calls = encode_prompt(pipe, captions)
    assert all(mask is None for _, mask in cache_calls + pipe_calls)
    torch.testing.assert_close(trained, embeds)
    torch.testing.assert_close(embeddings([""] * len(captions)), negative)  # what condition dropout trains on
