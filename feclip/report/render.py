"""Rendering: the summary and paired tables as Markdown and LaTeX, with their footnotes.

One table per study and averaging: rows variant x backbone x dataset, cells ``91.2 ± 0.3 (5)`` (percent,
mean ± sample std over seeds, number of seeds; :data:`FLAG` marks fewer seeds than the table's usual
count, :data:`INCOMPLETE_FLAG` a macro that does not cover the dataset's official categories), with
paper/gap and study/study gap columns where there are such numbers. A study that ran a peer method
(WinCLIP, APRIL-GAN, AnomalyCLIP) gets a ``method`` column, each row's ``paper`` is its own method's
published number, and a table of the published numbers of FE-CLIP and of the study's peers, labelled
with their source, follows its summary table. The Markdown adds each study's paired differences
(:mod:`feclip.report.paired`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from feclip.report.aggregate import WHY_AUPRO, WHY_PROTOCOL, _mode_count
from feclip.report.backbones import _backbone_labels
from feclip.report.labels import PRO_METRICS, fpr_limit, metric_label, pro_note
from feclip.report.orders import DATASET_ORDER, METRIC_ORDER, _ordered
from feclip.report.paired import CONFIDENCE, PAIRED_COLUMNS
from feclip.report.references import (
    DEFAULT_METHOD,
    PAPER_METHOD,
    PAPER_METHODS,
    PAPER_SETTING,
    is_packaged,
    method_name,
    published_source,
)
from feclip.results import UNKNOWN, is_paper_backbone

__all__ = ["MAIN_METRICS", "format_cell", "format_paired", "render_latex", "render_markdown"]

#: Metrics shown in the tables and study plots by default (the ones the paper reports).
MAIN_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro_zsad")
FLAG = "†"
FLAG_NOTE = "fewer seeds than the other cells"
#: Marks a macro cell whose categories are not the dataset's official list (or differ between seeds).
INCOMPLETE_FLAG = "‡"
DASH = "–"
#: Label columns of the summary and paired tables (left-aligned; the rest are numbers).
_SUMMARY_LABELS = ["variant", "backbone", "train", "dataset"]
#: The same with the method, for a study that ran a peer method.
_METHOD_LABELS = ["variant", "method", "backbone", "train", "dataset"]
#: Label columns of the published numbers table.
_PUBLISHED_LABELS = ["dataset", "method", "source"]
_PAIRED_LABELS = ["A − B", "backbone", "train", "dataset"]
#: The two columns a metric gets in a table when the study's numbers are attached.
STUDY_HEADER = ["study", "study gap"]


def _num(value: float, digits: int = 1) -> str:
    """A number with fixed decimals; ``nan`` shown as a dash."""
    return DASH if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _signed(value: float, digits: int = 1) -> str:
    """A signed number (``+0.4``, ``−0.4`` with a minus sign); ``nan`` shown as a dash."""
    if value is None or math.isnan(value):
        return DASH
    text = f"{value:+.{digits}f}"
    return text.replace("-", "−")


def format_cell(mean: float, std: float, n: int, flagged: bool = False, incomplete: bool = False) -> str:
    """``91.2 ± 0.3 (5)``; std ``–`` for one seed, mean ``nan`` when undefined, ``†`` when flagged (fewer
    seeds), ``‡`` when the macro does not cover the dataset's official categories."""
    mean_text = "nan" if math.isnan(mean) else f"{mean:.1f}"
    marks = (FLAG if flagged else "") + (INCOMPLETE_FLAG if incomplete else "")
    return f"{mean_text} ± {_num(std)} ({n})" + marks


def format_paired(mean: float, low: float, high: float, n: int, distinguishable: bool | None) -> str:
    """``+0.40 [+0.10, +0.70] (5)``; ``[n/a]`` without a CI; wrapped in ``**`` when the CI excludes 0."""
    ci = "[n/a]" if distinguishable is None else f"[{_signed(low, 2)}, {_signed(high, 2)}]"
    text = f"{_signed(mean, 2)} {ci} ({n})"
    return f"**{text}**" if distinguishable else text


def _study_cell(mean: float, std: float) -> str:
    """The study's number: ``90.7 ± 0.3`` with its std, ``95.6`` without, ``–`` when it has none."""
    if mean is None or math.isnan(mean):
        return DASH
    return _num(mean) if std is None or math.isnan(std) else f"{_num(mean)} ± {_num(std)}"


def _limits(cells: pd.DataFrame) -> set[str]:
    """The AUPRO FPR limits the variants of a table ran with (:func:`feclip.report.labels.fpr_limit`)."""
    return {fpr_limit(v) for v in cells["variant"]} if "variant" in cells else set()


