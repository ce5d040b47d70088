import os

# Tests never reach the network: remote names fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the demo tests: no usage reports

import torch

# Two cores are shared with other processes in CI; one thread keeps timings steady and results reproducible.
torch.set_num_threads(1)
