"""LatentTextDiTPipeline: text-to-image latent diffusion with a transformer denoiser (PixArt-α's cross-attention
transformer over a CLIP or T5 text encoder).

A text UNet is saved as a stock `StableDiffusionPipeline` folder (`text_to_image.py`). A transformer has no such
stock home: `PixArtAlphaPipeline`, diffusers' pipeline for `PixArtTransformer2DModel`, takes only a T5 encoder, with
120-token prompts and their attention mask, while ldm trains on Stable Diffusion's prompt encoding (padded to the
tokenizer's maximum, no mask, last hidden state) over a CLIP encoder of its own or any pretrained CLIP/T5. So text DiT
models are saved with this class, which samples exactly as `StableDiffusionPipeline` does with the transformer in the
UNet's place.

This file imports only torch, diffusers and its siblings: it is copied into every saved model folder.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, PixArtTransformer2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .guidance import combine_guidance
from .latents import decode  # noqa: F401  (diffusers' remote-code loader copies only direct relative imports)
from .noising import initial_noise_scale, scale_model_input
from .pipeline_common import DEFAULT_GUIDANCE_SCALE, LatentPipelineMixin, denoiser_output


class LatentTextDiTPipeline(LatentPipelineMixin, DiffusionPipeline):
    r"""
    Text-to-image generation with a latent transformer that cross-attends to a text encoder's states.

    1. encode the prompts, and for classifier-free guidance (`guidance_scale` > 1, as Stable Diffusion) the negative
       prompts ("" by default), as `StableDiffusionPipeline.encode_prompt` does: ids padded to the tokenizer's maximum,
       the encoder's last hidden state (the attention mask only if the encoder's config asks for it);
    2. draw unit-variance latents, scaled by the scheduler's initial noise sigma (1 for flow matching, `noising.py`);
    3. denoise: one batched pass over [negative | prompt] per step, ε(∅) + s (ε(c) − ε(∅)), any scheduler;
    4. decode ``x = D(latents / scaling_factor + shift_factor)`` (`latents.decode`).

    Parameters:
        vae ([`AutoencoderKL`]): decodes the latents.
        text_encoder ([`CLIPTextModel`] or [`T5EncoderModel`]): encodes the prompts.
        tokenizer: the text encoder's tokenizer.
        transformer ([`PixArtTransformer2DModel`]): the denoiser; `caption_channels` = the encoder's width.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler.
        guidance_scale (`float`, *optional*): the model's own guidance scale (training's `denoiser.guidance_scale`),
            used when a call gives none; without it, `DEFAULT_GUIDANCE_SCALE`.

    Example (a folder that training wrote):

    ```py
    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained("runs/my-text-dit/pipeline", trust_remote_code=True)  # doctest: +SKIP
    >>> images = pipe(["a handwritten digit 3"], num_inference_steps=50).images  # doctest: +SKIP
    ```
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    # LatentPipelineMixin's unet-or-transformer choice does not apply here: always a transformer.
    _optional_components: ClassVar[list[str]] = []

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, transformer: PixArtTransformer2DModel,
                 scheduler: SchedulerMixin, guidance_scale: float | None = None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=scheduler)
        if guidance_scale is not None:
            self.register_to_config(guidance_scale=float(guidance_scale))

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """The transformer's context for each prompt (B, L, D): Stable Diffusion's prompt encoding."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    @staticmethod
    def check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt: give a string or a list of strings, got {prompt!r}")
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [""])
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
            raise ValueError(f"negative_prompt: one string for all prompts or one per prompt ({len(prompts)}), got "
                             f"{negative_prompt!r}")
        return prompts, negatives

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str | None = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            prompt (`str` or `List[str]`): what to draw, one image per prompt.
            negative_prompt (`str` or `List[str]`, *optional*): what to steer away from (the unconditional branch of
                guidance), one for all prompts or one per prompt; default "".
            guidance_scale (`float`, *optional*, defaults to the model's own): classifier-free guidance scale; at most
                1 samples the conditional model alone (one forward pass per step), as in Stable Diffusion.
            num_inference_steps (`int`, *optional*, defaults to 50): denoising steps.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): makes the noise deterministic; a
                list gives each image its own.
            eta (`float`, *optional*, defaults to 0.0): DDIM's η; ignored by other schedulers.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]) or `"pt"`.
            return_dict (`bool`, *optional*, defaults to `True`): an [`ImagePipelineOutput`] or a tuple.
            latents (`torch.Tensor`, *optional*): unit-variance starting noise instead of drawing it.

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 0. Check every argument before any work
        self.check_output_type(output_type)
        self.check_numbers(None, num_inference_steps, eta, guidance_scale)
        prompts, negatives = self.check_prompts(prompt, negative_prompt)
        if guidance_scale is None:
            saved = getattr(self.config, "guidance_scale", None)
            guidance_scale = DEFAULT_GUIDANCE_SCALE if saved is None else float(saved)
        guide = guidance_scale > 1.0
        device, batch_size = self._execution_device, len(prompts)
        size = self.transformer.config.sample_size
        shape = (batch_size, self.transformer.config.in_channels, size, size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} prompts; pass one per image.")
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents: shape {tuple(latents.shape)}, expected {shape}")

        # 1. The context: [negative | prompt] when guiding (Stable Diffusion's order), else the prompts alone
        context = self.encode_prompt(negatives + prompts if guide else prompts, device).to(self.transformer.dtype)

        # 2. Timesteps first, then the noise x_T scaled for them (Euler's init_noise_sigma depends on the timesteps)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        latents = latents.to(device, self.transformer.dtype) * initial_noise_scale(self.scheduler)

        # 3. Denoise x_t -> x_t-1
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guide else latents
            model_input = scale_model_input(self.scheduler, model_input, t)  # x_σ as it is for flow matching
            output = denoiser_output(self.transformer, model_input, t, encoder_hidden_states=context,
                                     transformer=True)
            output = combine_guidance(output, guidance_scale) if guide else output
            latents = self.scheduler.step(output, t, latents, **extra_step_kwargs).prev_sample

        # 4. Decode: x = D(z / scaling_factor + shift_factor), [-1, 1] -> [0, 1], the output type
        image = self.to_output(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
