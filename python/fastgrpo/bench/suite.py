"""``python -m fastgrpo bench``: every op's cases for the device present, one table, CSV/JSON/PNG files."""

from __future__ import annotations

import argparse
import pathlib
from typing import Callable, Optional

import torch

from . import advantages, grpo_loss, linear_grpo_loss, token_logprobs
from .common import DTYPES, sizes
from .harness import Case, environment, exact_cpu_peaks, run_case, table, write

try:
    from tqdm import tqdm
except ImportError:  # the bench extra brings it; without it the suite runs without a progress bar
    tqdm = None

OPS = ("token_logprobs", "grpo_loss", "linear_grpo_loss", "advantages")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="two sizes per op (about a minute on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--out", default="bench/results", help="folder for the CSV, JSON and PNG (default: %(default)s)"
    )
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ", ".join(OPS))
    parser.add_argument("--modes", default=None, help="fwd,fwd+bwd (default: fwd+bwd with --quick, both otherwise)")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts N (overrides the sizes)")
    parser.add_argument("--vocab", default=None, help="comma-separated vocabulary sizes V")
    parser.add_argument("--hidden", default=None, help="comma-separated hidden sizes H of the linear path")
    parser.add_argument("--batch", default=None, help="comma-separated reward counts B of advantages")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per provider, at least (10 on CUDA; default 3 quick, 5 full)",
    )


def _ints(text: Optional[str], default: list[int]) -> list[int]:
    return default if text is None else [int(x) for x in text.split(",") if x]


def collect(args: argparse.Namespace) -> list[Callable[[], list[Case]]]:
    """For each requested op, the function building its cases (inputs are built lazily, op by op, to bound
    memory)."""
    device, quick = args.device, args.quick
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    modes = args.modes.split(",") if args.modes else (["fwd+bwd"] if quick else ["fwd", "fwd+bwd"])
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {sorted(unknown)}; choose from {', '.join(OPS)}")
    n_default, v_default = sizes(device, quick)
    tokens, vocabs = _ints(args.tokens, n_default), _ints(args.vocab, v_default)
    ln, lh, lv = linear_grpo_loss.sizes(device, quick)
    plan = {
        "token_logprobs": lambda: token_logprobs.cases(device, dtype, tokens, vocabs, modes),
        "grpo_loss": lambda: grpo_loss.cases(device, dtype, tokens, vocabs, modes),
        "linear_grpo_loss": lambda: linear_grpo_loss.cases(
            device, dtype, _ints(args.tokens, ln), _ints(args.hidden, lh), _ints(args.vocab, lv), modes
        ),
        "advantages": lambda: advantages.cases(device, _ints(args.batch, advantages.sizes(device, quick))),
    }
    return [plan[op] for op in args.ops.split(",")]


def run(args: argparse.Namespace) -> list[pathlib.Path]:
    repeats = args.repeats or (3 if args.quick else 5)
    if args.device == "cpu":
        exact_cpu_peaks()
    env = environment(args.device)
    print(f"fastgrpo bench on {env['device']} (torch {env['torch']}){' --quick' if args.quick else ''}")
    rows = []
    for make_cases in collect(args):
        cases = make_cases()
        total = sum(len(c.providers) + (c.roofline is not None) for c in cases)
        progress = tqdm(total=total, unit="provider") if tqdm else None  # on stderr
        for case in cases:
            rows += run_case(case, args.device, repeats, progress)
        if progress is not None:
            progress.close()
        del cases
    print(table(rows))
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    ops = "" if args.ops == ",".join(OPS) else "_" + args.ops.replace(",", "+")
    stem = f"bench_{args.device}_{dtype}{'_quick' if args.quick else ''}{ops}"
    paths = write(rows, env, pathlib.Path(args.out), stem)
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths
