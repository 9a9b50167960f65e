"""End to end: every path a user calls, against what they would use instead, on the same data in one run.

    python bench/pipeline.py                                   # the default configs (about 10 min on 2 cores)
    python bench/pipeline.py --configs 'llama3-8b-qkvo_N10_r16_*' --out bench/results_pipeline_cpu.json
    python bench/pipeline.py --configs tiny_N3_r4_fp32 --repeats 2 --cli-repeats 1  # a smoke run

Per config (model, N clients, rank, dtype) one round: a reference adapter (peft keys, Llama-style
module names) and N clients, each a rotated noisy copy of it (bench.shapes). Timed, the paths taking
turns (bench.timing.time_interleaved), median seconds:

- ``flower_fedavg``: Flower's own ``FedAvg.aggregate_train`` on the N train replies;
- ``strategy_fedrot`` / ``strategy_fedit``: ``FedRotLoRA(method=...)`` on the same replies (defaults:
  λ = 0.5, one aggregate_state_dicts call over the replies decoded in place);
  ``strategy_fedrot_streaming``: the same with ``streaming=True``;
- ``state_dicts``: ``aggregate_state_dicts(method="fedrot")`` on the decoded clients;
- ``streaming`` / ``streaming_group8``: a ``StreamingAggregator``, N x ``add`` + ``result``, one client
  per op call (the one-client memory bound) or 8 (``group=8``);
- ``op``: ``align_and_aggregate`` on pre-stacked (N, ...) tensors;
- ``copy``: one copy of the clients' bytes (the floor: the op reads each byte once).

Then, as whole processes (python start-up and ``import torch`` included), ``fedrot-aggregate`` on N
peft adapter directories against a plain script that loads them with safetensors, averages and saves
(:data:`PLAIN_SCRIPT`). Replies travel in the "numpy" wire format (bf16 as its float32 upcast, which
Flower's FedAvg reads); the table reports each path's ratio to its baseline.

The goals this measures (no timing assertion anywhere in the tests): strategy_fedrot <= 1.0x and
strategy_fedit <= 0.7x flower_fedavg; state_dicts and streaming <= 1.3x op; the command <= 1.5x the
plain script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fedrot_ext  # noqa: E402
from bench import shapes  # noqa: E402
from bench.timing import time_interleaved  # noqa: E402

DEFAULT_CONFIGS = (
    "llama3-8b-qkvo_N10_r16_fp32",
    "llama3-8b-qkvo_N10_r16_bf16",
    "llama3-8b-qkvo_N10_r8_fp32",
    "llama3-8b-qkvo_N10_r64_fp32",
    "llama3-8b-qkvo_N50_r16_fp32",
    "llama3-8b-qkvo_N50_r16_bf16",
    "llama3-8b-all_N10_r16_fp32",
)
MODULE_NAMES = {
    "llama3-8b-qkvo": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "llama3-8b-all": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "roberta-large-qv": ("attention.self.query", "attention.self.value"),
    "tiny": ("self_attn.q_proj", "self_attn.k_proj"),
}

# What a user would write instead of the command: load with safetensors, average, save (argv: OUT CLIENT...).
PLAIN_SCRIPT = """
import json, shutil, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
out, dirs = Path(sys.argv[1]), sys.argv[2:]
states = [load_file(f"{d}/adapter_model.safetensors") for d in dirs]
avg = {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}
out.mkdir(parents=True, exist_ok=True)
save_file(avg, str(out / "adapter_model.safetensors"))
shutil.copy(f"{dirs[0]}/adapter_config.json", out / "adapter_config.json")
"""


def _key(layer: int, module: str, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.{module}.lora_{factor}.weight"


def make_round(cfg: shapes.Config, seed: int = 0):
    """(reference, clients): peft state dicts of the config's layers; every client tensor its own allocation."""
    inp = shapes.make_inputs(cfg, "cpu", seed=seed)
    names = MODULE_NAMES[cfg.model]
    keys = [(l // len(names), names[l % len(names)]) for l in range(len(inp.A))]
    reference = {}
    for (layer, module), a, b in zip(keys, inp.ref_A, inp.ref_B):
        reference[_key(layer, module, "A")], reference[_key(layer, module, "B")] = a.clone(), b.clone()
    clients = []
    for i in range(cfg.N):
        state = {}
        for (layer, module), a, b in zip(keys, inp.A, inp.B):
            state[_key(layer, module, "A")], state[_key(layer, module, "B")] = a[i].clone(), b[i].clone()
        clients.append(state)
    return reference, clients, inp


def _replies(clients, server_round: int):
    from flwr.app import ConfigRecord, Message, MessageType, Metadata, RecordDict

    from fedrot_ext.flower import make_train_reply

    out = []
    for node, state in enumerate(clients, start=1):
        meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
        ins = Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), metadata=meta)
        out.append(make_train_reply(ins, state, 100 + node, wire_format="numpy"))
    return out


