"""Training anytime networks: data (IDX reader, splits, synthetic data), the Trainer,
per-exit metrics, plots, multi-process (DDP) training and the CLI commands.

Heavy pieces import lazily where possible; everything public is re-exported here.
"""

from ann_kernels.train.compare import run_comparison, summary_table
from ann_kernels.train.data import (
    DataSplits,
    holdout_indices,
    load_dataset,
    load_splits,
    read_idx,
    synthetic_dataset,
)
from ann_kernels.train.metrics import ExitOutputs, collect_exit_outputs, evaluate_exits, exit_table, read_jsonl
from ann_kernels.train.plots import plot_anytime, plot_weights
from ann_kernels.train.runs import build_model, build_trainer, load_trained, make_spec
from ann_kernels.train.trainer import TrainConfig, Trainer, load_checkpoint_file, seed_everything

__all__ = [
    "DataSplits", "holdout_indices", "load_dataset", "load_splits", "read_idx", "synthetic_dataset",
    "ExitOutputs", "collect_exit_outputs", "evaluate_exits", "exit_table", "read_jsonl",
    "plot_anytime", "plot_weights",
    "build_model", "build_trainer", "load_trained", "make_spec",
    "TrainConfig", "Trainer", "load_checkpoint_file", "seed_everything",
    "run_comparison", "summary_table",
]
