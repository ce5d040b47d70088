"""ldm: train latent diffusion models (KL autoencoder + latent UNet) with Hugging Face diffusers."""

__version__ = "0.1.0"
