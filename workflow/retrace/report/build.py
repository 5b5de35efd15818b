"""The report directory: factor tables, figures, verdict and a self-contained ``index.html``.

Layout of ``out`` (built in a temporary sibling directory and swapped into place when complete, so a
failed run leaves the previous report or nothing, and two concurrent runs each leave a whole report;
``retrace.io.replace_dir``; directory modes follow the umask)::

    index.html                       everything below on one page, figures embedded
    verdict.json, verdict.txt        the closest data variant per model, sign-tested, with evidence
    tables/factor_<axis>.csv         one row per model × axis value: θ Cos, 1 − θ Cos, L2 per data × step
    tables/factor_<axis>.md          the same for people (θ Cos to enough decimals), with the averaging note
    tables/factor_<axis>.html        the same as an HTML fragment
    tables/factors_long.csv          all factor tables in long form (model, factor, value, data, step, ...)
    tables/cells_final.csv           every cell at its final step (axes, θ Cos, L2, last loss if logged)
    tables/cross_generation.{csv,md} only when the tables hold cross_generation.parquet (`retrace
                                     cross-compare`): a published model vs other repos at the same steps
    tables/segments.{csv,md}         only for a study with segments (``retrace.report.segments``): each
                                     segment per data variant at its end step, bit-for-bit count, verdict
    tables/references.csv            only with ``references``: each fetched reference's repo, step,
                                     commit and whether it was verified (``retrace.checkpoints.record``)
    figures/trajectory_<model>.png   1 − θ Cos and L2 over steps, one line per data variant
    figures/evidence_<model>.png     where the evidence is: data gap and noise floor over steps
    figures/anchored_<model>.png     re-anchored segments vs free-running runs (cells with reanchor: true)
    figures/factor_<axis>_<model>.png  the same split by one factor's values
"""

from __future__ import annotations

import base64
import contextlib
import html
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from retrace.compare import cross as CROSS
from retrace.errors import RetraceError
from retrace.io import default_dir_mode, replace_dir, write_json
from retrace.report import generations, provenance
from retrace.report import segments as SEG
from retrace.report import tables as T
from retrace.report.evidence import split_anchored
from retrace.report.evidence_figures import anchored_figure, evidence_figure
from retrace.report.frames import DATA, MODEL, axis_columns, fmt_cos, fmt_num, read_parquet, show
from retrace.report.trajectories import factor_figure, figure_name, trajectory_figure
from retrace.report.verdict import reproduced_phrase, verdict_json, verdict_text, verdicts

SIMILARITY_COLUMNS = ("cell", "step", "cos", "one_minus_cos", "l2", MODEL, DATA)
MARKER = "verdict.json"  # a directory holding it is a retrace report and may be replaced


def load_similarity(tables: Path) -> pd.DataFrame:
    sim = read_parquet(tables / "similarity.parquet", SIMILARITY_COLUMNS, "aggregated similarity table")
    if sim.empty:
        raise RetraceError(f"{tables / 'similarity.parquet'}: no rows")
    sim["step"] = sim["step"].astype("int64")
    return sim


def cells_final(sim: pd.DataFrame, train_log: pd.DataFrame | None) -> pd.DataFrame:
    """Each cell's row at its last step, with the last logged loss when the train log has one."""
    last = sim.loc[sim.groupby("cell")["step"].idxmax()]
    cols = ["cell", *axis_columns(sim), "step", "cos", "one_minus_cos", "l2"]
    out = last[cols].reset_index(drop=True)
    if train_log is not None and {"cell", "step", "loss"} <= set(train_log.columns):
        final_loss = train_log.sort_values("step").groupby("cell")["loss"].last()
        out["last_loss"] = out["cell"].map(final_loss)
    return out.sort_values(["model", "cell"]).reset_index(drop=True)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:90em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
