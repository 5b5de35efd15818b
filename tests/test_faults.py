"""Faults and bad input, counted: each case is tried and its outcome asserted, and the module's closing note
says how many cases were tried, how many ended in a clear error, and in how many nothing was lost.

In every case a failed step leaves nothing partial that a later run would trust, and the error names the
file, key or step. The cases:

* config fuzz: seeded mutations of config.yaml and studies/*.yaml through ``retrace.grid.load_study``;
* a full disk (a small tmpfs, or RLIMIT_FSIZE where mounting is not permitted) while writing a
  checkpoint, a resume state, a table or the report;
* SIGKILL at seeded points of training and of compare, then a rerun;
* two aggregate runs at once;
* a truncated or bit-flipped reference or checkpoint in the middle of a study.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from config_fuzz import mutate_many, outcome
from interrupted_study import checkpoint_tensors
from test_report_pipeline import compared, study, tables  # noqa: F401 - the report tests' fixtures

ROOT = Path(__file__).resolve().parents[1]

#: kind of case → Counter(tried, clear, kept): filled by the tests, printed at the end of the module.
TALLY: dict[str, Counter] = {}


def count(kind: str, *, clear: bool, kept: bool = True) -> None:
    c = TALLY.setdefault(kind, Counter())
    c["tried"] += 1
    c["clear"] += bool(clear)
    c["kept"] += bool(kept)


@pytest.fixture(scope="module", autouse=True)
def closing_note(request):
    yield
    if not TALLY:
        return
    lines = ["faults: case kind, tried, errors clear (or valid), nothing lost"]
    for kind, c in TALLY.items():
        lines.append(f"  {kind:<28} {c['tried']:>5} {c['clear']:>5} {c['kept']:>5}")
    total = sum(TALLY.values(), Counter())
    lines.append(f"  {'all':<28} {total['tried']:>5} {total['clear']:>5} {total['kept']:>5}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------- config fuzz

SOURCES = [ROOT / "config.yaml", *sorted((ROOT / "studies").glob("*.yaml"))]
FUZZ_CASES = 400


def test_config_fuzz_ends_in_a_valid_study_or_one_clear_error():
    configs = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in SOURCES}
    for name, cfg in configs.items():
        assert outcome(cfg, root=ROOT).kind == "valid", name
    defects, kinds = [], Counter()
    for seed in range(FUZZ_CASES):
        rng = random.Random(seed)
        name = rng.choice(sorted(configs))
        cfg, done = mutate_many(configs[name], rng)
        got = outcome(cfg, root=ROOT)
        kinds[got.kind] += 1
        count("config mutation", clear=got.kind in ("valid", "clear"))
        if got.kind not in ("valid", "clear"):
            defects.append(f"seed {seed} ({name}: {'; '.join(m.describe() for m in done)}): {got.kind}\n{got.message}")
    assert not defects, f"{len(defects)} of {FUZZ_CASES}:\n" + "\n\n".join(defects[:5])
    assert kinds["clear"] > FUZZ_CASES // 2 and kinds["valid"] > 0, kinds  # the mutations really break configs


@pytest.mark.parametrize("text", ["study: [unclosed", "- a list\n- not a mapping\n", "\x00\x01binary", "",
                                  "study: x\n" * 3, "a: &x [*x]", "study: ünï\n☃: 1\n"])
def test_a_broken_study_file_is_one_clear_error(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    got = outcome(str(path), root=ROOT)
    count("broken study file", clear=got.kind == "clear")
    assert got.kind == "clear", got.message
    assert str(path) in got.message


@pytest.mark.parametrize("key", ["axes.steps[0]", "models.tiny-deduped.build.steps", "models.tiny-deduped.train_iters",
                                 "models.tiny-deduped.start_step", "baseline.steps"])
def test_a_huge_step_count_is_refused_naming_the_key(key):
    """A step count of 10^18 would make the save schedule (a checkpoint every 1000 steps) a list no
    machine holds: the schema bounds every step count, and loading answers at once."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    node, *path = key.replace("[0]", ".0").split(".")
    parent = cfg.setdefault(node, {})
    for p in path[:-1]:
        parent = parent[int(p)] if p.isdigit() else parent[p]
    last = path[-1]
    parent[int(last) if last.isdigit() else last] = 10**18
    got = outcome(cfg, root=ROOT, time_limit_s=10)
    count("huge step count", clear=got.kind == "clear")
    assert got.kind == "clear", got.message
    assert f"config key {key}" in got.message, got.message


# ------------------------------------------------------------------- corrupt inputs in the middle of a study