def in_process_paths(cfg: shapes.Config, reference, clients, inp) -> Dict[str, callable]:
    """name -> fn(k): the in-process paths of one round (round 2: the schedule aligns A)."""
    from flwr.serverapp.strategy import FedAvg

    from fedrot_ext.flower import FedRotLoRA, state_dict_to_arrayrecord

    server_round = 2
    replies = _replies(clients, server_round)
    sent = state_dict_to_arrayrecord(reference)

    def strategy(**kw):
        def run(k):
            s = FedRotLoRA(**kw)
            s._sent = (server_round, sent)  # what configure_train records, without a Grid
            return s.aggregate_train(server_round, replies)
        return run

    weights = [100 + i for i in range(1, cfg.N + 1)]
    stacks = inp.A + inp.B
    dst = [torch.empty_like(t) for t in stacks]

    def copy(k):
        for d, t in zip(dst, stacks):
            d.copy_(t)

    def streaming(group):
        def run(k):
            agg = fedrot_ext.StreamingAggregator(reference, method="fedrot", round=1, group=group)
            for state, w in zip(clients, weights):
                agg.add(state, w)
            return agg.result()
        return run

    return {
        "flower_fedavg": lambda k: FedAvg().aggregate_train(server_round, replies),
        "strategy_fedrot": strategy(method="fedrot"),
        "strategy_fedit": strategy(method="fedit"),
        "strategy_fedrot_streaming": strategy(method="fedrot", streaming=True),
        "state_dicts": lambda k: fedrot_ext.aggregate_state_dicts(clients, reference=reference, weights=weights, round=1),
        "streaming": streaming(1),
        "streaming_group8": streaming(8),
        "op": lambda k: fedrot_ext.align_and_aggregate(inp.A, inp.B, ref_A=inp.ref_A, weights=weights, align="A"),
        "copy": copy,
    }


def write_dirs(root: Path, reference, clients) -> List[str]:
    from safetensors.torch import save_file

    def write(d: Path, state):
        d.mkdir(parents=True)
        save_file(state, str(d / "adapter_model.safetensors"))
        r = next(iter(state.values())).shape[0]
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                           "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))

    write(root / "global", reference)
    dirs = []
    for i, state in enumerate(clients):
        write(root / f"client{i}", state)
        dirs.append(str(root / f"client{i}"))
    return dirs


def command_paths(root: Path, dirs: List[str]) -> Dict[str, List[str]]:
    py = sys.executable
    return {
        "command": [py, "-m", "fedrot_ext", "aggregate", *dirs, "--reference", str(root / "global"), "--round", "1",
                    "--out", str(root / "out_cmd"), "--overwrite", "--no-progress"],
        "plain_script": [py, "-c", PLAIN_SCRIPT, str(root / "out_plain"), *dirs],
    }


def time_processes(cmds: Dict[str, List[str]], repeats: int) -> Dict[str, List[float]]:
    times = {name: [] for name in cmds}
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    for _ in range(repeats):
        for name, cmd in cmds.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    return times


RATIOS = (  # (path, baseline, goal)
    ("strategy_fedrot", "flower_fedavg", 1.0),
    ("strategy_fedit", "flower_fedavg", 0.7),
    ("strategy_fedrot_streaming", "flower_fedavg", 1.0),
    ("state_dicts", "op", 1.3),
    ("streaming", "op", 1.3),
    ("streaming_group8", "op", 1.3),
    ("op", "copy", None),
    ("command", "plain_script", 1.5),
)


def run_config(config: str, repeats: int, cli_repeats: int) -> dict:
    cfg = shapes.parse(config)
    reference, clients, inp = make_round(cfg)
    times = time_interleaved(in_process_paths(cfg, reference, clients, inp), torch.device("cpu"), warmup=1,
                             repeats=repeats, min_repeats=2, max_s=120.0)
    if cli_repeats:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            times.update(time_processes(command_paths(root, write_dirs(root, reference, clients)), cli_repeats))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {f"{p}/{b}": median[p] / median[b] for p, b, _ in RATIOS if p in median and b in median}
    goals = {f"{p}/{b}": ratios[f"{p}/{b}"] <= g for p, b, g in RATIOS if g is not None and f"{p}/{b}" in ratios}
    client_mb = sum(t.numel() * t.element_size() for t in clients[0].values()) * cfg.N / 1e6
    return {"config": config, "client_MB": round(client_mb, 1), "median_s": median, "times_s": times, "ratios": ratios,
            "goals_met": goals}


def table(rows: List[dict]) -> str:
    cols = [f"{p}/{b}" for p, b, _ in RATIOS]
    head = "| config | MB | FedAvg ms | op ms | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (4 + len(cols))]
    for r in rows:
        m = r["median_s"]
        cells = [f"{r['ratios'][c]:.2f}" if c in r["ratios"] else "" for c in cols]
        lines.append(f"| {r['config']} | {r['client_MB']:.0f} | {1e3 * m['flower_fedavg']:.0f} | {1e3 * m['op']:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import logging

    import flwr.common  # noqa: F401  (sets the "flwr" logger's level on import: quiet it after)

    logging.getLogger("flwr").setLevel(logging.WARNING)  # one INFO line per aggregate_train call otherwise
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=None, help="comma-separated config ids or globs (default: DEFAULT_CONFIGS)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the in-process paths, taking turns")
    ap.add_argument("--cli-repeats", type=int, default=3, help="runs of each whole process (0: skip them)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    known = list(DEFAULT_CONFIGS) + [c.id for c in shapes.sweep()]
    configs = DEFAULT_CONFIGS if not args.configs else [c.id for c in shapes.select(
        [shapes.parse(c) for c in dict.fromkeys(known + [p for p in args.configs.split(",") if "*" not in p])],
        args.configs)]
    rows = []
    for config in configs:
        row = run_config(config, args.repeats, args.cli_repeats)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
