"""Run one cell with GPT-NeoX v1.0 itself (``engine: neox``) and hand back retrace's canonical outputs.

    neox = NeoXEnv.from_config({"path": "/opt/gpt-neox", "container": "/images/neox-v1.0.sif"})
    run_cell(size="70m", deduped=True, gpus=8, pdbs=4, gas=32, data=PREFIX, steps=1000, out=OUT, neox=neox)

writes, under ``OUT``:

    neox/config.yml            the generated GPT-NeoX config (``retrace.neox.config``; .json for slurm)
    neox/hostfile              DeepSpeed's hostfile (local runs: ``localhost slots=W``)
    neox/load/                 a view of the load checkpoint whose ``latest`` names global_step{start}
    neox/save/global_step{N}/  GPT-NeoX's own checkpoints
    neox/plan.json             the command, its environment, the config summary (corrections, overrides)
    logs/neox.log              GPT-NeoX's stdout and stderr
    checkpoints/step{N}.safetensors + manifest.json (last)   as ``retrace train`` writes them
    train_log.parquet, run.json

The command is ``python ./deepy.py train.py <config>``, run in the gpt-neox checkout, inside the
cell's container (Apptainer/Singularity ``exec --nv``, or ``docker run --gpus all``) or conda
environment (``conda run -n``), with ``DLTS_HOSTFILE`` (read by v1.0's ``arguments.py``) and
``MASTER_ADDR`` set. ``launch_plan`` builds it without running anything.

Launchers. ``local`` (one node): a hostfile ``localhost slots=W`` and MASTER_ADDR 127.0.0.1, so
DeepSpeed's runner starts W ranks with ``deepspeed.launcher.launch`` (no ssh, whatever /job/hostfile
holds). ``slurm`` (several nodes, inside an allocation): a shell snippet writes the hostfile from
``scontrol show hostnames $SLURM_JOB_NODELIST`` (``slots=gpus_per_node``) and runs deepy.py once;
DeeperSpeed's SlurmRunner then calls ``srun``. That runner exists from DeeperSpeed e650c52f (2022-09),
not in v1.0's pinned eb7f5cff.

Not run here (no GPU, no gpt-neox checkout): the launch itself. What is tested: the command, the
environment, the config, the load view, the checkpoint conversion and the log parsing.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retrace.errors import RetraceError
from retrace.io import atomic_open, write_json
from retrace.neox.config import NeoXConfig, neox_config, write_neox_config
from retrace.rundir import RunDir, timestamp

RUNTIMES = ("apptainer", "singularity", "docker")
_ENV_KEYS = {"path", "container", "runtime", "conda_env", "python", "binds"}


@dataclasses.dataclass(frozen=True)
class NeoXEnv:
    """Where GPT-NeoX v1.0 lives: a checkout (``path``, holding deepy.py and train.py) and how to enter
    its software: a container image, a conda environment, or neither (``python`` from PATH)."""

    path: str
    container: str | None = None
    runtime: str = "apptainer"
    conda_env: str | None = None
    python: str = "python"
    binds: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, spec: Mapping[str, Any], where: str = "neox") -> NeoXEnv:
        """From a study's ``neox:`` mapping (keys: path, container, runtime, conda_env, python, binds)."""
        if not isinstance(spec, Mapping):
            raise RetraceError(f"{where}: expected a mapping with at least 'path', got {type(spec).__name__}")
        unknown = sorted(set(spec) - _ENV_KEYS)
        if unknown:
            raise RetraceError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_ENV_KEYS))})")
        if not spec.get("path"):
            raise RetraceError(f"{where}.path: the gpt-neox v1.0 checkout (with deepy.py) is required")
        runtime = spec.get("runtime", "apptainer")
        if runtime not in RUNTIMES:
            raise RetraceError(f"{where}.runtime: one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if spec.get("container") and spec.get("conda_env"):
            raise RetraceError(f"{where}: give container or conda_env, not both")
        binds = spec.get("binds") or ()
        if isinstance(binds, str) or not all(isinstance(b, str) for b in binds):
            raise RetraceError(f"{where}.binds: a list of paths")
        return cls(path=str(spec["path"]), container=spec.get("container"), runtime=runtime,
                   conda_env=spec.get("conda_env"), python=str(spec.get("python", "python")),
                   binds=tuple(binds))


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What to run: ``argv`` in ``cwd`` with ``env`` added to the environment, after writing ``files``."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    files: dict[str, str]

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"cd {shlex.quote(self.cwd)} && " + (f"env {env} " if env else "") + shlex.join(self.argv)

    def to_dict(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "cwd": self.cwd, "env": dict(self.env), "files": dict(self.files),
                "shell": self.shell()}


def launch_plan(cfg: NeoXConfig, config_path: str | os.PathLike, neox: NeoXEnv, *, workdir: str | os.PathLike,
                gpus_per_node: int | None = None) -> LaunchPlan:
    """The command that runs ``cfg`` (written at ``config_path``) with GPT-NeoX; pure: nothing is run or written.

    ``workdir`` holds the hostfile. ``gpus_per_node`` is needed for ``launcher: slurm`` (whole nodes).
    """
    workdir = Path(workdir)
    hostfile = str(workdir / "hostfile")
    inner = [neox.python, "./deepy.py", "train.py", str(config_path)]
    env = {"DLTS_HOSTFILE": hostfile}
    files: dict[str, str] = {}
    world = cfg.world_size
    if cfg.launcher == "local":
        if gpus_per_node is not None and world > gpus_per_node:
            raise RetraceError(
                f"{cfg.published.name}: {world} GPUs do not fit one node of {gpus_per_node}; use launcher slurm"
            )
        files[hostfile] = f"localhost slots={world}\n"
        env["MASTER_ADDR"] = "127.0.0.1"
        argv = _enter(neox, inner, _binds(cfg, config_path, workdir, neox), env)
    else:
        if not gpus_per_node:
            raise RetraceError(f"{cfg.published.name}: launcher slurm needs gpus_per_node")
        if world % gpus_per_node:
            raise RetraceError(
                f"{cfg.published.name}: {world} GPUs are not whole nodes of {gpus_per_node} "
                "(DeeperSpeed's SlurmRunner allocates whole nodes)"
            )
        q = shlex.quote(hostfile)
        script = (
            f'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n {world // gpus_per_node} '
            f'| sed "s/$/ slots={gpus_per_node}/" > {q} && '
            f'export MASTER_ADDR="$(head -n 1 {q} | cut -d " " -f 1)" && exec '
            + shlex.join(_enter(neox, inner, _binds(cfg, config_path, workdir, neox), env))
        )
        argv = ["bash", "-c", script]
    return LaunchPlan(argv=argv, cwd=neox.path, env=env, files=files)


def _binds(cfg: NeoXConfig, config_path: str | os.PathLike, workdir: Path, neox: NeoXEnv) -> list[str]:
    values = cfg.normalized()
    paths = [neox.path, str(Path(config_path).parent), str(workdir)]
    for key in ("save", "load"):
        if values.get(key):
            paths.append(str(values[key]))
    for p in values.get("train_data_paths") or []:
        paths.append(str(Path(p).parent))
    if values.get("vocab_file"):
        paths.append(str(Path(values["vocab_file"]).parent))
    paths += list(neox.binds)
    out: list[str] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def _enter(neox: NeoXEnv, inner: list[str], binds: list[str], env: Mapping[str, str]) -> list[str]:
    if neox.container:
        if neox.runtime == "docker":
            argv = ["docker", "run", "--rm", "--gpus", "all", "--ipc", "host", "--network", "host",
                    "-w", neox.path]
            for b in binds:
                argv += ["-v", f"{b}:{b}"]
            for k, v in sorted(env.items()):
                argv += ["-e", f"{k}={v}"]
            return argv + [neox.container] + inner
        argv = [neox.runtime, "exec", "--nv", "--pwd", neox.path]
        for b in binds:
            argv += ["--bind", b]
        return argv + [neox.container] + inner
    if neox.conda_env:
        return ["conda", "run", "--no-capture-output", "-n", neox.conda_env] + inner
    return inner


# -- the load checkpoint -----------------------------------------------------------------------------------
def prepare_load(load: str | os.PathLike, start_step: int, view: str | os.PathLike) -> Path:
    """A directory GPT-NeoX v1.0 loads ``global_step{start_step}`` from (it reads the tag from ``latest``).

    ``load`` is that step's directory or one holding it. If ``load/latest`` already names it, ``load``
    is returned; otherwise ``view`` gets a symlink to the step directory and a ``latest`` naming it.
    Checks the checkpoint's recorded iteration, and for ``start_step`` > 0 that the ZeRO optimizer
    states are there (a resume needs them; v1.0's finetune would restart at iteration 0).
    """
    from retrace.checkpoints.neox import load_client_state, zero_optimizer_files
    from retrace.neox.convert import available_steps, step_dir

    load = Path(load)
    if not load.is_dir():
        raise RetraceError(f"{load}: load directory not found")
    d = step_dir(load, start_step)
    if d is None:
        have = available_steps(load)
        raise RetraceError(
            f"{load}: no GPT-NeoX checkpoint global_step{start_step} (found: {', '.join(map(str, have)) or 'none'})"
        )
    try:
        iteration = load_client_state(d).get("iteration")
    except RetraceError:
        iteration = None  # no mp_rank file readable: DeepSpeed will say so when it loads
    if iteration is not None and int(iteration) != start_step:
        raise RetraceError(f"{d}: its client state says iteration {iteration}, not the start step {start_step}")
    if start_step > 0 and not zero_optimizer_files(d):
        raise RetraceError(
            f"{d}: no zero_pp_rank_*_optim_states.pt; resuming at step {start_step} needs the optimizer "
            "states (GPT-NeoX v1.0 has no weights-only resume that keeps the iteration)"
        )
    latest = load / "latest"
    if d.parent == load and latest.is_file() and latest.read_text(encoding="utf-8").strip() == d.name:
        return load
    view = Path(view)
    view.mkdir(parents=True, exist_ok=True)
    link = view / d.name
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == d.resolve():
            pass
        elif link.is_symlink():
            link.unlink()
        else:
            raise RetraceError(f"{link}: exists and is not retrace's symlink; remove it")
    if not link.exists():
        link.symlink_to(d.resolve(), target_is_directory=True)
    with atomic_open(view / "latest", "w", encoding="utf-8") as fh:
        fh.write(d.name + "\n")
    return view


# -- one cell ----------------------------------------------------------------------------------------------
def run_cell(
    *,
    size: str,
    gpus: int,
    pdbs: int,
    gas: int,
    data: str,
    steps: int,
    out: str | os.PathLike,
    neox: NeoXEnv,
    deduped: bool = False,
    attention: str = "flash",
    load: str | None = None,
    start_step: int = 0,
    seed: int = 1234,
    precision: str | None = None,
    launcher: str = "local",
    gpus_per_node: int | None = None,
    vocab_file: str | None = None,
    reference: str = "",
    dry_run: bool = False,
) -> dict[str, Any]:
    """Write the config and plan, run GPT-NeoX (unless ``dry_run``), convert its checkpoints and log.

    Returns a summary (paths, plan, config summary). With ``dry_run`` nothing is launched and nothing
    but ``OUT/neox/`` is written. Raises ``RetraceError`` if GPT-NeoX fails (its log is named).
    """
    out = Path(out).resolve()
    work = out / "neox"
    save = work / "save"
    load_dir = prepare_load(load, start_step, work / "load") if load else None
    cfg = neox_config(size, deduped=deduped, gpus=gpus, pdbs=pdbs, gas=gas, data=data, steps=steps,
                      save=str(save), attention=attention, load=str(load_dir) if load_dir else None,
                      start_step=start_step, seed=seed, precision=precision, launcher=launcher,
                      vocab_file=vocab_file)
    fmt = "json" if launcher == "slurm" else "yaml"
    config_path = write_neox_config(cfg, work / f"config.{'json' if fmt == 'json' else 'yml'}", fmt)
    plan = launch_plan(cfg, config_path, neox, workdir=work, gpus_per_node=gpus_per_node)
    for path, text in plan.files.items():
        with atomic_open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    summary = {"config": str(config_path), "neox": dataclasses.asdict(neox), "plan": plan.to_dict(),
               **cfg.to_dict()}
    write_json(work / "plan.json", summary)
    if dry_run:
        return summary

    log = out / "logs" / "neox.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = timestamp()
    with open(log, "ab") as fh:
        fh.write(f"\n==== retrace: {plan.shell()}\n".encode())
        fh.flush()
        proc = subprocess.run(plan.argv, cwd=plan.cwd, env={**os.environ, **plan.env}, stdout=fh,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RetraceError(f"GPT-NeoX exited with status {proc.returncode}; see {log}")
    return finish_cell(cfg, out, load_dir=load_dir, reference=reference, log=log,
                       extra={"started": started, "plan": plan.to_dict(), "neox": dataclasses.asdict(neox)})


def finish_cell(cfg: NeoXConfig, out: str | os.PathLike, *, load_dir: str | os.PathLike | None = None,
                reference: str = "", log: str | os.PathLike | None = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """After GPT-NeoX: train_log.parquet from its log, the canonical checkpoints + manifest (last), run.json."""
    from retrace.neox.convert import convert_run, parse_neox_log, write_train_log

    out = Path(out)
    values = cfg.normalized()
    rows: list[dict] = []
    if log is not None and Path(log).is_file():
        fp16 = values.get("fp16") or {}
        prec = "fp32" if not fp16.get("enabled") else ("bf16" if fp16.get("type") == "bfloat16" else "fp16")
        rows = parse_neox_log(Path(log).read_text(encoding="utf-8", errors="replace"), start_step=cfg.start_step,
                              seq_length=int(values.get("seq_length", 2048)),
                              initial_scale_power=int(fp16.get("initial_scale_power", 12)), precision=prec)
    run = RunDir(out)
    write_train_log(rows, run.train_log)
    final_loss = next((r["loss"] for r in reversed(rows) if r["step"] == cfg.steps), None)
    summary = {"engine": "neox", "finished": timestamp(), "manifest": str(run.manifest),
               "log_rows": len(rows), **cfg.to_dict(), **(extra or {})}
    write_json(run.run_json, summary)
    convert_run(values["save"], out, start_step=cfg.start_step, steps=cfg.steps, save_steps=cfg.save_steps,
                load_dir=load_dir, reference=reference, final_loss=final_loss)  # the manifest comes last
    return summary