def _tiny_run(world, name: str, steps: int = 4, **over):
    from retrace.train import TrainConfig, train
    from test_train_helpers import SEQ, B

    cfg = dict(reference=str(world / "ref"), data=str(world / "data" / "tiny"), out=str(world / name), steps=steps,
               recipe="70m", global_batch=B, seq_length=SEQ, train_iters=100, lr=2e-3, pdbs=4, gas=2,
               precision="fp16", threads=1, progress=False)
    train(TrainConfig(**{**cfg, **over}))
    return world / name


@pytest.fixture(scope="module")
def compared_run(world):
    """A finished tiny run (steps 0, 1, 2, 4), its reference fetched as fetch-reference does (sealed
    files), and the tables compare-run writes for it."""
    from retrace.checkpoints import open_params, save_params
    from retrace.compare.run import write_compare_run

    run = _tiny_run(world, "cmp")
    other = _tiny_run(world, "cmp-ref", lr=1e-3)  # the "published" run: another learning rate
    refdir = world / "refdir"
    for step in (0, 1, 2, 4):
        with open_params(str(other / "checkpoints" / f"step{step}.safetensors")) as reader:
            save_params(reader, refdir / f"step{step}.safetensors", seal=True)
    out = world / "cmp-out"
    write_compare_run(run, "test/ref", out / "sim.parquet", out / "tensors.parquet", refdir, log=lambda _: None)
    return {"run": run, "refdir": refdir, "sim": (out / "sim.parquet").read_bytes()}


