"""The demo's report: report.md (images beside it), report.html (images embedded), summary.json, a console table."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.recipes.demo_data import CORRUPTED, OFF_DOMAIN


def _verdict(scalebio: dict) -> str:
    learned, uniform = scalebio["learned"], scalebio["uniform"]
    better_loss = learned["test_loss"] < uniform["test_loss"]
    better_exact = learned["exact_match"] > uniform["exact_match"]
    if better_loss and learned["exact_match"] >= uniform["exact_match"]:
        return "SFT on the learned mix beat the uniform mix on the target's held-out loss" + (
            " and exact-match accuracy." if better_exact else " (exact-match accuracy tied).")
    return ("At this scale SFT on the learned mix did **not** beat the uniform mix on both measures (loss "
            f"{learned['test_loss']:.4f} vs {uniform['test_loss']:.4f}, exact match {learned['exact_match']:.3f} vs "
            f"{uniform['exact_match']:.3f}); a few optimizer steps on a 135M model are within noise.")


def _weights_order(weights: dict) -> str:
    clean = [w for name, w in weights.items() if name not in (CORRUPTED, OFF_DOMAIN)]
    noisy = [weights[CORRUPTED], weights[OFF_DOMAIN]]
    if max(noisy) < min(clean):
        return "The corrupted and off-domain sources ended below every clean source."
    return "The corrupted and off-domain sources did **not** both end below every clean source in this run."


def _markdown(config, preset, scalebio, first) -> tuple[str, list[tuple[str, str]]]:
    weights = scalebio["weights"]
    images = [("Source weights during reweighting", "scalebio/reweight/plots/weights.png"),
              ("ScaleBiO losses", "scalebio/reweight/plots/losses.png"),
              ("Teacher before re-calibration", "first/calibrate/plots/reliability-before.png"),
              ("Teacher after re-calibration", "first/calibrate/plots/reliability-after.png"),
              ("Student, fine-tuned (SFT)", "first/eval-mcq-student_sft/plots/reliability.png"),
              ("Student, FIRST", "first/eval-mcq-student_first/plots/reliability.png")]
    calibration = first["calibration"]
    lines = [
        f"# lmrefinery demo — {config.model}, preset `{config.preset}`", "",
        "## ScaleBiO: which data sources help the target (basic_arithmetic)?", "",
        "| source | learned weight |", "|---|---:|",
        *[f"| {name} | {w:.4f} |" for name, w in sorted(weights.items(), key=lambda kv: -kv[1])], "",
        _weights_order(weights), "",
        "| model | target test loss | exact match (reasoning-gym) | mean score |", "|---|---:|---:|---:|",
        *[f"| {label} | {scalebio[key]['test_loss']:.4f} | {scalebio[key]['exact_match']:.3f} | "
          f"{scalebio[key]['mean_score']:.3f} |"
          for label, key in (("base model", "base"), ("SFT on the uniform mix", "uniform"),
                             ("SFT on the learned mix", "learned"))], "",
        _verdict(scalebio), "",
        "## FIRST: a smaller student that is accurate and calibrated", "",
        f"Teacher re-calibration (probability temperature c = {calibration['temperature']:g}): token-level ECE "
        f"{calibration['ece_before']:.4f} as is → {calibration['ece_after']:.4f} after "
        f"({calibration['ece_at_temperature_1']:.4f} at c = 1), on {calibration['positions']} held-out positions.", "",
        "| model | accuracy | ECE | option accuracy | option ECE | Brier (options) | NLL |", "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {label} | {first[key]['full_vocabulary']['accuracy']:.3f} | {first[key]['full_vocabulary']['ece']:.4f} | "
          f"{first[key]['options']['accuracy']:.3f} | {first[key]['options']['ece']:.4f} | "
          f"{first[key]['options']['brier']:.4f} | {first[key]['full_vocabulary']['nll']:.4f} |"
          for label, key in (("teacher (fine-tuned)", "teacher"), ("student, SFT", "student_sft"),
                             ("student, FIRST", "student_first"))], "",
        f"Multiple-choice test: {first['teacher']['items']} items; accuracy and ECE use the top-1 next token over the "
        "full vocabulary and its probability (the paper's definition); the option columns renormalise over the "
        "option letters.", "",
        "## Plots", "", *[f"![{title}]({path})" for title, path in images], "",
        "## Rerun at a larger scale on your own model",
        "", "Every stage's resolved config is in its directory (`config.yaml`); for example:", "", "```bash",
        "lmrefinery reweight --config demo-out/scalebio/reweight/config.yaml output_dir=runs/reweight "
        "model.name_or_path=YOUR_MODEL train.steps=200",
        "lmrefinery mix --config demo-out/scalebio/mix-learned/config.yaml output_dir=runs/mix "
        "weights=runs/reweight/weights.json num_examples=20000",
        "lmrefinery teacher --config demo-out/first/cache/config.yaml output_dir=runs/cache model.name_or_path=YOUR_TEACHER",
        "lmrefinery distill --config demo-out/first/student-first/config.yaml output_dir=runs/student cache=runs/cache",
        "```", "",
        "Sizes of this preset: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in preset.items())
        + ".", ""]
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
            elif line.startswith("!["):
                title, path = line[2:].split("](")
                file = root / path.rstrip(")")
                if file.exists():
                    data = base64.b64encode(file.read_bytes()).decode()
                    body.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                                f"<figcaption>{html.escape(title)}</figcaption></figure>")
            elif line.strip():
                text = html.escape(line).replace("**", "")
                body.append(f"<p>{text}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px}"
             "th{background:#f2f4f8}td:not(:first-child){text-align:right}figure{display:inline-block;margin:8px;"
             "width:47%}figure img{width:100%}figcaption{text-align:center;color:#555}pre{background:#f6f6f6;"
             "padding:10px;overflow-x:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lmrefinery demo</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>")


def write_report(out: Path, config, preset: dict, paths: dict, scalebio: dict, first: dict) -> dict:
    markdown_text, images = _markdown(config, preset, scalebio, first)
    atomic_write_text(out / "report.md", markdown_text)
    atomic_write_text(out / "report.html", _html(markdown_text, images, out))
    summary = {"model": config.model, "preset": config.preset, "scalebio": scalebio,
               "first": {k: v for k, v in first.items() if k != "calibration"},
               "calibration": {k: first["calibration"][k] for k in ("temperature", "ece_before", "ece_after",
                                                                   "ece_at_temperature_1", "positions")}}
    atomic_write_json(out / "summary.json", summary)
    console = "\n".join(["", f"Report: {out / 'report.html'} (and report.md, summary.json)", "",
                         *[line for line in markdown_text.splitlines() if line.startswith("|")
                           or line.startswith("The corrupted") or line.startswith("SFT on") or line.startswith("At this")
                           or line.startswith("Teacher re-calibration")]])
    return {"summary": summary, "console": console}
