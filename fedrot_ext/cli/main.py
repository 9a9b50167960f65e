"""``fedrot-aggregate CLIENT_DIR... --reference GLOBAL_DIR --out OUT_DIR``: one server round over adapter directories.

Exit status 0 on success, 2 on bad usage or bad input (one line on stderr naming the directory and file;
nothing is written). See README, "The fedrot-aggregate command".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

from ..methods import METHODS, get_method
from ..peft.io import ADAPTER_FILE
from ..peft.merge import MERGE_METHODS
from ..schedule import SCHEDULES, alignment_for_round
from .adapters import InputError, check_compatible, check_config_ranks, client_weights, config_with_ranks, output_config, read_adapter
from .output import check_report_path, check_writable, recover_interrupted_swap, stage_text_file, write_adapter
from .report import build_report

PROG = "fedrot-aggregate"


def _lam(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Aggregate peft LoRA adapter directories (save_pretrained output) into one.")
    p.add_argument("clients", nargs="+", metavar="CLIENT_DIR", help="client adapter directories (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--reference", metavar="GLOBAL_DIR", help="the previous global adapter (the rotation target; not needed by --merge)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="the new adapter directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    # Defaults of the round options are applied in run(): None tells that an option was not given (--merge refuses them).
    p.add_argument("--method", choices=METHODS, help="the aggregation method (default fedrot)")
    p.add_argument("--round", type=int, help="0-based round number (the alternating schedule and rolora need it)")
    p.add_argument("--lam", type=_lam, help="soft rotation strength in [0, 1], or 'auto' (default 0.5)")
    p.add_argument("--schedule", choices=SCHEDULES, help="which factor each round aligns (default alternate)")
    p.add_argument("--weights", metavar="n1,n2,...", help="client weights (e.g. sample counts); default uniform")
    p.add_argument("--on-invalid", choices=["raise", "skip"], help="a client with NaN/Inf: fail (default), or drop it")
    p.add_argument("--clip-norm", type=float, metavar="C", help="clip each client's update norm to C")
    p.add_argument("--report", metavar="REPORT.json", help="write a JSON report (errors, λ, rotation angles, dropped clients)")
    p.add_argument("--merge", action="store_true", help="merge the adapters with fedrot_ext.merge_adapters (no reference needed)")
    p.add_argument("--merge-method", choices=MERGE_METHODS, help="with --merge: procrustes (default), or svd, cat, ties, tsv "
                   "(computed in core space)")
    p.add_argument("--merge-rank", type=int, metavar="R", help="with --merge-method svd, ties or tsv: the output rank (default the largest)")
    p.add_argument("--merge-density", type=float, metavar="D", help="with --merge-method ties: the fraction of entries kept (default 0.2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _load_all(dirs: List[str], progress: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: plain loop without a bar
        tqdm = None
    progress = progress and sys.stderr.isatty()  # a log file gets no bar
    it = dirs if tqdm is None else tqdm(dirs, desc="loading adapters", unit="dir", disable=not progress, file=sys.stderr)
    return [read_adapter(d) for d in it]


ROUND_DEFAULTS = {"method": "fedrot", "round": None, "lam": 0.5, "schedule": "alternate", "on_invalid": "raise",
                  "clip_norm": None}


def _apply_defaults(args) -> None:
    """Refuse a round option given with --merge and a merge option without it (either would be ignored),
    then fill in the defaults."""
    merge_given = [name for name in ("merge_method", "merge_rank", "merge_density") if getattr(args, name) is not None]
    if merge_given and not args.merge:
        raise InputError(f"--{merge_given[0].replace('_', '-')}: applies to --merge only")
    if args.merge and args.reference and (args.merge_method or "procrustes") != "procrustes":
        raise InputError(f"--reference: does not apply to --merge-method {args.merge_method} (only procrustes aligns to a reference)")
    if args.merge:
        given = [name for name in ROUND_DEFAULTS if getattr(args, name) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise InputError(f"{flag}: does not apply to --merge (merge_adapters aligns every adapter by generalised "
                             "Procrustes: no method, round, schedule, λ, clipping or dropping)")
    for name, default in ROUND_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def run(args) -> dict:
    """One round; returns {"out", "dropped"} (the report itself with ``--report``)."""
    out = Path(args.out)
    _apply_defaults(args)
    restored = recover_interrupted_swap(out)
    if restored:
        print(f"{PROG}: {restored}", file=sys.stderr)
    inputs = [Path(d) for d in args.clients] + ([Path(args.reference)] if args.reference else [])
    check_writable(out, args.overwrite, inputs)
    if args.report:
        check_report_path(Path(args.report), args.overwrite, inputs, out)
    weights = client_weights(args.weights, len(args.clients)) if args.weights is not None else None
    if args.clip_norm is not None and not args.clip_norm > 0:
        raise InputError(f"--clip-norm: expected a positive number, got {args.clip_norm}")
    clients = _load_all(args.clients, not args.no_progress)
    reference = read_adapter(args.reference) if args.reference else None
    spec = get_method(args.method)
    check_compatible(clients + ([reference] if reference else []), same_ranks=spec.equal_ranks)
    states = [c.state for c in clients]
    ref_state = reference.state if reference else None
    config = output_config(clients)
    lam = args.lam
    try:
        if args.merge:
            try:
                from ..peft.merge import merge_adapters  # the alignment module; imported only when asked for
            except ImportError as err:
                raise InputError(f"--merge: fedrot_ext.merge_adapters is not available in this install ({err})") from None

            merge_method = args.merge_method or "procrustes"
            options = dict(align="AB", reference=ref_state) if merge_method == "procrustes" else dict(
                rank=args.merge_rank, density=args.merge_density)
            aggregated = merge_adapters(states, weights=weights, method=merge_method, lora_config=config, **options)
            config = config_with_ranks(config, aggregated)  # svd, ties and tsv may change ranks; cat sums them
            align, method, lam = ("AB", "merge", 1.0) if merge_method == "procrustes" else (None, f"merge-{merge_method}", None)
        else:
            aggregated = _aggregate(states, ref_state, weights, args, config)
            method = args.method
            align = alignment_for_round(args.round, args.schedule) if spec.aligns and args.round is not None else None
    except (ValueError, TypeError) as err:  # the library's messages name the argument, client and key
        raise InputError(_name_files(str(err), args.clients, args.reference)) from None
    lam_used = getattr(aggregated, "lam", {})  # {module: λ}
    base_deltas = getattr(aggregated, "base_deltas", {})
    if reference is not None and lam_used:  # aligned: the result has the reference's ranks where they are larger
        config = output_config(clients + [reference])
    check_config_ranks(config, aggregated, out)
    dropped = getattr(aggregated, "dropped", ())
    summary = {"out": str(out), "dropped": [i for i, _ in dropped]}
    if not args.report:  # the report's error and angles cost more than the aggregation: only when asked for
        write_adapter(out, aggregated, config, base_deltas, args.overwrite)
        return summary
    kept = [i for i in range(len(states)) if i not in set(summary["dropped"])]
    report = build_report(method=method, align=align, lam=lam, lam_used=lam_used, clients=states, kept=kept, weights=weights,
                          reference=ref_state, aggregated=aggregated, dirs=args.clients, lora_config=config)
    report["out"] = str(out)
    report["base_deltas_file"] = "base_deltas.safetensors" if base_deltas else None
    try:  # written beside its place first: a failure leaves both the report and OUT_DIR as they were
        staged = stage_text_file(Path(args.report), json.dumps(report, indent=1) + "\n")
    except OSError as err:
        raise InputError(f"{args.report}: could not write the report ({err})") from None
    try:
        write_adapter(out, aggregated, config, base_deltas, args.overwrite)
    except InputError:
        staged.unlink()
        raise
    os.replace(staged, args.report)
    return report


def _name_files(message: str, dirs: List[str], reference: Optional[str]) -> str:
    """The library names clients by index (``client_states[1]``) and the reference by argument name:
    say which directory and file that is."""
    message = re.sub(r"client_states\[(\d+)\]", lambda m: f"{Path(dirs[int(m.group(1))]) / ADAPTER_FILE} (client {m.group(1)})", message)
    message = message.replace("on_invalid='skip'", "--on-invalid skip").replace("clip_norm", "--clip-norm")
    if reference:
        message = re.sub(r"^reference\b", f"{Path(reference) / ADAPTER_FILE} (reference)", message)
    return message


def _aggregate(states, ref_state, weights, args, config):
    from ..peft.aggregate import aggregate_state_dicts

    return aggregate_state_dicts(
        states, reference=ref_state, weights=weights, method=args.method, round=args.round, lam=args.lam,
        schedule=args.schedule, lora_config=config, on_invalid=args.on_invalid,
        clip_norm=args.clip_norm,
    )


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``fedrot-aggregate`` and ``python -m fedrot_ext aggregate``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own one-line usage error and exits 2
        return int(exc.code or 0)
    try:
        report = run(args)
    except InputError as err:
        print(f"{PROG}: error: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {report['out']} ({len(args.clients) - len(report['dropped'])} of {len(args.clients)} clients aggregated)")
    return 0
