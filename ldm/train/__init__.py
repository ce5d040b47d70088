"""Training: the spine both stages share, checkpoints, devices, the latent cache, and one module per stage."""