caption{caption-side:bottom;text-align:left;font-size:.85em;color:#555;padding-top:.3em}
pre{background:#f6f6f6;padding:1em;white-space:pre-wrap;font-size:.85em}
img{max-width:100%;border:1px solid #ddd}
.verdict-summary li{margin:.3em 0}
"""


def _index_html(
    sim: pd.DataFrame, vs, verdict_txt: str, factor_parts: list[tuple[str, str]],
    final: pd.DataFrame, figures: list[tuple[str, Path]], steps: Sequence[int],
    cross_fragment: str | None = None,
    references_fragment: str | None = None,
    segments_fragment: str | None = None,
    provenance_fragment: str | None = None,
) -> str:
    esc = html.escape
    models = sorted(sim[MODEL].astype(str).unique())
    summary = []
    for v in vs:
        if v.winner is None:
            summary.append(f"<li><b>{esc(v.model)}</b>: no closest variant ({esc('; '.join(v.notes))})</li>")
            continue
        bits = []
        for pw in v.against:
            if pw.n_pairs:
                c = pw.final["one_minus_cos"]
                bits.append(f"vs {esc(pw.second)}: {c.wins}/{c.wins + c.losses} pairs, p = {c.p_value:.4g}")
        label = ""
        if v.documented is not None:
            label = f" — documented as <b>{esc(v.documented)}</b>: {'agrees' if v.label_agrees else 'DISAGREES'}"
        if v.evidence is not None:
            p = v.evidence.p_value
            bits.append(f"over steps ({esc(v.evidence.mode)}): p = {'–' if p is None else f'{p:.4g}'}")
        reproduced = "" if v.evidence is None else f" — {esc(reproduced_phrase(v))}"
        summary.append(
            f"<li><b>{esc(v.model)}</b>: closest data variant <b class=\"winner\">{esc(v.winner)}</b> "
            f"({'; '.join(bits)}){label}{reproduced}</li>"
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>retrace report</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>retrace report</h1>",
        f"<p>{sim['cell'].nunique()} cells, {len(models)} model(s) ({esc(', '.join(models))}), "
        f"data variants {esc(', '.join(map(show, sorted(sim[DATA].astype(str).unique()))))}; "
        f"steps {int(sim['step'].min())}–{int(sim['step'].max())}; chosen steps "
        f"{esc(', '.join(map(str, steps)))}. Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
        '<h2 id="verdict">Verdict</h2>',
        f'<ul class="verdict-summary">{"".join(summary)}</ul>',
        f"<details open><summary>verdict.txt (evidence and method)</summary><pre>{esc(verdict_txt)}</pre></details>",
    ]
    if segments_fragment is not None:
        parts += ['<h2 id="segments">Segments</h2>', segments_fragment]
    parts.append('<h2 id="factors">Factor tables</h2>')
    if not factor_parts:
        parts.append("<p>No axis other than model and data takes more than one value.</p>")
    for factor, fragment in factor_parts:
        parts += [f'<h3 id="factor-{esc(factor)}">{esc(factor)}</h3>', fragment]
    if cross_fragment is not None:
        parts += ['<h2 id="cross-generation">Versus other generations</h2>', cross_fragment]
    if references_fragment is not None:
        parts += ['<h2 id="references">References</h2>', references_fragment]
    if provenance_fragment is not None:
        parts += ['<h2 id="provenance">Provenance: bit-identity and flagged steps</h2>', provenance_fragment]
    parts.append('<h2 id="figures">Figures</h2>')
    for title, path in figures:
        parts.append(f"<figure>{_img(path, title)}<figcaption>{esc(title)}</figcaption></figure>")
    shown = final.copy()
    shown["cos"] = shown["one_minus_cos"].map(fmt_cos)
    shown["one_minus_cos"] = shown["one_minus_cos"].map(fmt_num)
    shown["l2"] = shown["l2"].map(fmt_num)
    if "last_loss" in shown:
        shown["last_loss"] = shown["last_loss"].map(fmt_num)
    shown = shown.rename(columns={"cos": "θ Cos", "one_minus_cos": "1 − θ Cos", "l2": "L2"})
    parts += [
        '<h2 id="cells">Every cell at its final step</h2>',
        T.to_html(shown.map(show)),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _check_replaceable(out: Path) -> None:
    if out.is_symlink():
        raise RetraceError(f"{out}: is a symbolic link; refusing to replace it (give the real directory)")
    if out.exists():
        if not out.is_dir():
            raise RetraceError(f"{out}: exists and is not a directory")
        # Snakemake creates the parent directories of declared outputs before the job: empty ones are fine
        holds_files = any(not p.is_dir() for p in out.rglob("*"))
        if holds_files and not (out / MARKER).exists():
            raise RetraceError(f"{out}: not empty and not a retrace report (no {MARKER}); refusing to replace it")


REFERENCE_COLUMNS = ("repo", "step", "revision", "commit", "verified", "verified_against", "source", "path")


def references_table(references: Sequence[str | os.PathLike] | str | os.PathLike) -> pd.DataFrame:
    """One row per fetched reference file under ``references`` (files or directories): where it came
    from and whether it was verified, read from the file's own metadata."""
    from retrace.checkpoints.record import read_reference_record, reference_files

    rows = []
    for path in reference_files(references):
        rec = read_reference_record(path)
        rows.append({
            "repo": rec.repo or "", "step": rec.step, "revision": rec.revision or "", "commit": rec.commit or "",
            "verified": rec.verified, "verified_against": rec.verified_against, "source": rec.source,
            "path": str(path),
        })
    frame = pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))
    return frame.sort_values(["repo", "step", "path"], na_position="last").reset_index(drop=True)


def _references_html(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p>No fetched reference files found.</p>"
    shown = pd.DataFrame({
        "repo": frame["repo"].map(lambda r: r or "(local)"),
        "step": frame["step"].map(lambda s: "" if pd.isna(s) else str(int(s))),
        "commit": frame["commit"].map(lambda c: c[:12] if c else "—"),
        "verified": [
            f"yes ({against})" if ok else "NO" for ok, against in zip(frame["verified"], frame["verified_against"], strict=True)
        ],
        "source": frame["source"],
    })
    n_bad = int((~frame["verified"].astype(bool)).sum())
    note = (f"{n_bad} of {len(frame)} reference files were not verified against a recorded hash."
            if n_bad else f"All {len(frame)} reference files matched the hashes the Hub records.")
    return T.to_html(shown, caption=note)


def build_report(
    tables: str | Path,
    out: str | Path,
    steps: Sequence[int] | None = None,
    documented: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
    references: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    primary_step: int | None = None,
) -> Path:
    """Write the report for the aggregated tables in ``tables`` to ``out`` (see the module doc).

    ``references``: fetched reference files or directories (``resources/references``) whose provenance
    (repo, step, commit, verified) the report lists.
    """
    tables, out = Path(tables), Path(out)
    _check_replaceable(out)
    sim, anchored = split_anchored(load_similarity(tables))  # the verdict and tables: free-running cells
    steps = T.check_steps(sim, steps) if steps else T.default_steps(sim)
    train_log_path = tables / "train_log.parquet"
    train_log = read_parquet(train_log_path, (), "aggregated train log") if train_log_path.exists() else None
    vs = verdicts(sim, steps, documented, primary_step)
    anchored_vs = []
    if anchored is not None:  # only some models may have re-anchored cells (models.<name>.axes)
        with_anchored = set(anchored["model"].astype(str))
        labels = {m: d for m, d in (documented or {}).items() if m in with_anchored}
        anchored_vs = verdicts(anchored, steps, labels, primary_step)
    cross_path = tables / CROSS.TABLE_NAME
    cross = read_parquet(cross_path, CROSS.COLUMNS, "cross-generation table") if cross_path.exists() else None
    refs = references_table(references) if references is not None else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(default_dir_mode())  # mkdtemp's 0700 would outlive the swap; a plain mkdir's mode
    try:
        (tmp / "tables").mkdir()
        (tmp / "figures").mkdir()
        text = verdict_text(vs)
        if anchored_vs:
            text += "\n" + verdict_text(anchored_vs, title="Re-anchored segments (each published step restarts "
                                         "from the published weights): the closest data variant per model")
        (tmp / "verdict.txt").write_text(text, encoding="utf-8")
        js = {"steps": list(steps), **verdict_json(vs)}
        if anchored_vs:
            js["anchored_models"] = verdict_json(anchored_vs)["models"]
        write_json(tmp / "verdict.json", js)

        factor_parts, longs = [], []
        for factor in T.factors(sim):
            long = T.factor_table(sim, factor, steps)
            if long.empty:
                continue
            longs.append(long)
            note = T.averaging_note(long)
            stem = tmp / "tables" / f"factor_{factor.name}"
            T.wide_numeric(long, factor).to_csv(stem.with_suffix(".csv"), index=False)
            display = T.wide_display(long, factor)
            stem.with_suffix(".md").write_text(
                f"### {factor.name}\n\n{T.to_markdown(display, 1 + len(factor.columns))}\n{note}\n", encoding="utf-8"
            )
            fragment = T.to_html(display, caption=note)
            stem.with_suffix(".html").write_text(fragment, encoding="utf-8")
            factor_parts.append((factor.name, fragment))
        long_all = pd.concat(longs) if longs else pd.DataFrame(columns=T.LONG_COLUMNS)
        long_all.to_csv(tmp / "tables" / "factors_long.csv", index=False)
        final = cells_final(sim, train_log)
        final.to_csv(tmp / "tables" / "cells_final.csv", index=False)
        cross_fragment = None
        if cross is not None:
            cross.to_csv(tmp / "tables" / "cross_generation.csv", index=False)
            (tmp / "tables" / "cross_generation.md").write_text(
                f"### Versus other generations\n\n{generations.to_markdown(cross)}", encoding="utf-8"
            )
            cross_fragment = generations.to_html(cross)
        segments_fragment = None
        seg = SEG.segment_table(sim, vs)
        if not seg.empty:
            seg.to_csv(tmp / "tables" / "segments.csv", index=False)
            (tmp / "tables" / "segments.md").write_text(f"### Segments\n\n{SEG.to_markdown(seg)}", encoding="utf-8")
            segments_fragment = SEG.to_html(seg)
        references_fragment = None
        if refs is not None:
            refs.to_csv(tmp / "tables" / "references.csv", index=False)
            references_fragment = _references_html(refs)

        figures = []
        for v in vs:
            if v.evidence is not None and v.winner is not None:
                path = evidence_figure(v.model, v.winner, v.evidence, tmp / "figures" / figure_name("evidence", v.model))
                figures.append((f"{v.model}: where the evidence is (gap and floor over steps)", path))
        if anchored is not None:
            for model, sub in anchored.groupby(MODEL, sort=True):
                free = sim[sim[MODEL] == model]
                path = anchored_figure(free, sub, tmp / "figures" / figure_name("anchored", str(model)))
                figures.append((f"{model}: re-anchored segments vs free-running runs", path))
        for model, sub in sim.groupby(MODEL, sort=True):
            path = trajectory_figure(sub, tmp / "figures" / figure_name("trajectory", str(model)))
            figures.append((f"{model}: 1 − θ Cos and L2 over steps per data variant", path))
            for factor in T.factors(sub):
                name = figure_name("factor", str(model), factor.name)
                path = factor_figure(sub, factor, tmp / "figures" / name)
                figures.append((f"{model}: 1 − θ Cos and L2 over steps by {factor.name}", path))
        (tmp / "index.html").write_text(
            _index_html(sim, vs, text, factor_parts, final, figures, steps, cross_fragment, references_fragment,
                        segments_fragment, provenance.read_fragment(tables)),
            encoding="utf-8",
        )
        replace_dir(tmp, out, check=_check_replaceable)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):  # a full disk, a read-only dir
            raise RetraceError(f"{out}: could not write the report ({exc.strerror or exc}); the previous report "
                               "is unchanged") from exc
        raise
    for v in vs:
        log(f"report: {v.model}: closest variant {v.winner or 'none'}")
    log(f"report: {out / 'index.html'}")
    return out

