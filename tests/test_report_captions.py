"""The captions `snakemake --report` shows beside each output: valid reStructuredText, Jinja-safe."""

from pathlib import Path

import pytest

docutils_core = pytest.importorskip("docutils.core")

CAPTIONS = sorted((Path(__file__).resolve().parents[1] / "workflow" / "report").glob("*.rst"))


def test_the_captions_exist():
    names = {p.name for p in CAPTIONS}
    assert {"workflow.rst", "cells.rst", "similarity.rst", "report.rst", "verdict.rst", "factor_tables.rst",
            "trajectories.rst", "similarity_tensors.rst", "train_log.rst"} <= names


@pytest.mark.parametrize("path", CAPTIONS, ids=lambda p: p.name)
def test_caption_is_clean_restructuredtext(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.strip()
    # Snakemake renders captions through Jinja2 first: no stray template syntax
    assert "{{" not in text and "{%" not in text and "{#" not in text
    # halt_level=2: any docutils warning (bad markup, unknown role, broken reference) is an error
    docutils_core.publish_doctree(text, settings_overrides={"halt_level": 2, "report_level": 2})


SNAKEFILE = """
report: "{captions}/workflow.rst"

rule all:
    input: "results/report/index.html"

rule report:
    output:
        index=report("results/report/index.html", caption="{captions}/report.rst", category="Report"),
        verdict=report("results/report/verdict.txt", caption="{captions}/verdict.rst", category="Report"),
        table=report("results/report/tables/factor_parallel.csv", caption="{captions}/factor_tables.rst",
                     category="Tables"),
        figures=report(directory("results/report/figures"), patterns=["{{name}}.png"],
                       caption="{captions}/trajectories.rst", category="Figures"),
    shell:
        "retrace report --tables tables --out results/report"
"""


@pytest.mark.slow
def test_snakemake_report_renders_the_captions(tmp_path: Path):
    """A real `snakemake --report` over real report outputs shows every caption's text."""
    import os
    import shutil
    import subprocess
    import sys

    import pandas as pd

    if shutil.which("retrace", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the retrace entry point is not installed beside this Python")
    pytest.importorskip("snakemake")
    rows = []
    for data, gas, omc in [("std", 1, 1e-4), ("std", 2, 2e-4), ("dd", 1, 3e-4), ("dd", 2, 5e-4)]:
        for step in (1, 2):
            rows.append({"cell": f"m-{data}-{gas}", "model": "m", "data": data, "gpus": 4 // gas, "pdbs": 1,
                         "gas": gas, "seed": 1, "step": step, "cos": 1 - omc * step,
                         "one_minus_cos": omc * step, "l2": 10 * omc * step})  # fmt: skip
    (tmp_path / "tables").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "tables" / "similarity.parquet")
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(captions=CAPTIONS[0].parent))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    snake = [sys.executable, "-m", "snakemake", "--cores", "1"]
    subprocess.run([*snake, "--quiet"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    # the report in the environment scripts/setup.sh makes (retrace[workflow]), not the test environment's
    from workflow_env import blocked_python

    report, report_env = blocked_python("snakemake", "--cores", "1", "--report", "report.html", env=env)
    r = subprocess.run(report, cwd=tmp_path, env=report_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    for phrase in ("pseudo-replicate", "one comparison per matched pair", "complete slices",
                   "the band spans the smallest", "streamed tensor by tensor"):  # fmt: skip
        assert phrase in html, phrase


def test_the_report_dependencies_are_declared_by_the_workflow_extra():
    """`snakemake --report` needs pygments (snakemake's `reports` extra); retrace[workflow] must bring it, and
    the import hook the report test runs under really hides what the test environment alone has."""
    import subprocess

    from workflow_env import blocked_python, closure, declared

    pytest.importorskip("snakemake")
    reach = closure(declared("workflow"))
    assert {"snakemake", "pygments", "jinja2", "docutils"} <= reach
    assert "pytest" not in reach and "transformers" not in reach
    argv, env = blocked_python("json.tool", "--help")  # any module: the hook itself
    code = "import pygments, snakemake\ntry:\n    import pytest\nexcept ModuleNotFoundError:\n    print('blocked')"
    r = subprocess.run([*argv[:2], argv[2].replace("module, sys.argv = sys.argv[1], sys.argv[1:]\n"
                                                   "runpy.run_module(module, run_name=\"__main__\", alter_sys=True)",
                                                   code)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "blocked", r.stderr
