"""A FedRotLoRA run with checkpoints, on 3 in-process nodes, as a script: tests/flower/test_flower_checkpoint.py
runs it in a subprocess and kills it with SIGKILL at a chosen point of a checkpoint write.

Usage: python flower_checkpoint_run.py CHECKPOINT_DIR NUM_ROUNDS OUT_FILE [KILL_AT]

KILL_AT "N:STEP" kills the process at the N-th checkpoint write (1-based), at STEP: "global" (after the
global adapter's file is flushed, before the rest), "staged" (the directory is complete under its
temporary name, not yet renamed) or "renamed" (after the rename, before the old ones are removed).
The final global adapter goes to OUT_FILE (safetensors).
"""
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import fedrot_ext  # noqa: E402
from fedrot_ext.flower import arrayrecord_to_state_dict, checkpoint  # noqa: E402
from flower_dp_app import run_in_process  # noqa: E402


def arm(kill_at: str) -> None:
    write, step = kill_at.split(":")
    count = {"writes": 0}
    real_save, real_fsync, real_rename = checkpoint._save, checkpoint._fsync, checkpoint.os.rename

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def save(tensors, path):
        if path.name == "global.safetensors":
            count["writes"] += 1
        real_save(tensors, path)
        if step == "global" and path.name == "global.safetensors" and count["writes"] == int(write):
            die()

    def fsync(path):
        real_fsync(path)
        if step == "staged" and path.name.startswith(".round-") and count["writes"] == int(write):
            die()

    class Os:  # the module's os, with a rename that dies right after it has happened
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def rename(src, dst):
            real_rename(src, dst)
            if step == "renamed" and count["writes"] == int(write):
                die()

    checkpoint._save, checkpoint._fsync, checkpoint.os = save, fsync, Os()


def main(directory: str, num_rounds: int, out: str, kill_at: str = "") -> None:
    if kill_at:
        arm(kill_at)
    _, _, result, _, _, _ = run_in_process(
        torch.bfloat16, lambda s: s, [], num_rounds=num_rounds, checkpoint_dir=directory,
        server_optimizer=fedrot_ext.ServerOptimizer("adam", 0.05),
    )
    save_file({k: v.contiguous() for k, v in arrayrecord_to_state_dict(result.arrays).items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
