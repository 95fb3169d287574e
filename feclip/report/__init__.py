"""Results tree -> summary tables, paired seed comparisons and plots (the library behind ``feclip-report``).

Reads every ``<results_dir>/<study>/<variant>/seed=<seed>/metrics.csv`` (the schema of
:mod:`feclip.results`, the legacy 12-column one included) and writes, into the output folder (default
``<results_dir>/report/``):

- ``summary.csv``: tidy, one row per (study, variant, backbone, train_dataset, dataset, averaging,
  metric) with the mean and sample std over seeds, the number of seeds, the categories the macro covers,
  the paper's number and the gap, and (``study_path``) a reproduction study's number, its std and the
  gap to it. ``method`` says which method the variant ran (FE-CLIP or a peer: WinCLIP, APRIL-GAN,
  AnomalyCLIP; from each run's config.yaml, else the variant's ``method=`` item), and ``paper`` is that
  method's published number, never another method's. All numbers in this file and in the tables are in percent (points), as papers print them.
- ``summary.md`` / ``summary.tex``: one table per study (rows variant x backbone x dataset, cells
  ``91.2 ± 0.3 (5)``, with paper/gap and study/study gap columns where there are such numbers), a micro
  (pooled) table when ``__micro__`` rows exist, for a study that ran a peer method the published
  numbers of FE-CLIP and of its peers with their source, and, in the Markdown, the paired differences
  between variants.
- ``paired.csv``: paired differences between the variants of a study (same backbone) over their shared
  seeds, with a 95% Student-t confidence interval; with a baseline (one value of the studied axis,
  ``spread3``), every variant against the baseline variant of the same other axes (``protocol``), a
  column per other axis.
- ``study_<study>_<metric>.png`` (one question per figure: a panel per dataset and training set, a row
  per variant named by its swept values, mean ± 1 sample std over seeds, the paper's number as a line)
  and ``bars_<metric>.png`` (ours vs the paper, per dataset, bars from 0).

Names. A variant is named in the figures by the values of the axes its study varies within a panel
(:func:`variant_labels`: ``protocol=visa_to_mvtec,taps=spread3`` -> ``spread3``), and every AUPRO by
which one it is (:func:`metric_label`: ``PRO (zsad, FPR<0.3)`` is ``pixel_aupro_zsad``, the paper's PRO;
``AUPRO@0.3 (exact)`` is ``pixel_aupro``).

Aggregation. Per seed, the dataset value of a metric is the unweighted mean over its categories
(``__micro__`` excluded), as :func:`feclip.metrics.macro_average`: by default one undefined (``nan``)
category makes the seed's value ``nan``, so a broken category is never hidden
(``skip_nan=True`` / ``--skip-nan-categories`` averages the defined ones). Across seeds ``nan``
propagates as well. The std is the sample std (ddof=1), undefined for a single seed.

Provenance. The ``backbone`` column (the CLIP that ran) is part of every grouping key, so runs of two
backbones never average together; a random init's seed is dropped from it (:func:`backbone_group`), so
the seeds of a random-backbone study still form one row. Only rows of the paper's CLIP
(:func:`feclip.results.is_paper_backbone`; ``unknown``, the value of legacy files, is not) whose macro
covers exactly the dataset's official categories (:func:`category_coverage`) are compared with the
paper, and the same two rules hold for a reproduction study's numbers (:func:`load_study_numbers`),
which a macro row matches by the taps set its variant name names (:func:`variant_taps`), its training
and evaluated dataset and the metric.

Modules, in the order the data flows: :mod:`~feclip.report.load` (reading and checking the results
tree; :mod:`~feclip.report.backbones` groups and labels its backbones),
:mod:`~feclip.report.references` (the paper's and a study's numbers), :mod:`~feclip.report.aggregate`
(mean ± std over seeds, the comparison with the references), :mod:`~feclip.report.paired` (paired
differences and their CIs), :mod:`~feclip.report.render` (Markdown and LaTeX tables),
:mod:`~feclip.report.plots` (PNGs), :mod:`~feclip.report.labels` (variant and metric names), :mod:`~feclip.report.write` (the whole report, written all or
nothing); :mod:`~feclip.report.orders` holds the display orders (:data:`DATASET_ORDER`) and
:mod:`~feclip.report.errors` :class:`ReportError`. The command line is :mod:`feclip.apps.report`
(``python -m feclip.report`` runs it too).

This package never imports torch (only numpy, pandas, the torch-free dataset registry of
:mod:`feclip.data`, and lazily scipy and matplotlib), so the report runs on a laptop without the
training stack. Nor does it import argparse: options and exit statuses are the app's.
"""

from __future__ import annotations

from feclip.report.aggregate import (
    KEYS,
    SUMMARY_COLUMNS,
    aggregate_seeds,
    category_coverage,
    macro_per_seed,
    micro_per_seed,
    official_categories,
    summarize,
)
from feclip.report.backbones import backbone_group, backbone_label
from feclip.report.errors import ReportError
from feclip.report.labels import (
    AxisRoles,
    axis_roles,
    fpr_limit,
    metric_label,
    variant_axes,
    variant_labels,
)
from feclip.report.load import load_results, run_methods
from feclip.report.orders import DATASET_ORDER, METRIC_ORDER
from feclip.report.paired import CONFIDENCE, PAIRED_COLUMNS, paired_ci, paired_differences
from feclip.report.plots import (
    ERROR_BARS,
    Plot,
    paper_bar_plots,
    render_paper_bars,
    render_studies,
    study_plots,
)
from feclip.report.references import (
    DEFAULT_PAPER,
    PAPER_METHOD,
    PAPER_METHODS,
    PAPER_SETTING,
    PAPER_SOURCE,
    PAPER_TO_OURS,
    STUDY_NUMBERS,
    load_paper_numbers,
    load_published_numbers,
    load_study_numbers,
    method_name,
    paper_train_dataset,
    published_source,
    variant_method,
    variant_taps,
)
from feclip.report.render import MAIN_METRICS, format_cell, format_paired, render_latex, render_markdown
from feclip.report.write import plot_paper_bars, plot_studies, write_report

__all__ = [
    "ReportError",
    "load_results",
    "run_methods",
    "backbone_group",
    "backbone_label",
    "official_categories",
    "category_coverage",
    "macro_per_seed",
    "micro_per_seed",
    "aggregate_seeds",
    "load_paper_numbers",
    "load_published_numbers",
    "published_source",
    "method_name",
    "variant_method",
    "load_study_numbers",
    "variant_taps",
    "paper_train_dataset",
    "summarize",
    "paired_ci",
    "paired_differences",
    "format_cell",
    "format_paired",
    "render_markdown",
    "render_latex",
    "variant_axes",
    "axis_roles",
    "variant_labels",
    "metric_label",
    "fpr_limit",
    "AxisRoles",
    "Plot",
    "study_plots",
    "paper_bar_plots",
    "render_paper_bars",
    "render_studies",
    "plot_paper_bars",
    "plot_studies",
    "write_report",
    "CONFIDENCE",
    "ERROR_BARS",
    "DATASET_ORDER",
    "DEFAULT_PAPER",
    "KEYS",
    "MAIN_METRICS",
    "METRIC_ORDER",
    "PAIRED_COLUMNS",
    "PAPER_METHOD",
    "PAPER_METHODS",
    "PAPER_SOURCE",
    "PAPER_SETTING",
    "PAPER_TO_OURS",
    "STUDY_NUMBERS",
    "SUMMARY_COLUMNS",
]