def _header(metric: str, limits: set[str]) -> str:
    """A metric's column header: its name, and for an AUPRO which one (``pixel_aupro_zsad: PRO (zsad,
    FPR<0.3)``)."""
    return f"{metric}: {metric_label(metric, limits)}" if metric in PRO_METRICS else metric


def _has_peers(cells: pd.DataFrame) -> bool:
    """Whether some rows of ``cells`` ran another method than FE-CLIP."""
    return "method" in cells and bool((cells["method"] != DEFAULT_METHOD).any())


def _label_columns(cells: pd.DataFrame) -> list[str]:
    """The label columns of a summary table: with ``method`` where a peer ran."""
    return list(_METHOD_LABELS if _has_peers(cells) else _SUMMARY_LABELS)


def _summary_table(
    cells: pd.DataFrame, metrics: Sequence[str], labels: dict[str, str]
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one study table: rows variant x backbone x dataset, a cell per metric (+ paper,
    gap; + study, study gap; both pairs empty where the row is not compared with that reference). A
    study that ran a peer method gets a ``method`` column (the method's published name)."""
    metrics = [m for m in metrics if m in set(cells["metric"])]

    def shown(value_column: str, why_column: str) -> list[str]:
        if value_column not in cells:
            return []
        return [
            m
            for m in metrics
            if cells.loc[cells["metric"] == m, value_column].notna().any()
            or (cells.loc[cells["metric"] == m, why_column] != "").any()
        ]

    with_paper = shown("paper", "not_compared")
    with_study = shown("study_mean", "not_compared_study")
    header = _label_columns(cells)
    with_method = "method" in header
    limits = _limits(cells)
    for m in metrics:
        header += [_header(m, limits)] + (["paper", "gap"] if m in with_paper else [])
        header += STUDY_HEADER if m in with_study else []
    rows = []
    row_keys = ["variant", "backbone", "train_dataset", "dataset"]
    index = cells.set_index(row_keys + ["metric"])
    for (variant, backbone, train, dataset), group in cells.groupby(row_keys, sort=False):
        row = [variant, labels.get(backbone, backbone), train, dataset]
        if with_method:
            row.insert(1, method_name(str(group["method"].iloc[0])))
        for m in metrics:
            key = (variant, backbone, train, dataset, m)
            cell = index.loc[key] if key in index.index else None
            row.append(
                ""
                if cell is None
                else format_cell(
                    cell["mean"], cell["std"], cell["n_seeds"], cell["flagged"], cell["incomplete"]
                )
            )
            if m in with_paper:
                if cell is None or cell["not_compared"]:
                    row += ["", ""]
                else:
                    row += [_num(cell["paper"]), _signed(cell["gap"])]
            if m in with_study:
                if cell is None or cell["not_compared_study"]:
                    row += ["", ""]
                else:
                    row += [_study_cell(cell["study_mean"], cell["study_std"]), _signed(cell["gap_study"])]
        rows.append(row)
    return header, rows


def _study_methods(cells: pd.DataFrame) -> list[str]:
    """FE-CLIP and the methods a study ran, in :data:`PAPER_METHODS` order (others after, by name)."""
    ran = set(cells["method"]) if "method" in cells else set()
    order = list(PAPER_METHODS)
    return sorted(ran | {DEFAULT_METHOD}, key=lambda m: (order.index(m) if m in order else len(order), m))


def _source_cell(published: pd.DataFrame) -> str:
    """The ``source`` column of the published table: the packaged file's source, or another file's name."""
    source = published.attrs.get("source")
    if source is None:
        return ""
    return f"{PAPER_METHOD} paper, Tables 1-2" if is_packaged(source) else Path(source).name


def _published_table(
    cells: pd.DataFrame, published: pd.DataFrame, metrics: Sequence[str]
) -> tuple[list[str], list[list[str]], list[str]]:
    """Header and rows of a study's published numbers: per evaluated dataset, FE-CLIP's and each peer's
    that the study ran (``–``: not reported), and the methods without any number in the file."""
    methods = _study_methods(cells)
    shown = [m for m in metrics if m in set(published["metric"])]
    datasets = _ordered(cells["dataset"], DATASET_ORDER)
    lookup = {
        (method, d, m): v
        for method, d, m, v in published[["method", "dataset", "metric", "paper"]].itertuples(index=False)
    }
    source = _source_cell(published)
    header = list(_PUBLISHED_LABELS) + [_header(m, _limits(cells)) for m in shown]
    rows = []
    for dataset in datasets:
        for method in methods:
            values = [lookup.get((method, dataset, m), math.nan) for m in shown]
            if all(math.isnan(v) for v in values):
                continue
            rows.append([dataset, method_name(method), source] + [_num(v) for v in values])
    absent = [m for m in methods if m not in set(published["method"])]
    return header, rows, absent


def _published_notes(published: pd.DataFrame, absent: Sequence[str]) -> list[str]:
    """Under the published table: where its numbers come from (the file's own comment lines), the
    methods the file has no numbers for."""
    comments = " ".join(c for c in published.attrs.get("comments", []) if c)
    source = published_source(published) or "the paper numbers file"
    text = f"source: {source}"
    if comments:
        text += f', whose comments read: "{comments.rstrip(".")}"'
    notes = [
        text
        + f". {DASH}: not reported. Each row of the summary table is compared with its own method's number."
    ]
    if absent:
        names = ", ".join(method_name(m) for m in absent)
        notes.append(f"no published {PAPER_SETTING} numbers for {names} in {source}: not compared.")
    return notes


def _paired_table(
    pairs: pd.DataFrame, metrics: Sequence[str], labels: dict[str, str]
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one study's paired table: rows pair x backbone x dataset, a cell per metric."""
    metrics = [m for m in metrics if m in set(pairs["metric"])]
    limits = {fpr_limit(v) for v in pd.concat([pairs["variant_a"], pairs["variant_b"]])}
    header = list(_PAIRED_LABELS) + [_header(m, limits) for m in metrics]
    rows = []
    row_keys = ["variant_a", "variant_b", "backbone", "train_dataset", "dataset"]
    index = pairs.set_index(row_keys + ["metric"])
    for (a, b, backbone, train, dataset), _ in pairs.groupby(row_keys, sort=False):
        row = [f"{a} − {b}", labels.get(backbone, backbone), train, dataset]
        for m in metrics:
            key = (a, b, backbone, train, dataset, m)
            if key not in index.index:
                row.append("")
                continue
            p = index.loc[key]
            row.append(
                format_paired(p["mean_diff"], p["ci_low"], p["ci_high"], p["n_shared"], p["distinguishable"])
            )
        rows.append(row)
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], n_labels: int = 4) -> str:
    """A GitHub-flavoured Markdown table (the first ``n_labels`` columns left-aligned)."""
    align = ["---" if i < n_labels else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(r) + " |" for r in [list(header), align, *rows]]
    return "\n".join(lines)


def _typical_seeds(cells: pd.DataFrame) -> int:
    """The most common seed count of a table's cells (0 for an empty table)."""
    return _mode_count(cells["n_seeds"]) if not cells.empty else 0


def _foreign_backbones(cells: pd.DataFrame) -> list[str]:
    """The backbones of ``cells`` that are not the paper's CLIP, sorted."""
    return sorted(b for b in set(cells["backbone"]) if not is_paper_backbone(b))


def _backbone_note(backbones: Sequence[str], labels: dict[str, str]) -> str:
    """The note on rows from a backbone that is not the paper's (random, fallback, other, unknown)."""
    names = ", ".join(labels.get(b, b) for b in backbones)
    text = (
        f"rows from a random/fallback backbone are not compared with the paper: their backbone ({names}) "
        "is not the paper's CLIP, ViT-L/14@336 with OpenAI weights"
    )
    if UNKNOWN in backbones:
        text += (
            f"; {UNKNOWN} = a metrics.csv written before the backbone column, whose CLIP cannot be "
            "told, so it is not comparable either (re-run it to record the backbone)"
        )
    return text + "."


def _table_notes(
    cells: pd.DataFrame,
    paper_label: str | None,
    labels: dict[str, str],
    study_label: str | None = None,
    metrics: Sequence[str] = (),
    source: str | None = None,
) -> list[str]:
    """Footnotes under a summary table: which AUPRO each PRO column is, the seed flag, incomplete macros,
    backbones, the paper and study legends. ``source`` names where the published numbers come from (a
    study that ran a peer: each row's ``paper`` is its own method's)."""
    notes = []
    pro = pro_note(metrics, _limits(cells))
    if pro:
        notes.append(pro)
    withheld_study = (
        cells.loc[cells["not_compared_study"] != "", "not_compared_study"]
        if "not_compared_study" in cells
        else pd.Series(dtype=object)
    )
    with_study = ("study_mean" in cells and cells["study_mean"].notna().any()) or not withheld_study.empty
    references = "the paper or the study" if with_study else "the paper"
    if cells["flagged"].any():
        notes.append(f"{FLAG} {FLAG_NOTE} (most cells have {_typical_seeds(cells)}).")
    incomplete = cells[cells["incomplete"]]
    if not incomplete.empty:
        covered = ", ".join(
            f"{d} {c}" for d, c in dict.fromkeys(zip(incomplete["dataset"], incomplete["categories"]))
        )
        notes.append(
            f"{INCOMPLETE_FLAG} incomplete macro: the categories averaged are not the dataset's official "
            f"list, or differ between seeds ({covered}); never compared with {references}."
        )
    foreign = _foreign_backbones(cells)
    if foreign:
        notes.append(_backbone_note(foreign, labels))
    withheld = cells.loc[cells["not_compared"] != "", "not_compared"]
    if withheld.str.contains(WHY_AUPRO).any():
        notes.append(
            "a PRO of a variant that sets other AUPRO options than the paper's (eval.aupro.fpr_limit other "
            "than 0.3, include_normal=false, per_image_norm=true) is not compared with the paper."
        )
    if withheld.str.contains(WHY_PROTOCOL).any():
        notes.append(
            "rows trained on another auxiliary dataset than the paper's (VisA for mvtec, MVTec AD "
            "otherwise) are not compared with the paper."
        )
    if (cells["paper"].notna().any() or not withheld.empty) and paper_label:
        legend = f"paper: {paper_label}; gap = ours − paper, in points"
        if _has_peers(cells):
            names = ", ".join(method_name(m) for m in _study_methods(cells) if m in set(cells["method"]))
            legend = (
                f"paper: the {PAPER_SETTING} number published for the row's own method ({names})"
                + (f", from {source}" if source else "")
                + "; gap = ours − paper, in points"
            )
        notes.append(legend + ("; empty: not compared (see above)." if not withheld.empty else "."))
    if with_study:
        legend = (
            f"study: the numbers of {study_label or 'a reproduction study'}. A row's study number is the "
            "study's mean (± its std over its seeds, where it gives one) for the row's taps set (named by "
            "the taps= item of its variant), training and evaluated dataset; study gap = ours − study, in "
            f"points; {DASH}: the study has no number for the row (or its variant names no taps set)"
        )
        if not withheld_study.empty:
            legend += "; empty: not compared (another backbone or an incomplete macro, as for the paper)"
        notes.append(legend + ".")
    return notes


def _study_label(study: pd.DataFrame | None) -> str | None:
    """How the notes name a study numbers file: its path and its own comment lines (its settings)."""
    if study is None:
        return None
    source = study.attrs.get("source", "the reproduction study's numbers")
    comments = " ".join(c for c in study.attrs.get("comments", []) if c)
    return f'{source}, whose comments read: "{comments.rstrip(".")}"' if comments else source


def _study_metrics(cells: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    """The requested metrics present in a table; the main ones by default (all when none of them is present)."""
    present = _ordered(cells["metric"], METRIC_ORDER)
    if metrics is None:
        main = [m for m in present if m in MAIN_METRICS]
        return main or present
    return [m for m in metrics if m in present]


def render_markdown(
    summary: pd.DataFrame,
    paired: pd.DataFrame | None = None,
    metrics: Sequence[str] | None = None,
    title: str = "FE-CLIP results",
    paper_label: str | None = f"{PAPER_METHOD} {PAPER_SETTING}",
    study_label: str | None = None,
    published: pd.DataFrame | None = None,
) -> str:
    """The Markdown report: per study a macro table, a micro table when present and the paired table.

    ``study_label`` names the study numbers in the notes (:func:`_study_label`: the file and its
    settings) where the summary carries them. ``published``
    (:func:`~feclip.report.references.load_published_numbers`): a study that ran a peer method also gets
    the published numbers of FE-CLIP and of its peers, labelled with their source.
    """
    labels = _backbone_labels(summary["backbone"])
    source = published_source(published)
    out = [
        f"# {title}",
        "",
        "Percent; mean ± sample std over seeds (number of seeds); per seed, macro = unweighted mean over "
        "the dataset's categories.",
    ]
    foreign = _foreign_backbones(summary)
    if foreign:
        note = _backbone_note(foreign, labels)
        out += ["", f"> **Warning: not the paper's CLIP.** {note[0].upper()}{note[1:]}"]
    for study in sorted(summary["study"].unique()):
        out += ["", f"## Study `{study}`"]
        for averaging, label in (("macro", "macro (paper protocol)"), ("micro", "micro (pooled, ablation)")):
            cells = summary[(summary["study"] == study) & (summary["averaging"] == averaging)]
            if cells.empty:
                continue
            shown = _study_metrics(cells, metrics)
            header, rows = _summary_table(cells, shown, labels)
            n_labels = len(_label_columns(cells))
            out += ["", f"### {label.capitalize()}", "", _markdown_table(header, rows, n_labels)]
            notes = _table_notes(cells, paper_label, labels, study_label, shown, source)
            out += [""] + notes if notes else []
            if averaging == "macro" and published is not None and _has_peers(cells):
                header, rows, absent = _published_table(cells, published, shown)
                notes = _published_notes(published, absent)
                if rows:
                    out += [
                        "",
                        f"### Published numbers ({PAPER_SETTING}): {PAPER_METHOD} and its peers",
                        "",
                        _markdown_table(header, rows, len(_PUBLISHED_LABELS)),
                        "",
                        *notes,
                    ]
                elif absent:
                    out += ["", notes[-1]]
        pairs = paired[paired["study"] == study] if paired is not None and not paired.empty else None
        if pairs is not None and not pairs.empty:
            shown = _study_metrics(pairs, metrics)
            header, rows = _paired_table(pairs, shown, labels)
            intro = (
                f"Cells: A − B in points, the mean of the per-seed differences over the seeds both share "
                f"[{CONFIDENCE:.0%} CI, Student t, n−1 dof] (n shared seeds), within one backbone. "
                "**Bold**: the CI excludes 0, the difference is distinguishable from seed noise; n/a: fewer "
                "than 2 shared seeds."
            )
            context = [c for c in pairs.columns if c not in PAIRED_COLUMNS and (pairs[c] != "").any()]
            if context:
                intro += (
                    " B is the baseline variant with the same "
                    + ", ".join(f"`{c}`" for c in context)
                    + " as A (a column of paired.csv)."
                )
            out += [
                "",
                "### Paired differences",
                "",
                intro,
                "",
                _markdown_table(header, rows, len(_PAIRED_LABELS)),
            ]
            pro = pro_note(shown, {fpr_limit(v) for v in pd.concat([pairs["variant_a"], pairs["variant_b"]])})
            out += ["", pro] if pro else []
    return "\n".join(out) + "\n"


_TEX_REPLACEMENTS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"$^\dagger$",
    "‡": r"$^\ddagger$", "–": "--", "−": "$-$", "<": "$<$", ">": "$>$",
}  # fmt: skip


def _tex(text: str) -> str:
    """Escape a cell for LaTeX (and typeset ±, †, ‡, dashes and minus signs)."""
    return "".join(_TEX_REPLACEMENTS.get(ch, ch) for ch in str(text))


def _latex_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    caption: str,
    notes: Sequence[str],
    n_labels: int = 4,
) -> str:
    """A booktabs tabular with a comment line naming it and the notes as last rows."""
    spec = "l" * n_labels + "r" * (len(header) - n_labels)
    lines = [
        f"% {caption}",
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(map(_tex, header)) + r" \\",
    ]
    lines.append(r"\midrule")
    lines += [" & ".join(map(_tex, row)) + r" \\" for row in rows]
    lines.append(r"\bottomrule")
    lines += [f"\\multicolumn{{{len(header)}}}{{l}}{{\\footnotesize {_tex(n)}}} \\\\" for n in notes]
    lines.append(r"\end{tabular}")
    return "\n".join(lines)


