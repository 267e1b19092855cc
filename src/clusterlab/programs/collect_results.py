"""Turn the runs under a directory into result tables and training curves (in --out: CSV, Markdown, LaTeX and plots).

Markdown tables on stdout; per dataset CSV, Markdown, LaTeX and metric-against-epochs plots, and a PNG of training
curves per run, in --out.

    python collect_results.py --root runs/ [--out runs/tables/]

--out defaults to ROOT/tables, beside the runs the tables come from; the shipped tables in results/ change only when
you name that folder (`--out results`; scripts/fashion_mnist.sh writes them aside and moves them there once whole).
`--combined FILE` also writes every dataset's table into the one Markdown file FILE (scripts/small_data.sh:
results/small_data.md).

Tables: every metrics.jsonl under ROOT. Rows group records by dataset, method, backbone, epoch, evaluation and
protocol, and by training recipe: runs whose config.yaml args differ in a flag that changes what is learnt (not the
seed, paths, device or logging; results.NOT_SETTINGS), or whose --pretrained runs differ so, get a row each, with a
`recipe` column after `protocol` naming the flags that differ, present only in a table that needs it. Metrics are
percentages, mean ± std over the runs (seeds) of a row with n. `revision` says whether the code that trained and
evaluated every run of a row was committed: clean, dirty (uncommitted changes to tracked files; the Markdown names
the runs under the table) or unknown (no commit recorded). Published numbers (results/published.csv) stand beside
ours where method, dataset, backbone, evaluation and epochs match. A corrupt line in a metrics.jsonl is skipped with
a warning naming file and line.

Curves (--curves): for every run directory under ROOT with a train_log.jsonl, even one still training,
OUT/curves/RUN.png (RUN: its path below ROOT) shows the loss, the other terms the method logs, the learning rate and
the kNN monitor (`--knn_monitor_every N` when training) against epochs; clusterlab/curves.py reads the log. The PNG
an earlier collection drew there for a run no longer under ROOT is removed (OUT/curves/.drawn_by_collect_results
lists what it drew; nothing else there is touched), as is the OUT/DATASET_METRIC.png of a metric the dataset's
records no longer have, and the tables and plots of a dataset the last collection wrote there that no record under
ROOT is of any more (OUT/.tables_by_collect_results lists the datasets). Every file is written whole or not at all.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

from .. import config, curves, results, rundir
from ..checkpoint import atomic_write_text
from ..errors import ConfigError, one_line, printable

PUBLISHED_COLUMNS = ("method", "dataset", "eval", "epochs", "metric", "value", "source", "protocol")


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="collect_results.py")
    parser.add_argument("--root", type=config.path, default="runs",
                        help="directory searched (recursively) for metrics.jsonl and train_log.jsonl")
    parser.add_argument("--out", type=config.path, default=None,
                        help="where the tables and plots go (default: ROOT/tables; results/ only when named)")
    parser.add_argument("--published", default="results/published.csv", help="published numbers ('' for none)")
    parser.add_argument("--plots", type=config.bool_flag, default=True, help="metric-against-epochs PNGs")
    parser.add_argument("--curves", type=config.bool_flag, default=True,
                        help="a PNG of training curves per run with a train_log.jsonl, in OUT/curves/ (most of the "
                             "time on a root of hundreds of runs: false for the tables alone)")
    parser.add_argument("--combined", type=config.path, default=None,
                        help="also one Markdown file holding every dataset's table (a study over several datasets): a .md "
                             "file, new or written by an earlier --combined")
    return parser


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    if not Path(args.root).is_dir():
        raise ConfigError(f"--root {args.root!r} is not a directory")
    published = read_published(args.published, get_args_parser().get_default("published"))
    if args.combined:
        require_combined_target(Path(args.combined))
    warnings.simplefilter("always")
    warnings.formatwarning = lambda message, *rest: f"warning: {message}\n"
    frame = results.records_frame(results.read_records(args.root))
    logs = results.files_named(args.root, "train_log.jsonl", warn_unreadable=False) if args.curves else []
    if frame.empty and not logs:
        print(f"no metrics records with a usable number{' or training logs' if args.curves else ''} under {args.root}")
        return
    out = Path(args.root) / "tables" if args.out is None else Path(args.out)
    if args.combined and not frame.empty:
        require_apart_from_tables(Path(args.combined), out, sorted(set(frame["dataset"].astype(str))))
    created = not out.exists()
    rundir.make_folder(out, "tables folder", "choose another --out")
    written = []
    datasets = sorted(set(frame["dataset"].dropna().astype(str))) if not frame.empty else []
    remove_stale_tables(out, datasets)
    if not frame.empty:
        sections = write_tables(frame, published, out, args.plots)
        written.append("tables")
        if args.combined:
            atomic_write_text(args.combined, COMBINED_MARK + "\n\n" + "".join(
                f"## {dataset}\n\n{markdown}\n\n" for dataset, markdown in sections).rstrip("\n") + "\n",
                through_links=False)
    if args.curves:
        drawn = write_all_curves(logs, Path(args.root), out / "curves")
        if drawn:
            written.append(f"the training curves of {drawn} run(s) (curves/)")
    if written:
        print(f"\n{' and '.join(written)} written to {out}/")
        if args.combined and not frame.empty:
            print(f"every dataset's table also in {args.combined}")
    else:
        if created:  # (made up front, so that a folder that cannot be is one line before any work)
            with contextlib.suppress(OSError):
                out.rmdir()
        print(f"\nnothing written: no metrics records with a usable number, and no training log with a step, under "
              f"{args.root}")


# The first line of a --combined file: a file without it is never replaced (a Markdown file of one's own notes with a
# "## " heading was).
COMBINED_MARK = "<!-- collect_results.py --combined: every dataset's table, replaced whole by the next --combined -->"


def require_combined_target(path: Path) -> None:
    """--combined writes a Markdown file of its own: never over another file (a checkpoint, a run's records, a
    README), which it replaced whole."""
    if path.suffix.lower() != ".md":
        raise ConfigError(f"--combined {str(path)!r}: the combined tables are one Markdown file; name a .md file")
    if path.is_dir():
        raise ConfigError(f"--combined {str(path)!r} is a directory; name the Markdown file to write")
    if path.exists():
        try:
            with path.open(encoding="utf-8", errors="replace") as file:
                first = file.readline()
        except OSError as err:
            raise ConfigError(f"--combined {str(path)!r} cannot be read ({err.strerror}); it is only ever replaced "
                              f"when it holds combined tables") from None
        if first.rstrip("\n") != COMBINED_MARK:
            raise ConfigError(f"--combined {str(path)!r} exists and does not hold combined tables (their first line "
                              f"is {COMBINED_MARK!r}): name a new file, or remove this one first")


def require_apart_from_tables(path: Path, out: Path, datasets: list[str]) -> None:
    """--combined naming one of the tables --out gets (OUT/DATASET.md) would replace it."""
    for dataset in datasets:
        table = out / f"{dataset}.md"
        if path.resolve() == table.resolve():
            raise ConfigError(f"--combined {str(path)!r} is the table of {dataset} that --out {str(out)!r} gets: "
                              f"name another file")


def write_tables(frame, published, out: Path, plots: bool) -> list[tuple[str, str]]:
    """OUT/DATASET.{md,csv,tex} (and plots) per dataset; returns (dataset, Markdown table) for each."""
    sections = []
    for dataset, rows in frame.groupby("dataset", sort=True):
        rows = results.latest_records(rows)  # the footnote names the runs of the records the table counts
        table = results.attach_published(results.aggregate(rows), published)
        shown = results.display_table(table)
        markdown = _markdown(shown)
        footnote = results.revision_footnote(rows)
        if footnote:
            markdown += "\n\n" + footnote.replace("\n", "\n\n")
        labels = table.get("protocol", [])
        names = set().union({dataset}, *(results.published_names(dataset, label) for label in labels))
        reference = results.published_for(published, names, set(rows["method"]))
        if reference is not None:
            markdown += ("\n\nPublished numbers for these methods (their own protocols; `diff` above where epochs "
                         "match):\n\n" + _markdown(reference))
        print(f"\n## {dataset}\n\n{markdown}")
        sections.append((dataset, markdown))
        # A name read from the file system (a run's checkpoint path) may hold bytes that are not UTF-8.
        # each file whole or as it was (a full disk, a job killed meanwhile); a link in its place is replaced
        texts = (table.drop(columns=[results.SETTINGS_KEY], errors="ignore").to_csv(index=False),
                 f"# {dataset}\n\n{markdown}\n", _latex(shown))
        for suffix, text in zip(TABLE_SUFFIXES, texts):
            atomic_write_text(out / f"{dataset}.{suffix}", text, through_links=False)
        if plots:
            drawn = results.plot_against_epochs(table, out, dataset)
            for stale in {out / f"{dataset}_{metric}.png" for metric in results.METRIC_COLUMNS} - set(drawn):
                stale.unlink(missing_ok=True)  # a metric no record of the dataset has any more
    return sections


TABLE_SUFFIXES = ("csv", "md", "tex")
# In OUT: the datasets whose tables the last collection wrote there (a JSON list), the only tables a later one removes
# (those of a dataset no record under ROOT is of any more, which stood beside the new tables as if still true).
TABLES_LIST = ".tables_by_collect_results"


def remove_stale_tables(out: Path, datasets: list[str]) -> None:
    """Removes OUT/DATASET.{csv,md,tex} and OUT/DATASET_METRIC.png of each dataset the last collection wrote tables
    for and `datasets` (this one's) lacks, saying so, and lists `datasets` for the next collection."""
    listing = out / TABLES_LIST
    earlier = _read_listing(listing)
    for dataset in sorted(set(earlier) - set(datasets)):
        if not isinstance(dataset, str) or not dataset or Path(dataset).name != dataset:
            continue  # not a name this collection writes
        files = [out / f"{dataset}.{suffix}" for suffix in TABLE_SUFFIXES]
        files += [out / f"{dataset}_{metric}.png" for metric in results.METRIC_COLUMNS]
        removed = [file for file in files if file.is_file() and not file.is_symlink()]
        for file in removed:
            file.unlink()
        if removed:
            print(f"the tables of {printable(dataset)} removed from {printable(str(out))}/: no record under the "
                  f"root is of that dataset now")
    if datasets or earlier:
        atomic_write_text(listing, json.dumps(datasets) + "\n", through_links=False)


def _read_listing(listing: Path) -> list:
    """The names an earlier collection listed in `listing`; none where it is missing or not a JSON list."""
    try:
        earlier = json.loads(listing.read_text())
    except (OSError, ValueError):
        return []
    return earlier if isinstance(earlier, list) else []


# In OUT/curves: the PNGs the last collection drew there (a JSON list of their paths below it, which keeps names of
# any bytes), the only files a later one removes (a run gone from ROOT).
DRAWN_LIST = ".drawn_by_collect_results"


def write_all_curves(logs: list[Path], root: Path, folder: Path) -> int:
    """FOLDER/RUN.png for the run of each of `logs`; the PNG an earlier collection drew there for a run no longer
    under ROOT is removed (only those, and only inside FOLDER: it may be a run of its own, or hold other files).
    Returns how many were drawn."""
    listing = folder / DRAWN_LIST
    earlier = _read_listing(listing)
    drawn = [path for log in logs if (path := write_curves(log.parent, root, folder))]
    names = sorted(path.relative_to(folder).as_posix() for path in drawn)
    inside = folder.resolve()
    for name in set(earlier) - set(names):
        stale = folder / str(name)
        if (not str(name).endswith(".png") or Path(name).is_absolute() or not stale.is_file() or stale.is_symlink()
                or not stale.resolve().is_relative_to(inside)):
            continue  # not a PNG this collection draws, or not inside FOLDER (a linked folder's target)
        stale.unlink()
        parent = stale.parent  # the folders of runs below the root that it leaves empty
        with contextlib.suppress(OSError):
            while parent != folder and not parent.is_symlink() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    if names or earlier:
        atomic_write_text(listing, json.dumps(names) + "\n", through_links=False)
    return len(drawn)


def write_curves(run_dir: Path, root: Path, folder: Path) -> Path | None:
    """FOLDER/RUN.png for the run directory `run_dir` (RUN: its path below `root`, under the root's name where the
    root is a run itself, whose probes' logs lie below it); None, with a note, for a log without a training step."""
    below = run_dir.relative_to(root)  # "." for the root itself
    name = Path(root.resolve().name) / below if run_dir == root or (root / "train_log.jsonl").is_file() else below
    try:
        drawn = curves.read_curves(run_dir)
    except OSError as err:  # a link to nowhere, a file without read permission
        warnings.warn(f"{printable(str(run_dir / 'train_log.jsonl'))}: cannot be read ({err.strerror}): no curves "
                      f"for it")
        return None
    if drawn.damaged_lines:
        shown = ", ".join(map(str, drawn.damaged_lines[:3])) + (" ..." if len(drawn.damaged_lines) > 3 else "")
        warnings.warn(f"{printable(str(run_dir / 'train_log.jsonl'))}: {len(drawn.damaged_lines)} line(s) that are "
                      f"not JSON records (line {shown}): left out of its curves")
    if not len(drawn.x):
        print(f"note: {run_dir / 'train_log.jsonl'} holds no training step: no curves for it")
        return None
    path = folder / name.with_name(name.name + ".png")
    title = str(name)
    try:
        run_args = config.read_run_config(run_dir)
        title = f"{run_args.get('method')} on {run_args.get('dataset')}: {name}"
    except (ConfigError, OSError):  # a run directory without a config.yaml it can read still has curves
        pass
    curves.draw(drawn, printable(title), path)
    return path


def read_published(path: str, default: str):
    """The published numbers: none for '' or a missing default file (with a note); a named file must exist and have
    the columns."""
    import pandas as pd

    if not path:
        return None
    if path == default and not Path(path).is_file():
        # The default is relative to where the program runs; elsewhere, the checkout the package runs from holds it.
        root = config.source_checkout()
        found = root / default if root is not None and (root / default).is_file() else None
        if found is None:
            print(f"note: no {default} in {Path.cwd()}: the tables have no published numbers (run from the "
                  f"repository root, or give --published FILE)")
            return None
        path = str(found)
        print(f"published numbers from {path}")
    if not Path(path).is_file():
        missing = "is a folder" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"--published {path!r} {missing} (give a CSV file, or '' for no published numbers)")
    try:
        published = pd.read_csv(path)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ConfigError(f"--published {path!r} is not a CSV file of UTF-8 text ({one_line(err)})") from None
    missing = [c for c in PUBLISHED_COLUMNS if c not in published.columns]
    if missing:
        raise ConfigError(f"--published {path!r} lacks the column(s) {', '.join(missing)} "
                          f"(expected: {', '.join(PUBLISHED_COLUMNS)})")
    for index, row in published.iterrows():
        where = f"--published {path!r}, row {index + 1} below the header"
        if pd.isna(row["metric"]):
            raise ConfigError(f"{where}: no metric (one of: {', '.join(results.METRIC_COLUMNS)})")
        if not _is_number(row["value"]):
            raise ConfigError(f"{where}: value {row['value']!r} is not a number (a percentage such as 84.9)")
        if pd.isna(row["source"]) or not str(row["source"]).strip():
            raise ConfigError(f"{where}: no source (the paper or code the number comes from)")
        for column in ("metric", "compare_to"):
            if column in published and not pd.isna(row[column]) and row[column] not in results.METRIC_COLUMNS:
                raise ConfigError(f"{where}: {column} {row[column]!r} is not a metric of the tables (one of: "
                                  f"{', '.join(results.METRIC_COLUMNS)}{'; or blank' * (column == 'compare_to')})")
        if not pd.isna(row["epochs"]) and not (_is_number(row["epochs"]) and float(row["epochs"]).is_integer()):
            raise ConfigError(f"{where}: epochs {row['epochs']!r} is not a whole number of epochs (or blank, for a "
                              f"baseline)")
    return published


def _is_number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def _markdown(frame) -> str:
    """A Markdown table (tabulate's, aligned, where it is installed); a `|` in a cell (a source such as "Smith |
    Jones") is escaped, or it would split the cell."""
    frame = frame.map(lambda value: value.replace("|", "\\|") if isinstance(value, str) else value)
    if _has_tabulate():
        return frame.to_markdown(index=False)
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# pandas escapes LaTeX's special characters but < > and |, which the default font encoding (OT1) prints as other
# glyphs ("epochs 2->3" as "epochs 2-¿3").
LATEX_TEXT = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
              "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
              ">": r"\textgreater{}", "|": r"\textbar{}"}


def _latex(frame) -> str:
    def text(value) -> str:
        return "".join(LATEX_TEXT.get(ch, ch) for ch in str(value))

    cells = frame.map(lambda value: text(value) if isinstance(value, str) else value)  # numbers as pandas sets them
    cells.columns = [text(column) for column in frame.columns]
    return cells.to_latex(index=False, escape=False)

