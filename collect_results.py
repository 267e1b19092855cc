#!/usr/bin/env python
"""Turn every metrics.jsonl under a directory into result tables: Markdown on stdout; CSV, Markdown, LaTeX and
metric-against-epochs plots per dataset in --out.

    python collect_results.py --root runs/ [--out runs/tables/]

--out defaults to ROOT/tables, beside the runs the tables come from; the shipped tables in results/ change only when
you name that folder (`--out results`), as scripts/fashion_mnist.sh does.

Rows group records by dataset, method, backbone, epoch, evaluation and protocol; metrics are percentages, mean ±
std over seeds with n. Published numbers (results/published.csv) stand beside ours where method, dataset,
evaluation and epochs match. A corrupt line in a metrics.jsonl is skipped with a warning naming file and line.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from clusterlab import config, results
from clusterlab.errors import ConfigError, run_cli

PUBLISHED_COLUMNS = ("method", "dataset", "eval", "epochs", "metric", "value", "source", "protocol")


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="collect_results.py")
    parser.add_argument("--root", default="runs", help="directory searched (recursively) for metrics.jsonl")
    parser.add_argument("--out", default=None,
                        help="where the tables and plots go (default ROOT/tables; results/ only when named)")
    parser.add_argument("--published", default="results/published.csv", help="published numbers ('' for none)")
    parser.add_argument("--plots", type=config.bool_flag, default=True, help="metric-against-epochs PNGs")
    return parser


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    if not Path(args.root).is_dir():
        raise ConfigError(f"--root {args.root!r} is not a directory")
    published = read_published(args.published, get_args_parser().get_default("published"))
    warnings.simplefilter("always")
    warnings.formatwarning = lambda message, *rest: f"warning: {message}\n"
    frame = results.records_frame(results.read_records(args.root))
    if frame.empty:
        print(f"no metrics records under {args.root}")
        return
    out = Path(args.root) / "tables" if args.out is None else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for dataset, rows in frame.groupby("dataset", sort=True):
        table = results.attach_published(results.aggregate(rows), published)
        shown = results.display_table(table)
        markdown = shown.to_markdown(index=False) if _has_tabulate() else _markdown(shown)
        reference = results.published_for(published, dataset, set(rows["method"]))
        if reference is not None:
            markdown += ("\n\nPublished numbers for these methods (their own protocols; `diff` above where epochs "
                         "match):\n\n" + (reference.to_markdown(index=False) if _has_tabulate() else _markdown(reference)))
        print(f"\n## {dataset}\n\n{markdown}")
        table.to_csv(out / f"{dataset}.csv", index=False)
        (out / f"{dataset}.md").write_text(f"# {dataset}\n\n{markdown}\n")
        (out / f"{dataset}.tex").write_text(shown.to_latex(index=False, escape=True))
        if args.plots:
            results.plot_against_epochs(table, out, dataset)
    print(f"\ntables written to {out}/")


def read_published(path: str, default: str):
    """The published numbers: none for '' or a missing default file; a named file must exist and have the columns."""
    import pandas as pd

    if not path or (path == default and not Path(path).is_file()):
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--published {path!r} does not exist (give a CSV file, or '' for no published numbers)")
    published = pd.read_csv(path)
    missing = [c for c in PUBLISHED_COLUMNS if c not in published.columns]
    if missing:
        raise ConfigError(f"--published {path!r} lacks the column(s) {', '.join(missing)} "
                          f"(expected: {', '.join(PUBLISHED_COLUMNS)})")
    return published


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def _markdown(frame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


if __name__ == "__main__":
    run_cli(main)
