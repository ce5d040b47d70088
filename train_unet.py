"""Stage 2: train the latent UNet on the frozen VAE and save the diffusers pipeline.

    accelerate launch train_unet.py --config configs/digits.yaml [--output_dir DIR] [--train.max_steps=N ...]
"""

import sys

from ldm.cli import run_training

if __name__ == "__main__":
    sys.exit(run_training("unet"))
