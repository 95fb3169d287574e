"""experiments/analysis.ipynb runs (nbclient) on a generated results tree and shows the report's figures,
per dataset: nothing averaged across datasets."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from conftest import run_notebook
from test_report import PAPER_BB, write_run

from feclip import report

# A two-axis study (taps x protocol) and a one-variant study: 2 seeds each, three evaluated datasets.
PROTOCOLS = {"visa_to_mvtec": ("visa", ["mvtec"]), "mvtec_to_visa": ("mvtec", ["visa", "btad"])}


def write_tree(root: Path) -> Path:
    """Two taps sets over both protocols (three panels) and a one-variant study, two seeds each."""
    for t, taps in enumerate(["spread3", "last4"]):
        for protocol, (train, targets) in PROTOCOLS.items():
            variant = f"protocol={protocol},taps={taps}"
            for seed in (42, 123):
                values = {}
                for d, dataset in enumerate(targets):
                    for c, category in enumerate(report.official_categories(dataset)[:2]):
                        for m, metric in enumerate(report.MAIN_METRICS):
                            values[(dataset, category, metric)] = (
                                0.7 + 0.05 * m - 0.02 * t + 0.01 * (c + d + seed % 3)
                            )
                write_run(root, "taps", variant, seed, train, values, backbone=PAPER_BB)
    for seed in (42, 123):
        write_run(root, "bench", "default", seed, "mvtec", {("btad", "01", "image_auroc"): 0.9 - seed * 1e-4})
    return root


def png_text(data: str) -> dict[str, str]:
    """The text chunks of a base64 PNG (the report writes its panels and labels there)."""
    from PIL import Image

    return dict(Image.open(io.BytesIO(base64.b64decode(data))).text)


def test_the_notebook_shows_the_reports_figures_per_dataset(tmp_path):
    nb = run_notebook(write_tree(tmp_path / "results"))
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "FECLIP_RESULTS" in parameters[0].source
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [png_text(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    # the report's own figures: one per study and metric (4 main metrics of taps, 1 of bench)
    titles = [f["Title"] for f in figures]
    assert sum(t.startswith("study taps: ") for t in titles) == 4
    assert "study taps: PRO (zsad, FPR<0.3)" in titles and "study bench: image AUROC" in titles
    for figure in figures:
        if figure["Title"].startswith("study taps"):
            # a panel per evaluated dataset (and training set), never one averaged over datasets
            assert json.loads(figure["feclip.panels"]) == [
                "mvtec (trained on visa)",
                "visa (trained on mvtec)",
                "btad (trained on mvtec)",
            ]
            assert json.loads(figure["feclip.labels"]) == ["last4", "spread3"]
            assert "± 1 sample std over seeds" in figure["Description"]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "macro, percent" not in text and "averaged over datasets" not in text
    # the per-dataset table: a row per (variant, dataset), columns named as in the figures
    html = "".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "PRO (zsad, FPR&lt;0.3)" in html and "btad" in html and "visa" in html
