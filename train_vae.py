"""Stage 1: train the KL autoencoder.  accelerate launch train_vae.py --config configs/digits.yaml"""

import sys

import yaml

from ldm.config import ConfigError, config_from_argv, to_dict


def main() -> int:
    try:
        cfg, dry_run = config_from_argv(sys.argv[1:], stage="vae")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from ldm.vae_trainer import train_vae

    train_vae(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
