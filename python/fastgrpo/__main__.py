"""``python -m fastgrpo check|bench|static|demo|dynamics|report``. ``check``: every compiled backend against the
fp32 reference over a grid of ops, variants, dtypes, vocabularies, layouts and flags (see :mod:`fastgrpo.check`);
``bench``: see :mod:`fastgrpo.bench.suite`; ``static``: see :mod:`fastgrpo.bench.static`; ``demo``: see
:mod:`fastgrpo.demo`; ``dynamics``: see :mod:`fastgrpo.dynamics.plot`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import backends
from .check import GRIDS, check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgrpo")
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="run every backend present against the fp32 reference")
    p_check.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p_check.add_argument(
        "--grid",
        default=None,
        choices=list(GRIDS),
        help="small: tiny shapes (seconds on a CPU); full: 4096 tokens at the vocabularies of Qwen2.5, Llama 3 and "
        "Gemma (minutes on a GPU). Default: full on cuda, small on cpu",
    )
    p_check.add_argument(
        "--backend",
        action="append",
        default=None,
        choices=[name for name in backends.BACKENDS if name not in ("auto", "reference")],
        help="check only this backend (repeatable; default: every compiled backend that runs on the device)",
    )
    from .bench import static, suite  # the CLI's own modules; importing fastgrpo imports neither

    p_bench = sub.add_parser("bench", help="time every op against the peers and a roofline; table, CSV/JSON, PNG")
    suite.add_arguments(p_bench)
    p_static = sub.add_parser(
        "static", help="the GPU kernels' cost read off their compiled SASS (no GPU): table, predicted H100/H200 time"
    )
    static.add_arguments(p_static)
    p_demo = sub.add_parser(
        "demo", help="a GRPO training loop on a tiny transformer; its reward curve fitted (MATH §8) and plotted"
    )
    p_demo.add_argument("--steps", type=int, default=600)
    p_demo.add_argument(
        "--out", default="bench/results", metavar="DIR", help="write DIR/demo_reward.png (or this .png path)"
    )
    p_report = sub.add_parser("report", help="markdown tables of bench/results (optionally into the README)")
    p_report.add_argument("--results", default="bench/results")
    p_report.add_argument("--readme", default=None, help="replace this file's results section")
    p_dyn = sub.add_parser("dynamics", help="fit a training log's reward curve and diagnose it; table, PNG")
    p_dyn.add_argument("log", help="TRL trainer_state.json (or its directory), verl .jsonl/.log, or a .csv")
    p_dyn.add_argument("--out", default=None, help="write DIR/dynamics.png here (default: the log's directory)")
    p_dyn.add_argument(
        "--group-size",
        action="append",
        default=[],
        metavar="G=LOG",
        help="two or more: the fluctuation-scaling exponent b of var(reward) ~ G^b",
    )
    args = parser.parse_args(argv)
    if args.command == "report":
        from .bench import report

        if args.readme:
            report.update_readme(args.readme, args.results)
        else:
            print(report.markdown(args.results))
        return 0
    if args.command == "check":
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"check --device {args.device}: no CUDA device is visible to torch")
        grid = args.grid or ("full" if device.type == "cuda" else "small")
        if device.type == "cpu" and grid == "small":
            torch.set_num_threads(1)  # tensors of a few thousand elements: intra-op threads would only spin
        return 0 if check(device, grid, args.backend) else 1
    if args.command == "bench":
        suite.run(args)
        return 0
    if args.command == "static":
        return static.run(args)
    if args.command == "dynamics":
        from .dynamics import plot  # imports scipy: only for this subcommand

        return plot.run(args)
    from .demo import main as demo

    return demo(steps=args.steps, out=args.out)


if __name__ == "__main__":
    sys.exit(main())
