"""The run configuration's schema: typed dataclasses with one comment per field.

A config file holds both stages of a run (`vae` and `denoiser`) plus the data they share, so that
`train_vae.py --config X` and `train_unet.py --config X` train the two halves of one model. `ldm.config.loading`
maps YAML files and dotted overrides onto these classes (and still reads the second stage's older name, `unet`, from
before the denoiser could be a transformer), `ldm.config.validation` checks what types cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DegradeConfig:
    """How super-resolution training pairs are made from each training image (denoiser.task=superres), after LDM-SR's
    bicubic x4 and the blur + noise of the BSR degradation (Rombach et al. 2022, App. C)."""

    factor: int = 4  # low-res side = data.resolution / factor; bicubic (antialiased) from the source image, so the digits' native 8x8 scans at 32px, factor 4
    blur_sigma: float = 0.0  # training only: Gaussian blur of the low-res image, sigma ~ U[0, blur_sigma] low-res pixels per image (0: off)
    noise_std: float = 0.0  # training only: Gaussian noise added to the low-res image in [-1, 1], std ~ U[0, noise_std] per image (0: off)


@dataclass
class DataConfig:
    source: Literal["digits", "folder", "hub"] = "digits"  # digits: scikit-learn's bundled set; folder: images on disk; hub: datasets.load_dataset
    path: str | None = None  # folder: directory of images (class = sub-folder); hub: data set name or local data directory
    hub_config: str | None = None  # hub: the data set's configuration name, if it has several
    split: str = "train"  # hub: which split to train on
    image_column: str = "image"  # hub: column holding the images
    label_column: str | None = None  # hub: column holding integer class labels (null: unlabelled)
    streaming: bool = False  # hub: iterate without downloading the whole set first
    resolution: int = 32  # images are resized (shorter side) and cropped to resolution x resolution
    crop: Literal["center", "random"] = "center"  # how the square is cut after resizing
    random_flip: bool = False  # flip horizontally with p=0.5. Photographs, faces, scenes and objects want it (twice the data for free); text, digits, UIs and anything with a handedness must not have it. Off by default because a wrong flip silently harms a model while a missing one only forgoes augmentation: every config in configs/ sets it and says why
    color_mode: Literal["rgb", "grayscale"] = "rgb"  # rgb -> 3 channels, grayscale -> 1 channel
    holdout_fraction: float = 0.05  # share of images kept out of training to measure reconstruction quality
    max_samples: int | None = None  # cap on the number of training images (null: all)
    verify_images: bool = True  # decode-check every image (folder, downloaded Hub set) before training, so a broken file fails in seconds
    on_bad_image: Literal["error", "skip"] = "error"  # an image that cannot be decoded: error names it and stops at start-up; skip leaves it out and names it in one warning (streams: as each row arrives)
    num_workers: int = 0  # DataLoader worker processes
    caption_column: str | None = None  # text conditioning: column holding each image's caption (hub; folder: a metadata.jsonl/csv column, default "text")
    caption_template: str | None = None  # text conditioning on labelled data: caption = template.format(name=class name), e.g. "a handwritten digit {name}"
    degrade: DegradeConfig = field(default_factory=DegradeConfig)  # denoiser.task=superres: how each training image's low-res input is made
    seed: int = 0  # decides the train/held-out split and the random crops/flips, the same for both stages, evaluation and the latent cache


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (after gradient accumulation); ignored when max_minutes is set
    max_minutes: float | None = None  # wall-clock budget of the stage: the step count (and the LR schedule) is planned from the time of recent steps and planned again after every step, so the run ends within one step of it with the LR at its final value (null: train max_steps)
    budget_probe_steps: int = 20  # with max_minutes: steps timed (after the first) before the first plan; the step time is the median of the last this many steps
    batch_size: int = 32  # per device; global batch = batch_size x processes x gradient_accumulation_steps
    gradient_accumulation_steps: int = 1  # micro-batches summed before each optimizer step
    learning_rate: float = 1e-4  # peak AdamW learning rate
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "cosine"  # shape of the LR after warm-up (diffusers.optimization.get_scheduler)
    lr_warmup_steps: int = 0  # linear warm-up from 0 to learning_rate
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_weight_decay: float = 0.0  # decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW denominator epsilon
    max_grad_norm: float = 1.0  # gradient clipping by global norm (0 disables)
    max_bad_steps: int = 10  # a step whose loss or gradient is NaN/Inf is skipped (weights, optimizer, EMA untouched); this many in a row stop the run
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast dtype for the forward pass
    seed: int = 0  # seeds this stage's weights, data order and noise (the split and augmentation follow data.seed)
    use_ema: bool = True  # keep an exponential moving average of the weights; it is what gets saved
    ema_decay: float = 0.9999  # EMA decay ceiling: with ema_warmup the decay is 1 - (1 + step)^(-2/3) until it reaches this (0.999 at step ~31,600, 0.9999 at ~1,000,000), so shorter runs average over a window of about step^(2/3) steps whatever the value
    ema_warmup: bool = True  # ramp the EMA decay up from 0 (diffusers' use_ema_warmup), so short runs are not all init
    ema_posthoc: bool = False  # denoiser only: also track EDM2's power-function EMAs (Karras et al. 2024) of widths ema_posthoc_sigma_rels and save snapshots of them into <output_dir>/unet/posthoc_ema/, so that the EMA length is chosen after training (`ldm ema-reconstruct`, `ldm ema-sweep`; docs/guide/training.md). Costs one copy of the weights per width beside the model and the disk printed at start; the saved pipeline still holds the ema_decay EMA
    ema_posthoc_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])  # with ema_posthoc: the relative widths tracked (std of the averaging profile over the run so far / its length; EDM2 tracks 0.05 and 0.10), each in (0, 0.289), distinct at 3 decimals
    ema_posthoc_every: int = 100  # with ema_posthoc: a snapshot of every width each N optimizer steps, and one at the last step
    ema_posthoc_max_snapshots: int = 32  # with ema_posthoc: most snapshot steps kept; when one more would exceed it, every other one is deleted and the interval doubles, so they stay spread over the run (disk, at most: this x widths x 4 bytes x parameters)
    checkpointing_steps: int = 500  # save the full training state every N steps (0 disables)
    checkpoints_total_limit: int | None = 3  # keep only the newest N checkpoints (null: keep all)
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory to continue from
    sample_every: int = 500  # write a sample grid every N steps (0 disables)
    eval_every: int = 0  # every N steps (and at the last) score the EMA weights (denoiser: samples, denoiser.eval_*; VAE: held-out reconstructions, vae.eval_*), keep the best as <stage>/best/ (0 disables)
    num_sample_images: int = 16  # images in each sample grid
    log_every: int = 10  # log loss, LR, grad norm and speed every N steps
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # accelerate tracker
    cpu: bool = False  # train on the CPU even if a GPU is present (multi-process runs then use DDP over gloo); set automatically for multi-process launches on a machine without GPUs
    num_threads: int | None = None  # CPU only: torch threads per process (null: cores / processes on this machine; accelerate launch alone would pin 1)
    allow_tf32: bool = True  # CUDA only: fp32 matmuls and convolutions may use TF32 tensor cores (Ampere+; ~10-bit mantissa products)
    channels_last: bool = True  # CUDA only: keep the trained networks (and the UNet stage's frozen VAE) in NHWC layout, which tensor-core convolutions prefer
    compile: bool = False  # torch.compile the trained networks (accelerate's inductor backend): slow first steps, faster later ones
    gradient_checkpointing: bool = False  # recompute activations during backward (diffusers enable_gradient_checkpointing): less memory, ~30% more compute


@dataclass
class VAEModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])  # one entry per level; downsampling f = 2^(levels-1)
    layers_per_block: int = 2  # ResNet blocks per level
    latent_channels: int = 4  # channels of the latent space
    norm_num_groups: int = 32  # GroupNorm groups (must divide every entry of block_out_channels)


@dataclass
class VAELossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"  # pixel reconstruction loss
    chroma_weight: float = 1.0  # RGB only: weight of the squared error of the chroma (opponent-colour axes) averaged over blocks of vae.loss.chroma_block pixels; without it an L1 autoencoder reconstructs colourful objects on plain backgrounds in gray (docs/colour.md). No effect on grayscale data
    chroma_block: int | None = None  # block size in pixels over which the chroma error is averaged before squaring (null: the autoencoder's downsampling factor, one block per latent pixel); 1 squares every pixel's error, which costs photographs PSNR (docs/colour.md)
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)); small, as in the LDM paper's KL-regularised autoencoders
    perceptual_weight: float = 0.0  # weight of the LPIPS term (LDM: 1.0); needs lpips_weights
    lpips_weights: str | None = None  # safetensors file with the LPIPS VGG16 trunk and linear heads
    disc_weight: float = 0.0  # weight of the patch-GAN generator term (LDM: 0.5; 0 disables the discriminator)
    disc_start: float = 50001  # step at which the discriminator starts (LDM: 50001); below 1: that fraction of the run's steps (of the planned steps under train.max_minutes)
    disc_layers: int = 3  # conv layers of the patch discriminator
    disc_learning_rate: float | None = None  # discriminator LR (null: same as the autoencoder's)
    ssim_weight: float = 0.0  # weight of 1 - SSIM, an offline perceptual term (no weights to download)
    spectral_weight: float = 0.0  # weight of the log-amplitude spectrum distance, an offline texture term


@dataclass
class VAEStageConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling_samples: int = 1024  # training images encoded to measure the latents' std (scaling_factor = 1/std)
    eval_features: str | None = None  # classifier folder (`ldm train-classifier`) for the held-out rFID and recall, at the end and every train.eval_every steps (null: PSNR/SSIM only)
    eval_metric: Literal["psnr", "ssim", "rfid", "recall"] = "psnr"  # held-out metric that picks vae/best/ (rfid, recall: need eval_features)
    pretrained: str | None = None  # a published diffusers AutoencoderKL used as stage 1 instead of training one (Hub id or local folder, safetensors only): train_vae.py checks it on the held-out images, measures its latents and writes vae/model; vae.model is then unused
    pretrained_subfolder: str | None = None  # where the AutoencoderKL lies inside vae.pretrained: "vae" for a full Stable Diffusion repository (null: its root)
    pretrained_revision: str | None = None  # Hub branch, tag or commit of vae.pretrained (null: main); pin a commit for reproducible runs
    finetune: Literal["none", "decoder"] = "none"  # decoder: train the pretrained decoder on this data with vae.loss and vae.train (as sd-vae-ft-mse was made); the encoder stays frozen, so the latents are unchanged
    latent_stats: Literal["measure", "config"] = "measure"  # pretrained: scaling_factor = 1/std and shift_factor = mean measured on the training images (measure), or the publisher's values kept (config); a published scale was measured on other data


@dataclass
class DenoiserModelConfig:
    """The network that denoises latents (docs/guide/transformer.md). A config file may size both backbones
    (configs/tiny.yaml does, so that `--model.type` picks one); a key of the backbone that `type` does not pick, given
    as a command-line override, is refused, since it would change nothing (validation.validate_backbone_overrides)."""

    type: Literal["unet", "dit"] = "unet"  # unet: diffusers' UNet2DModel (UNet2DConditionModel for text); dit: a latent transformer over patches (DiTTransformer2DModel with adaLN-Zero; PixArtTransformer2DModel's cross-attention for text)
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256])  # unet: channels per resolution level
    attention: list[bool] = field(default_factory=lambda: [False, True, True])  # unet: self-attention at each level
    layers_per_block: int = 2  # unet: ResNet blocks per level
    attention_head_dim: int = 32  # unet: channels per attention head
    norm_num_groups: int = 32  # unet: GroupNorm groups
    patch_size: int = 2  # dit: side of the square of latent pixels each token covers; must divide the latent size (tokens = (latent size / patch_size)^2)
    num_layers: int = 12  # dit: transformer blocks (depth); 12 with width 384 and 6 heads is DiT-S (Peebles & Xie 2023, table 1)
    width: int = 384  # dit: channels of every token (hidden size)
    num_attention_heads: int = 6  # dit: attention heads per block; must divide width (each head gets width / heads channels)
    stock_pipeline: bool | None = None  # dit with conditioning class: save the model so that diffusers' own DiTPipeline loads it and draws ldm's images (1000 class embeddings, null class 1000, an autoencoder without shift_factor). null: when the model fits, with a one-line note at save time when it does not; true: required, a model that cannot fit is a ConfigError before training; false: never (class embeddings sized to the data's classes)
    dropout: float = 0.0  # dropout inside ResNet blocks (unet) or transformer blocks (dit)
    sample_size: int | None = None  # latent height/width (null: taken from the VAE; if set, must match it)
    in_channels: int | None = None  # latent channels (null: taken from the VAE; if set, must match it)


@dataclass
class DiffusionConfig:
    """How noise and data are mixed and what the denoiser predicts (ldm.objectives). Keys of one objective are refused
    for the other, and a null key takes its objective's default when the config is loaded (ldm.config.objective)."""

    objective: Literal["ddpm", "flow"] = "ddpm"  # ddpm: DDPM/LDM, x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε, predicts ε (or v); flow: rectified flow as in Stable Diffusion 3, x_σ = (1 − σ)·x + σ·ε, predicts the velocity ε − x and samples with flow-euler/flow-heun (docs/samplers.md)
    num_train_timesteps: int = 1000  # T of the forward process (flow: the network is given t = σ·T)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"  # ddpm: LDM's "linear" is diffusers' scaled_linear
    beta_start: float = 0.0015  # ddpm: LDM's linear_start
    beta_end: float = 0.0195  # ddpm: LDM's linear_end
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # ddpm: what the UNet is trained to predict (null: epsilon); a flow model predicts the velocity and takes none
    snr_gamma: float | None = None  # ddpm: min-SNR loss weighting gamma (Hang et al. 2023; 5.0 is typical; null: off)
    flow_shift: float | None = None  # flow: the resolution shift σ = shift·u / (1 + (shift − 1)·u) of training's σ draw, saved in the sampler's config so that sampling visits the same σ (SD3 uses 3.0 at 1024 px; > 1 spends more steps at high noise; null: 1.0, no shift)
    weighting_scheme: Literal["logit_normal", "uniform"] | None = None  # flow: the density of u in training's σ draw (null: logit_normal, SD3's; uniform: u ~ U(0, 1))
    logit_mean: float | None = None  # flow, logit_normal: u = sigmoid(m + s·n), n ~ N(0, 1); m > 0 trains more at high noise (null: 0.0)
    logit_std: float | None = None  # flow, logit_normal: s of u = sigmoid(m + s·n) (null: 1.0)
    cond_dropout: float = 0.1  # conditional models: share of training examples whose condition is replaced by the null class / empty caption, so classifier-free guidance can sample the unconditional branch (Ho & Salimans 2022)


@dataclass
class TextModelConfig:
    """The CLIPTextModel trained from scratch with the UNet when denoiser.text_encoder is null (CLIP's layout, smaller)."""

    hidden_size: int = 128  # width of the transformer; also the UNet's cross_attention_dim
    num_layers: int = 2  # transformer layers
    num_heads: int = 4  # attention heads (must divide hidden_size)
    intermediate_size: int = 512  # width of each layer's MLP
    max_length: int = 77  # tokens per caption including start/end (CLIP: 77); longer captions are truncated with a warning
    vocab_size: int = 4096  # upper bound of the BPE vocabulary built from the training captions (256 bytes x 2 + merges + 2)


@dataclass
class DenoiserStageConfig:
    """Stage 2, trained by train_unet.py: the denoiser in the VAE's latent space (section `unet` in older configs)."""

    model: DenoiserModelConfig = field(default_factory=DenoiserModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vae_path: str | None = None  # trained VAE directory (null: <output_dir>/vae/model)
    latent_cache: bool = True  # encode the training images once (posterior mean + logvar on disk), not every step
    latent_cache_dir: str | None = None  # where cached latents live, keyed by VAE weights + data (null: <output_dir>/latent_cache)
    sample_scheduler: Literal["ddpm", "ddim", "dpm++", "dpm++sde", "unipc", "euler", "euler-a", "flow-euler", "flow-heun", "lcm"] | None = None  # scheduler of the saved pipeline and of the sample grids (ldm.schedulers); flow-euler and flow-heun sample flow models, lcm the students of `ldm distill` alone, the others DDPM models (null: dpm++sde, the best quality per second on the digits, docs/samplers.md; flow: flow-euler)
    sample_timestep_spacing: Literal["leading", "trailing", "linspace"] | None = None  # ddpm: which training timesteps its steps visit (ldm.schedulers; saved with the pipeline; null: trailing); flow samplers take none (they step σ evenly through flow_shift)
    sample_steps: int = 50  # denoising steps for sample grids, evaluation during training and the model card's example
    eval_features: str | None = None  # classifier folder (`ldm train-classifier`) for evaluation during training (null: Inception, if available)
    eval_num_samples: int = 256  # samples per evaluation during training (sample_scheduler, sample_steps)
    eval_metric: Literal["fid", "kid", "is", "pr"] = "fid"  # the metric logged as eval/* and used to pick unet/best/ (pr: precision)
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the frozen VAE here (float16 decoding overflows on real models; the UNet always gets float32 latents)
    conditioning: Literal["none", "class", "text"] = "none"  # none: unconditional; class: class labels with classifier-free guidance (needs labels); text: captions through a text encoder and cross-attention (needs captions)
    text_encoder: str | None = None  # text: a pretrained CLIPTextModel or T5EncoderModel with its tokenizer (Hub id or folder), kept frozen, prompt embeddings cached; null: train text_model from scratch
    text_model: TextModelConfig = field(default_factory=TextModelConfig)  # text with text_encoder null: sizes of the from-scratch CLIPTextModel
    guidance_scale: float = 1.5  # class/text: the model's classifier-free guidance scale (1: conditional branch only): of the sample grids, evaluations and unet/best/ selection during training, saved in the pipeline folder and used by ldm sample/eval/sweep/demo when none is given; 1.5 = the lowest classifier-FID of the digits sweep for both the class (0.161) and the text model (0.242), docs/conditioning.md
    task: Literal["generate", "superres"] = "generate"  # generate: sample from noise; superres: LDM-SR, the UNet also takes the low-res image (data.degrade) concatenated with the latents


@dataclass
class DistillConfig:
    """`ldm distill`: latent consistency distillation (Luo et al. 2023) of a trained DDPM-objective model, the teacher,
    into a student that samples in 1-8 steps (docs/guide/distillation.md). Its folder is <output_dir>/distill/, the
    student's pipeline <output_dir>/student/."""

    teacher: str | None = None  # the teacher's pipeline folder (`ldm distill --model`): one that ldm's training wrote (<output_dir>/pipeline), or a Stable Diffusion-format text folder, predicting ε or v; saved with the run, so a resume distils the same one
    skip_interval: int = 20  # k: training timesteps the teacher's DDIM solver jumps per step; the student learns on the grid t = k-1, 2k-1, ..., T-1 of T / k points (LCM: 20 of 1000, 50 points), so k must divide the teacher's num_train_timesteps
    num_inference_steps: int = 4  # the student's own step count: saved with it (the pipeline, ldm sample/eval/sweep and the demo use it when none is given) and used by the sample grids and evaluations of the distillation
    guidance_scale: float | None = None  # class/text teachers: the classifier-free guidance scale of the teacher trajectories the student learns; the student samples at that guidance with one network pass per step (null: the teacher's own saved scale)
    target_decay: float = 0.95  # mu of the target network, theta- <- mu theta- + (1 - mu) theta after every optimizer step (LCM: 0.95); the saved student is the train.ema_decay average of theta
    timestep_scaling: float = 10.0  # s of the boundary condition c_skip(t) = 0.25 / ((s t)^2 + 0.25), c_out(t) = s t / sqrt((s t)^2 + 0.25), so that f(x, 0) = x (LCMScheduler's timestep_scaling, saved with the student)
    loss: Literal["l2", "huber"] = "l2"  # distance between the student's and the target's outputs: l2 (LCM's), or pseudo-Huber sqrt(d^2 + c^2) - c
    huber_c: float = 0.001  # c of the pseudo-Huber loss
    train: TrainConfig = field(default_factory=TrainConfig)  # optimizer, budget, checkpoints, grids of the distillation; train.eval_every scores the student with denoiser.eval_features, eval_num_samples and eval_metric, keeping the best as <output_dir>/distill/best/


@dataclass
class RunBudgetConfig:
    """One time budget for both stages: `ldm train` without a stage (ldm.train.run_budget, docs/guide/budgets.md).
    The autoencoder trains while its held-out score still improves fast, within bounds; the denoiser gets the rest."""

    max_minutes: float | None = None  # wall-clock budget of the whole run for `ldm train` without a stage (`--train.max_minutes` there): the autoencoder's share is decided by the plateau rule (vae_*), the denoiser gets what the clock shows is left when the autoencoder is saved (null: each stage by its own train.max_steps or train.max_minutes)
    vae_min_gain_db: float = 0.5  # the plateau rule: the autoencoder's training ends (after its final LR decay) once its held-out score rose by less than this over the last tenth of max_minutes (least-squares slope of the evaluations there, in dB: PSNR, or -10·log10 rFID with vae.eval_features). Provisional, to be chosen by measurement
    vae_min_share: float = 0.15  # least share of max_minutes the autoencoder stage gets, however early its score levels off
    vae_max_share: float = 0.75  # most share of max_minutes the autoencoder stage gets (its final decay starts early enough to end there); the denoiser gets at least the rest
    vae_decay_share: float = 0.2  # share of the autoencoder stage that its final LR decay takes: constant LR after the warm-up until the rule fires at t, then train.lr_scheduler's shape down to the end at t / (1 - this), within the shares above (warmup-stable-decay, Hägele et al. 2024)


@dataclass
class RunConfig:
    output_dir: str = "runs/digits"  # everything of the run goes here: vae/, unet/ (the denoiser stage's folder, named so before the section was renamed), pipeline/
    budget: RunBudgetConfig = field(default_factory=RunBudgetConfig)  # `ldm train` without a stage: one time budget for both stages, split by measurement
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    denoiser: DenoiserStageConfig = field(default_factory=DenoiserStageConfig)  # stage 2; `unet:` in older configs and saved runs is read as this
    distill: DistillConfig = field(default_factory=DistillConfig)  # `ldm distill`: a few-step student of the trained model