def _damage(path: Path, how: str, rng: random.Random) -> bytes:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data) // 2, len(data) - 1)])
    else:  # one bit flipped in the tensor data (the header stays readable)
        n = 8 + int.from_bytes(data[:8], "little")
        i = rng.randrange(n, len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
    return data


@pytest.mark.parametrize("what", ["checkpoint", "reference"])
@pytest.mark.parametrize("how", ["truncate", "bitflip"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_damaged_file_mid_study_is_named_before_it_is_compared(compared_run, tmp_path, what, how, seed):
    from retrace.compare.run import write_compare_run
    from retrace.errors import RetraceError

    rng = random.Random(seed)
    step = rng.choice([1, 2])  # in the middle: steps before it compare fine
    path = (compared_run["run"] / "checkpoints" if what == "checkpoint" else compared_run["refdir"]) / f"step{step}.safetensors"
    good = _damage(path, how, rng)
    out = tmp_path / "sim.parquet"
    try:
        with pytest.raises(RetraceError) as err:
            write_compare_run(compared_run["run"], "test/ref", out, tmp_path / "t.parquet", compared_run["refdir"],
                              log=lambda _: None)
        named = str(path) in str(err.value)
        nothing_written = not out.exists() and not (tmp_path / "t.parquet").exists()
        count(f"damaged {what} ({how})", clear=named, kept=nothing_written)
        assert named, str(err.value)
        assert nothing_written
    finally:
        path.write_bytes(good)
    write_compare_run(compared_run["run"], "test/ref", out, tmp_path / "t.parquet", compared_run["refdir"], log=lambda _: None)
    assert out.read_bytes() == compared_run["sim"]  # repaired: the same table as before


# ------------------------------------------------------------------------- SIGKILL, then a rerun

def _start_and_kill(cmd: list[str], at_step: int, extra_s: float, env: dict) -> int:
    """Start ``cmd``, SIGKILL it ``extra_s`` after its progress line shows ``at_step``; its exit status."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= at_step:
            break
        assert time.monotonic() < deadline
    time.sleep(extra_s)
    proc.kill()
    proc.stderr.read()
    return proc.wait(timeout=60)


def _run_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "checkpoints").glob("step*.safetensors"))}




@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_ends_identical(world):
    from test_train_helpers import argv

    steps = 8
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    ref = subprocess.run(argv(world, "k-ref", steps), capture_output=True, text=True, env=env)
    assert ref.returncode == 0, ref.stderr
    want = _run_files(world / "k-ref")
    want_manifest = json.loads((world / "k-ref" / "checkpoints" / "manifest.json").read_text())
    # each step lasts ≥ 0.3 s, so a kill 0–0.08 s after step `at`'s progress line lands before the run ends
    # even when that line is read late on a fast machine
    slow = {**env, "RETRACE_TEST_STEP_DELAY": "0.3"}
    for seed in (0, 1):
        rng = random.Random(seed)
        out = f"k{seed}"
        at, extra = rng.randrange(1, steps - 1), rng.uniform(0, 0.08)  # in a step, or in a save
        code = _start_and_kill(argv(world, out, steps), at, extra, slow)
        assert code == -signal.SIGKILL
        assert not (world / out / "checkpoints" / "manifest.json").exists()
        again = subprocess.run(argv(world, out, steps), capture_output=True, text=True, env=env)
        same = again.returncode == 0 and _run_files(world / out) == want
        if same:
            got = json.loads((world / out / "checkpoints" / "manifest.json").read_text())
            same = [f["sha256"] for f in got["files"]] == [f["sha256"] for f in want_manifest["files"]]
        count("SIGKILL in training", clear=again.returncode == 0, kept=same)
        assert again.returncode == 0, again.stderr[-2000:]
        assert same, f"seed {seed}: killed at step {at} + {extra:.3f} s, rerun differs"


@pytest.mark.slow
def test_sigkill_mid_compare_then_rerun_ends_identical(compared_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    cmd = [sys.executable, "-m", "retrace", "compare-run", "--run", str(compared_run["run"]), "--reference", "test/ref",
           "--reference-dir", str(compared_run["refdir"]), "--out", str(tmp_path / "sim.parquet"), "--tensors-out",
           str(tmp_path / "t.parquet")]
    full = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr
    took = float(re.findall(r"\[(\d+\.\d+)s\]", full.stdout)[-1]) if "[" in full.stdout else 0.0
    (tmp_path / "sim.parquet").unlink()
    (tmp_path / "t.parquet").unlink()
    for seed in (0, 1):
        rng = random.Random(seed)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        first = proc.stdout.readline()  # the first step compared: the package is loaded, work under way
        time.sleep(rng.uniform(0, max(took, 0.02)))
        proc.kill()
        proc.wait(timeout=60)
        left = {p.name for p in tmp_path.iterdir()}
        # either nothing, or both tables complete (the process may have finished): never a partial file
        # (a killed atomic write may leave its hidden ``.<name>.*.tmp`` file: never read, replaced by the rerun)
        stray = {n for n in left if n.startswith(".") and n.endswith(".tmp")}
        partial = left - {"sim.parquet", "t.parquet"} - stray or ("sim.parquet" in left and "t.parquet" not in left)
        again = subprocess.run(cmd, capture_output=True, text=True, env=env)
        same = again.returncode == 0 and (tmp_path / "sim.parquet").read_bytes() == compared_run["sim"]
        count("SIGKILL in compare", clear=again.returncode == 0, kept=same and not partial)
        assert first.startswith("compare-run:"), first
        assert not partial, left
        assert same, again.stderr[-2000:]
        for p in tmp_path.iterdir():
            p.unlink()


# ------------------------------------------------------------------------------ tables: writers, a full disk

def _fake_runs(root: Path, cells: int, tag: float) -> tuple[Path, Path]:
    """A cells table and per-cell outputs whose values all carry ``tag`` (to tell two inputs apart)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"c{i}" for i in range(cells)]
    root.mkdir(parents=True)
    pq.write_table(pa.table({"cell": ids, "model": ["m"] * cells}), root / "cells.parquet")
    for cid in ids:
        d = root / "runs" / cid
        d.mkdir(parents=True)
        steps = list(range(200))
        pq.write_table(pa.table({"step": steps, "cos": [tag] * 200}), d / "similarity.parquet")
        pq.write_table(pa.table({"step": steps * 4, "tensor": ["t"] * 800, "cos": [tag] * 800}),
                       d / "similarity_tensors.parquet")
        pq.write_table(pa.table({"step": steps, "loss": [tag] * 200}), d / "train_log.parquet")
    return root / "cells.parquet", root / "runs"


def _tags(out: Path) -> set[float]:
    import pyarrow.parquet as pq

    tags = set()
    for name, column in (("similarity.parquet", "cos"), ("similarity_tensors.parquet", "cos"),
                         ("train_log.parquet", "loss")):
        tags |= set(pq.read_table(out / name).column(column).to_pylist())
    return tags


@pytest.mark.slow
def test_two_aggregate_runs_at_once_leave_the_tables_of_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    inputs = [_fake_runs(tmp_path / f"in{k}", 120, float(k + 1)) for k in range(2)]
    out = tmp_path / "tables"
    for attempt in range(3):
        procs = [subprocess.Popen([sys.executable, "-m", "retrace", "aggregate", "--cells", str(c), "--runs", str(r),
                                   "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
                 for c, r in inputs]
        codes = [p.wait(timeout=120) for p in procs]
        tags = _tags(out)
        leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        one = len(tags) == 1 and not leftovers
        count("two aggregates at once", clear=codes == [0, 0], kept=one)
        assert codes == [0, 0], [p.stderr.read() for p in procs]
        assert one, (attempt, tags, leftovers)


def _small_disk(tmp_path: Path, size: str) -> Path:
    """A tmpfs of ``size`` (root only; the test skips elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    return mnt


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> Path:
    """Fill ``mnt`` until about ``leave`` bytes are free; returns the filler file."""
    filler = mnt / "filler"
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_while_writing_the_tables_keeps_the_previous_ones(tmp_path):
    from retrace.errors import RetraceError
    from retrace.report.aggregate import aggregate

    mnt = _small_disk(tmp_path, "8m")
    try:
        cells, runs = _fake_runs(tmp_path / "in", 40, 1.0)
        out = mnt / "tables"
        aggregate(cells, runs, out, log=lambda _: None)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        cells2, runs2 = _fake_runs(tmp_path / "in2", 40, 2.0)
        for leave in (2_000, 40_000, 120_000):  # full at the first, second or third table
            filler = _fill(mnt, leave)
            with pytest.raises(RetraceError) as err:
                aggregate(cells2, runs2, out, log=lambda _: None)
            after = {p.name: p.read_bytes() for p in out.iterdir()}
            clear = "could not write the table" in str(err.value) and str(out) in str(err.value)
            count("full disk: tables", clear=clear, kept=after == before)
            assert clear, str(err.value)
            assert after == before
            filler.unlink()
        aggregate(cells2, runs2, out, log=lambda _: None)  # space again: the new tables
        assert _tags(out) == {2.0}
    finally:
        _umount(mnt)


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_or_state_then_a_rerun(world, tmp_path):
    """Out of space at a checkpoint (before any state) or later, once resume states are saved: one error
    naming the file, no manifest; with space again the rerun resumes from the newest complete state and
    ends identical to an uninterrupted run."""
    from retrace.train.state import complete_steps
    from test_train_helpers import argv

    steps = 8
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    ref = subprocess.run(argv(world, "d-ref", steps), capture_output=True, text=True, env=env)
    assert ref.returncode == 0, ref.stderr
    want = checkpoint_tensors(world / "d-ref")
    mnt = _small_disk(tmp_path, "4m")
    try:
        for k, leave in enumerate((100_000, 900_000)):  # at checkpoint step1; later, with states saved
            run_root = mnt / f"r{k}"
            run_root.mkdir()
            for name in ("ref", "data"):
                (run_root / name).symlink_to(world / name)
            filler = _fill(mnt, leave)
            failed = subprocess.run(argv(run_root, "out", steps), capture_output=True, text=True, env=env)
            last = failed.stderr.strip().splitlines()[-1] if failed.stderr.strip() else ""
            clear = failed.returncode != 0 and last.startswith("retrace train: error:") and str(run_root) in last \
                and "Traceback" not in failed.stderr
            no_manifest = not (run_root / "out" / "checkpoints" / "manifest.json").exists()
            filler.unlink()
            states = complete_steps(run_root / "out" / "state")  # a half-written one has no state.json
            again = subprocess.run(argv(run_root, "out", steps), capture_output=True, text=True, env=env)
            same = again.returncode == 0 and checkpoint_tensors(run_root / "out") == want
            count("full disk: train", clear=clear, kept=same)
            assert failed.returncode != 0 and no_manifest
            assert clear, f"leave {leave}: {failed.stderr[-3000:]}"
            assert same, f"leave {leave} (states left {states}): {again.stderr[-2000:]}"
            if k == 1:  # earlier states survived the failed save, and the rerun resumed from the newest
                assert states, states
                attempts = json.loads((run_root / "out" / "run.json").read_text())["attempts"]
                assert attempts[-1]["resumed_from"] == states[-1], (states, attempts[-1])
            shutil.rmtree(run_root)
    finally:
        _umount(mnt)


def test_a_full_disk_while_writing_the_report_keeps_the_previous_one(tables, tmp_path):  # noqa: F811
    """The report is built in a temporary directory and swapped in whole: out of space half-way, the previous
    report is still there, complete, and the error names the report."""
    import pandas as pd

    from retrace.errors import RetraceError
    from retrace.report.build import build_report

    small = tmp_path / "small"  # one model, one layout: a quick report
    small.mkdir()
    sim = pd.read_parquet(tables / "similarity.parquet")
    sim[(sim["model"] == "control") & (sim["gas"] == 1)].to_parquet(small / "similarity.parquet")
    mnt = _small_disk(tmp_path, "8m")
    try:
        out = mnt / "report"
        build_report(small, out, log=lambda _: None)
        before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        for leave in (4_000, 60_000):
            filler = _fill(mnt, leave)
            err = None
            try:
                build_report(small, out, log=lambda _: None)
            except RetraceError as exc:
                err = str(exc)
            except OSError as exc:  # counted as unclear: not the package's own error
                err = f"unclear: {type(exc).__name__}: {exc}"
            after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
            leftovers = [p.name for p in mnt.iterdir() if p.name not in ("report", "filler")]
            clear = err is not None and not err.startswith("unclear") and "report" in err
            count("full disk: report", clear=clear, kept=after == before and not leftovers)
            filler.unlink()
            assert clear, err
            assert after == before and not leftovers, leftovers
    finally:
        _umount(mnt)
