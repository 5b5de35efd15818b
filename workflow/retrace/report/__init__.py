"""Similarity over a run, aggregation over a study, and the study's report.

One module per step of the data flow's last stage:
    compare_run   one cell's checkpoints against the published checkpoints at the same steps
    aggregate     every cell's similarity and train-log Parquet joined with its axes (results/tables/)
    tables        one table per factor (rows = factor values, columns = θ Cos / L2 per data variant)
    trajectories  figures of 1 − θ Cos and L2 over steps (matplotlib, Agg)
    verdict       which data variant each published model's reproductions are closest to, sign-tested
    stats         the exact two-sided sign test
    build         the whole report directory (tables, figures, verdict, index.html)

``frames`` holds what they share: the metric column names and how axis columns are told apart.
"""
