# Similarity: ONE job per cell over all its checkpoints (not one per step: 154 steps × 500 cells would
# be 77,000 jobs), against the published checkpoints fetched once per (repo, step) into resources/.


rule compare:
    input:
        unpack(compare_inputs),
    output:
        table="results/runs/{cell}/similarity.parquet",
        tensors="results/runs/{cell}/similarity_tensors.parquet",
    log:
        "results/logs/compare/{cell}.log",
    params:
        env=cell_env,
        run="results/runs/{cell}",
        reference=compare_reference,
        reference_dir=compare_reference_dir,
    threads: 1
    conda:
        TOOLS_ENV
    shell:
        logged(
            "env {params.env} {RETRACE} compare-run --run {params.run:q} --reference {params.reference:q}"
            " --reference-dir {params.reference_dir:q} --out {output.table:q} --tensors-out {output.tensors:q}"
        )


# Versus other generations (optional study key `cross_generation`): each listed published model against
# other repos at the same steps (`retrace cross-compare`), one table for the report's "Versus other
# generations" section. A step that a repo lacks is recorded as missing, not a failure. Where Snakemake
# runs (localrule): it reads the Hub (or the hub cache of local references), like the audit.
CROSS_GENERATION_TABLE = "results/tables/cross_generation.parquet"


def cross_generation_entries():
    """The `cross_generation` entries with their steps filled in (default: the study's compared steps)."""
    default = sorted({s for cell in STUDY.cells() for s in cell.checkpoint_steps()})
    return [
        {"model": e["model"], "against": list(e["against"]), "steps": sorted(set(e.get("steps") or default))}
        for e in STUDY.config.get("cross_generation") or []
    ]


def cross_generation_targets():
    """The table when the study sets `cross_generation` (an optional input of the report), else none."""
    return [CROSS_GENERATION_TABLE] if cross_generation_entries() else []


def _cross_models(entry):
    repos = {entry["model"], *entry["against"]}
    return [m for m in STUDY.models.values() if m.reference in repos]


def cross_generation_published(wildcards):
    """Built local references are read once published into their hub cache."""
    return sorted({r for e in cross_generation_entries() for m in _cross_models(e) for r in built_record(m)})


def write_cross_generation(path, log_path):
    import tempfile

    import pandas as pd

    from retrace.io import write_parquet

    Path(log_path).write_text("")
    frames = []
    with tempfile.TemporaryDirectory(prefix=".cross_generation.", dir=Path(path).parent) as tmp:
        for i, entry in enumerate(cross_generation_entries()):
            caches = sorted({m.hub_cache for m in _cross_models(entry) if m.is_local})
            if len(caches) > 1:
                raise ValueError(f"cross_generation[{i}]: repos in several local hub caches ({', '.join(caches)})")
            env = f"HF_HUB_CACHE={shlex.quote(caches[0])} HF_HUB_OFFLINE=1" if caches else ""
            part = Path(tmp) / f"{i}.parquet"
            shell(
                f"env {env} {RETRACE} cross-compare {shlex.quote(entry['model'])}"
                f" --against {shlex.join(entry['against'])} --steps {','.join(map(str, entry['steps']))}"
                f" --out {shlex.quote(str(part))} >> {shlex.quote(str(log_path))} 2>&1"
            )
            frames.append(pd.read_parquet(part))
    write_parquet(path, pd.concat(frames, ignore_index=True))


rule cross_generation:
    input:
        published=cross_generation_published,
    output:
        report(
            CROSS_GENERATION_TABLE,
            caption="../report/similarity.rst",
            category="Tables",
            labels={"table": "versus other generations"},
        ),
    log:
        "results/logs/cross_generation/cross_generation.log",
    params:
        # the entries (repos and steps): changing them reruns the table
        entries=cross_generation_entries(),
    localrule: True
    run:
        write_cross_generation(output[0], log[0])
