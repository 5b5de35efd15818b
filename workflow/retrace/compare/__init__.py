"""Distances between parameter sets: θ Cos and L2 in float64, over a run and across generations.

    similarity   ``compare_params``: θ Cos, 1 − θ Cos, L2 streamed tensor by tensor, per-tensor rows
    run          a cell's checkpoints against the published ones at the same steps (``compare-run``)
    cross        a published model against other repos at the same steps (``cross-compare``)

The report reads the tables these write; nothing here imports the report. This file is torch-free.
"""

#: Columns of a similarity row (one checkpoint against its published counterpart). ``a`` is the
#: reproduction, ``b`` the published reference.
METRICS = ("cos", "one_minus_cos", "l2", "n_params", "norm_a", "norm_b", "max_abs_diff")
