"""What keeps a 5,000-cell dry run cheap (issue 14 §4), checked for what it must not change: the train
rule's resources declared as constants where every cell shares them (and only then), signatures kept on
the workflow's functions, and the GPU-limit stop that a constant `threads` must not lose."""

from __future__ import annotations

import inspect
import re

import pytest
import yaml

from retrace.placement import VARIES, place, shared_resources
from retrace.signatures import remember_signatures, rule_functions
from snakemake_runner import ROOT, snakemake
from study_factory import synthetic_study

CLUSTER = {"gpus_per_node": 8, "threads_per_rank": 2, "gpu_models": {"a100": "a100_80gb"}, "gpu_constraints": {}}


def test_shared_resources_are_constants_and_the_rest_vary():
    one_node = place(gpus=8, gpu_type="a100", cluster=CLUSTER, rank_tasks=True, stop_signal_s=600)
    two_nodes = place(gpus=16, gpu_type="a100", cluster=CLUSTER, rank_tasks=True, stop_signal_s=600)
    shared = shared_resources([one_node, two_nodes])
    # the same in both: constants; different: VARIES; asked for by neither (tasks, constraint): left out
    assert shared["mpi"] == "srun" and shared["tasks_per_node"] == 8 and shared["cpus_per_task"] == 2
    assert shared["gpu_model"] is VARIES  # None across nodes (in slurm_extra), a100_80gb on one node
    assert shared["gpu"] is VARIES and shared["nodes"] is VARIES and shared["slurm_extra"] is VARIES
    assert "tasks" not in shared and "constraint" not in shared
    # one placement: every resource it sets is a constant of that value
    alone = shared_resources([one_node])
    assert alone == {name: one_node.resource(name) for name in alone} and VARIES not in alone.values()
    assert set(alone) == {"gpu", "gpu_model", "nodes", "tasks_per_node", "mpi", "cpus_per_task", "slurm_extra"}


def test_cpus_per_task_left_to_the_job_threads_varies():
    """A non-mpi placement's cpus_per_task is the job's threads (Placement.resource), known per job."""
    mpi = place(gpus=8, gpu_type="a100", cluster=CLUSTER, rank_tasks=True, stop_signal_s=600)
    cpu = place(gpus=2, gpu_type="cpu", cluster=CLUSTER)
    shared = shared_resources([mpi, cpu])
    assert shared["cpus_per_task"] is VARIES and shared["mpi"] is VARIES and shared["nodes"] == 1
    # no mpi placement at all: no cpus_per_task, no GPU resources
    assert shared_resources([cpu]) == {"nodes": 1}


def test_remembered_signatures_are_read_without_inspecting(monkeypatch):
    from snakemake.common import get_function_params, get_input_function_aux_params

    def resource(wildcards, threads=None, attempt=1):
        return threads

    expected = inspect.signature(resource).parameters
    remember_signatures(functions=[resource])
    monkeypatch.setattr(inspect, "signature", lambda f: pytest.fail("inspected again"))
    assert get_function_params(resource) == expected
    assert get_input_function_aux_params(resource, {"threads": 3, "input": [], "attempt": 1}) == {
        "threads": 3, "attempt": 1}


def test_rule_functions_are_the_ones_compiled_from_the_rule_files(tmp_path):
    code = compile("def here(wildcards):\n    return 1\n", str(tmp_path / "rules" / "common.smk"), "exec")
    namespace = {"inspect": inspect, "signature": inspect.signature}
    exec(code, namespace)
    assert rule_functions(namespace=namespace, directory=tmp_path / "rules") == [namespace["here"]]


def _study(tmp_path, gpu_types, engine="builtin"):
    cfg = synthetic_study("limit", parallel=[{"gpus": 2, "pdbs": 32, "gas": 16}], gpu_type=gpu_types,
                          engine=[engine])
    cfg["axes"]["data"] = ["deduped-raw"]
    if engine == "neox":
        cfg["models"]["pythia-70m-deduped"]["start_step"] = 0
        cfg["neox"] = {"path": "/opt/gpt-neox"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_a_gpu_only_study_still_stops_at_the_gpu_limit(tmp_path):
    """Every cell shares its placement (threads and gpu could be constants); under gpu=0 the workflow
    must still stop naming a cell instead of starting it on no GPU. GPT-NeoX cells: their train command
    reads no placement (no srun launcher), so only the rule's threads can stop them."""
    out = snakemake("-n", "--profile", str(ROOT / "profiles" / "local"), "--configfile",
                    str(_study(tmp_path, ["a100"], engine="neox")), workdir=tmp_path / "wd")
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert re.search(r"cell \S+__g2p32a16__a100__\S+ needs 2 GPUs on one node, but this run allows 0", log), log[-3000:]


def test_a_gpu_only_study_under_the_slurm_profile_asks_the_same_of_every_cell(tmp_path):
    out = snakemake("-n", "--profile", str(ROOT / "profiles" / "slurm"), "--configfile",
                    str(_study(tmp_path, ["a100"])), workdir=tmp_path / "wd")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    blocks = [b for b in re.split(r"\n(?=(?:local)?rule \w+:)", out.stdout) if b.startswith("rule train:")]
    assert blocks
    for block in blocks:
        resources = dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", block)[1].split(", "))
        assert resources["gpu"] == "2" and resources["gpu_model"] == "a100" and resources["nodes"] == "1"
        assert resources["mpi"] == "srun" and resources["tasks_per_node"] == "2" and resources["cpus_per_task"] == "1"
        assert re.fullmatch(r"--signal=USR2@\d+", resources["slurm_extra"])
