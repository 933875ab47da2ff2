"""Analysis of an lth store: tidy DataFrames, summaries and figures. Reads files only, never training code."""

from .runs import NotAStoreError, final_accuracy, instability_table, load_quant, load_runs, load_sparsity, load_stability
from .speed import crossover, load_speed
from .summary import final_rows, paired_differences, per_seed, summarize

__all__ = ["load_runs", "load_sparsity", "load_quant", "final_accuracy", "final_rows", "summarize", "per_seed",
           "paired_differences", "NotAStoreError",
           "load_speed", "crossover", "load_stability", "instability_table"]
