"""ServerApp: FedRotLoRA with a server optimizer and, when asked, a checkpoint after every round."""
import os

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

import fedrot_ext
from fedrot_ext.flower import FedRotLoRA, arrayrecord_to_state_dict, state_dict_to_arrayrecord
from flower_checkpoint_run import arm
from helpers.peft_models import tiny_bert

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if rc["kill-at"]:
        arm(str(rc["kill-at"]))
    strategy = FedRotLoRA(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2,
                          checkpoint_dir=str(rc["checkpoint-dir"]) or None, server_optimizer=fedrot_ext.ServerOptimizer("adam", 0.05))
    initial = get_peft_model_state_dict(tiny_bert(torch.bfloat16, seed=0))
    result = strategy.start(grid=grid, initial_arrays=state_dict_to_arrayrecord(initial), num_rounds=int(rc["num-server-rounds"]),
                            train_config=ConfigRecord({}))
    if rc["out-file"]:  # beside its place first: a test waits for the file to appear, then reads it
        staged = f"{rc['out-file']}.partial"
        save_file({k: v.contiguous() for k, v in arrayrecord_to_state_dict(result.arrays).items()}, staged)
        os.replace(staged, str(rc["out-file"]))
