"""The command line the one-table bench scripts share (lam_auto_cost.py, phase_breakdown.py)."""
from __future__ import annotations

import argparse

import torch


def parser(doc: str, configs_help: str) -> argparse.ArgumentParser:
    """--device, --configs, --repeats, --threads and --out; each script adds its own options."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default=None, help=configs_help)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None)
    return ap


def start(args) -> torch.device:
    """Apply --threads; the device to run on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)