def render_latex(
    summary: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    paper_label: str | None = f"{PAPER_METHOD} {PAPER_SETTING}",
    study_label: str | None = None,
    published: pd.DataFrame | None = None,
) -> str:
    """The summary tables as LaTeX tabulars (booktabs), one per study and averaging; with ``published``,
    a study that ran a peer method also gets the published numbers table (as the Markdown)."""
    labels = _backbone_labels(summary["backbone"])
    source = published_source(published)
    blocks = [
        "% feclip-report: percent, mean +- sample std over seeds (n seeds). Needs \\usepackage{booktabs}."
    ]
    for study in sorted(summary["study"].unique()):
        for averaging in ("macro", "micro"):
            cells = summary[(summary["study"] == study) & (summary["averaging"] == averaging)]
            if cells.empty:
                continue
            shown = _study_metrics(cells, metrics)
            header, rows = _summary_table(cells, shown, labels)
            notes = _table_notes(cells, paper_label, labels, study_label, shown, source)
            caption = f"study {study}, {averaging}"
            blocks.append(_latex_table(header, rows, caption, notes, len(_label_columns(cells))))
            if averaging == "macro" and published is not None and _has_peers(cells):
                header, rows, absent = _published_table(cells, published, shown)
                if rows:
                    caption = f"study {study}, published {PAPER_SETTING} numbers"
                    notes = _published_notes(published, absent)
                    blocks.append(_latex_table(header, rows, caption, notes, len(_PUBLISHED_LABELS)))
    return "\n\n".join(blocks) + "\n"
