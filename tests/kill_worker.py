"""A training run that can die in the middle of writing a checkpoint, for tests/test_crashes.py (not a test module):

    [accelerate launch ...] tests/kill_worker.py vae|unet KILL_IN_SAVE --config ... [overrides]

Runs train_vae.py / train_unet.py's body. KILL_IN_SAVE=N > 0: while the main process writes checkpoint-N, it writes
half of the weights file and then kills itself with SIGKILL, as a node that dies mid-write would.
"""

import os
import signal
import sys
from pathlib import Path

import accelerate.utils.other

from ldm.cli import run_training


def die_while_writing(step: int) -> None:
    save_file = accelerate.utils.other.safe_save_file

    def dying(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        if Path(filename).parent.name == f"checkpoint-{step}.tmp":
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    accelerate.utils.other.safe_save_file = dying


if __name__ == "__main__":
    stage, kill_in_save, *argv = sys.argv[1:]
    if int(kill_in_save):
        die_while_writing(int(kill_in_save))
    sys.exit(run_training(stage, argv))
