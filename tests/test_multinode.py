"""Two "nodes" on one machine: two `accelerate launch --num_machines 2 --machine_rank 0|1` commands, one CPU process
each (gloo), train the UNet stage as one group; the caches are right whether or not the nodes share a file system."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, run, tiny_config
from test_distributed import free_port

from ldm.train.vae import train_vae

WORKER = REPO / "tests" / "multinode_worker.py"


def launch_node(rank: int, port: int, tmp_path: Path, *args: str) -> subprocess.Popen:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [launcher, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--num_processes", "2",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), *args]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    log = (tmp_path / f"node{rank}.log").open("w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_nodes_train_as_one_group_with_shared_and_node_local_caches(tmp_path):
    run(train_vae, tiny_config(tmp_path / "vae", **{"vae.train.max_steps": 2, "vae.train.sample_every": 0}))
    shared = tmp_path / "shared"
    port = free_port()
    options = [f"--output_dir={tmp_path / 'run'}", f"--denoiser.vae_path={tmp_path / 'vae' / 'vae' / 'model'}",
               "--train.max_steps=4", "--train.batch_size=4", "--train.checkpointing_steps=2", "--train.sample_every=0",
               "--train.use_ema=false"]  # the main process loads the EMA into its model at the end; the others do not
    nodes = [launch_node(rank, port, tmp_path, str(tmp_path / "out"), str(shared), str(tmp_path / f"node{rank}"),
                         *options) for rank in (0, 1)]
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=600) == 0, (tmp_path / f"node{rank}.log").read_text()[-4000:]
    ranks = [torch.load(tmp_path / f"out-rank{i}.pt") for i in range(2)]

    # One group of two processes, one per node (each its node's local main process)...
    assert [(r["process_index"], r["num_processes"], r["local_index"]) for r in ranks] == [(0, 2, 0), (1, 2, 0)]
    # ...whose gradients were all-reduced: the same weights on both nodes at the end.
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
    # The latent cache on the shared disk: one writer (process 0), the other waited and read it. Node-local latent
    # caches (training's): each node built its own, as neither sees the other's disk.
    assert ranks[0]["writes"]["latent_cache"] == [str(shared / "latents"), str(tmp_path / "node0" / "latents")]
    assert ranks[1]["writes"]["latent_cache"] == [str(tmp_path / "node1" / "latents")]
    # Features: one writer on the shared disk; on the node disks only node 1, which lacked them, wrote.
    assert ranks[0]["writes"]["features"] == [str(shared / "features")]
    assert ranks[1]["writes"]["features"] == [str(tmp_path / "node1" / "features")]
    for where in ("shared", "node"):
        for key, value in ranks[0]["features"][where].items():
            assert torch.equal(value, ranks[1]["features"][where][key])
    assert torch.equal(ranks[0]["features"]["shared"]["features"], ranks[0]["features"]["node"]["features"])
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []
