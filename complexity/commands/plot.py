"""`complexity plot RUN... --out FILE.png`: train and validation loss curves of one or more runs."""

from __future__ import annotations


def run(args) -> int:
    from ..train.plot import plot_runs

    path = plot_runs(args.runs, args.out, title=args.title, smooth=args.smooth)
    print(path)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="draw loss curves (train and val) of one or several runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (holding metrics.jsonl)")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--title", default=None)
    p.add_argument("--smooth", type=int, default=1, metavar="N", help="moving average over N logged points")
    p.set_defaults(func=run)
