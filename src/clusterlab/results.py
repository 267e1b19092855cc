"""Metrics records: one JSON object per evaluation, appended to RUN/metrics.jsonl; read back for the tables.

A record (DESIGN.md): run, method, dataset, split, backbone, epoch, checkpoint, seed, eval (knn | linear | cluster |
kmeans), protocol (the settings that make numbers comparable) and metrics, plus when it was created.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from .models import backbone_label

PROTOCOL_COLUMNS = ("fit_on", "features", "k", "temperature", "train_features", "selection", "superclass",
                    "clusters", "mapping", "head", "augmentation", "epochs")


def make_record(args, *, eval_kind: str, protocol: dict, metrics: dict, epoch: int | None, checkpoint_name: str | None,
                run: str, split: str = "test") -> dict:
    from .engine import now_iso

    return {"run": run, "method": args.method, "dataset": args.dataset, "split": split,
            "backbone": backbone_label(args.arch, args.width) if getattr(args, "arch", None) else "none",
            "epoch": epoch, "checkpoint": checkpoint_name, "seed": getattr(args, "seed", None), "eval": eval_kind,
            "protocol": protocol, "metrics": metrics, "created": now_iso()}


def append_record(run_dir: str | os.PathLike, record: dict) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_records(root: str | os.PathLike) -> list[dict]:
    """Every well-formed record under `root`; a corrupt or partial line is skipped with a warning naming it."""
    records = []
    for path in sorted(Path(root).rglob("metrics.jsonl")):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
                    raise ValueError("not a metrics record")
            except ValueError as err:
                warnings.warn(f"{path}:{number}: skipped ({err})", stacklevel=2)
                continue
            record["_file"] = str(path)
            records.append(record)
    return records
