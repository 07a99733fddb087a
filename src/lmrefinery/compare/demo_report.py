"""The demo's report: report.md (images beside it), report.html (images embedded), summary.json, a console summary.

The tables and the claims come from `compare`'s results (results.md / results.json in the same directory); the demo
adds the plots of each story and the commands that rerun it at scale.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from lmrefinery.fileio import atomic_write_json, atomic_write_text


def _images(out: Path, seed: int) -> list[tuple[str, str]]:
    candidates = [("Source weights during reweighting", f"mixture/scalebio/seed-{seed}/reweight/plots/weights.png"),
                  ("Mixture methods (95% CI)", "plots/compare-mixture.png"),
                  ("Teacher before re-calibration", "distillation/calibrate/plots/reliability-before.png"),
                  ("Teacher after re-calibration", "distillation/calibrate/plots/reliability-after.png"),
                  ("Student, fine-tuned (SFT)", f"distillation/sft/seed-{seed}/eval/plots/reliability.png"),
                  ("Student, FIRST", f"distillation/first/seed-{seed}/eval/plots/reliability.png"),
                  ("Distillation methods (95% CI)", "plots/compare-distillation.png")]
    return [(title, path) for title, path in candidates if (out / path).exists()]


def _markdown(out: Path, config, results: dict) -> tuple[str, list[tuple[str, str]]]:
    images = _images(out, results["seeds"][0])
    body = (out / "results.md").read_text().splitlines()[2:]  # compare's tables and claims, without its title
    body = [line for line in body if not line.startswith("![")]  # the plots go below, with the others
    lines = [f"# lmrefinery demo — {config.model}, preset `{config.preset}`", "",
             "ScaleBiO learns source weights against the target's validation set; SFT on the learned mix is compared "
             "with SFT on the uniform mix under one token budget. FIRST distils the pretrained model from a "
             "fine-tuned, re-calibrated teacher's top-k cache; it is compared with plain SFT of the same model. "
             "This is the design of the evidence run (docs/results.md) at a smaller size: read the intervals, "
             "not the point values.", "", *body,
             "## Plots", "", *[f"![{title}]({path})" for title, path in images], "",
             "## Rerun at a larger scale on your own model", "",
             "Every stage's resolved config is in its directory (`config.yaml`); the whole comparison's is "
             f"`{out / 'config.yaml'}`:", "", "```bash",
             f"lmrefinery compare --config {out / 'config.yaml'} output_dir=runs/compare seeds=[0,1,2]",
             "lmrefinery compare --config configs/compare-evidence.yaml      # the evidence run (docs/results.md)",
             "```", ""]
    return "\n".join(lines), images


def _html(markdown_text: str, images: list[tuple[str, str]], root: Path) -> str:
    """A self-contained page: headings, tables and paragraphs from the markdown, images inlined as base64."""
    body, table = [], []

    def flush_table():
        if table:
            rows = [r.strip("|").split("|") for r in table if not set(r.replace("|", "").strip()) <= set("-:")]
            head, *rest = rows
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
                        + "</tr></thead><tbody>" + "".join(
                            "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>"
                            for row in rest) + "</tbody></table>")
            table.clear()

    code: list[str] | None = None
    for line in markdown_text.splitlines():
        if line.startswith("```"):
            flush_table()
            if code is None:
                code = []
            else:
                body.append("<pre>" + "\n".join(html.escape(c) for c in code) + "</pre>")
                code = None
        elif code is not None:
            code.append(line)
        elif line.startswith("|"):
            table.append(line)
        else:
            flush_table()
            if line.startswith("# "):
                body.append(f"<h1>{html.escape(line[2:])}</h1>")
            elif line.startswith("## "):
                body.append(f"<h2>{html.escape(line[3:])}</h2>")
            elif line.startswith("### "):
                body.append(f"<h3>{html.escape(line[4:])}</h3>")
            elif line.startswith("!["):
                title, path = line[2:].split("](")
                file = root / path.rstrip(")")
                if file.exists():
                    data = base64.b64encode(file.read_bytes()).decode()
                    body.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                                f"<figcaption>{html.escape(title)}</figcaption></figure>")
            elif line.strip():
                text = html.escape(line).replace("**", "").replace("\\*", "*")
                body.append(f"<p>{text}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px}"
             "th{background:#f2f4f8}td:not(:first-child){text-align:right}figure{display:inline-block;margin:8px;"
             "width:47%}figure img{width:100%}figcaption{text-align:center;color:#555}pre{background:#f6f6f6;"
             "padding:10px;overflow-x:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lmrefinery demo</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>")


def write_report(out: Path, config, results: dict) -> dict:
    markdown_text, images = _markdown(out, config, results)
    atomic_write_text(out / "report.md", markdown_text)
    atomic_write_text(out / "report.html", _html(markdown_text, images, out))
    summary = {"model": config.model, "preset": config.preset, "seeds": results["seeds"], "claims": results["claims"],
               "statistics": results["statistics"]}
    atomic_write_json(out / "summary.json", summary)
    verdicts = [f"  ({c['claim']}) {c['text']}: {'held' if c['held'] else 'did not hold'}" for c in results["claims"]]
    console = "\n".join(["", f"Report: {out / 'report.html'} (and report.md, summary.json)", "",
                         "The papers' claims at the demo's size:", *verdicts])
    return {"summary": summary, "console": console}
