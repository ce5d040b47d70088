"""Stage 1: train the KL autoencoder and measure its latents' scaling factor.

    accelerate launch train_vae.py --config configs/digits.yaml [--output_dir DIR] [--train.max_steps=N ...]
"""

import sys

from ldm.cli import run_training

if __name__ == "__main__":
    sys.exit(run_training("vae"))
