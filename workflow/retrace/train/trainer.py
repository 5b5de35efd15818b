"""``train(TrainConfig) -> TrainResult``: resume a published Pythia run and train it as GPT-NeoX v1.0 did.

Step numbering follows the published checkpoints: ``stepN`` has trained on items [0, B·N) of the
training order. Training step s (0-based) consumes batch s and produces ``step{s+1}``. ``steps`` is the
step the run ends at (an absolute step number, like the published branch names).

Outputs under ``out``:
    checkpoints/step{N}.safetensors   canonical fp16 parameters (the start step and the Pythia schedule)
    checkpoints/manifest.json         written LAST on success: steps, files, sha256
    state/step{N}/                    resume states (newest two kept)
    train_log.parquet                 one row per step (with its batch and weight fingerprints:
                                      retrace.train.fingerprints)
    run.json                          environment and arguments (one entry per attempt)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrace.checkpoints.sources import start_source
from retrace.errors import RetraceError
from retrace.io import sha256_file, write_json, write_parquet
from retrace.pythia.schedule import save_steps as pythia_schedule
from retrace.rundir import RunDir, timestamp
from retrace.spec import TrainConfig
from retrace.train import fingerprints
from retrace.train import state as st
from retrace.train.distributed import LOCAL_START_VAR, DistEnv, detect, launch_local
from retrace.train.environment import environment  # noqa: F401 - re-exported (run.json's record)

#: the shortest wait for every rank of a run to join the process group (seconds)
RENDEZVOUS_TIMEOUT_S = 300.0


class TrainingInterrupted(Exception):
    """A signal (SIGTERM/SIGUSR2/SIGINT) stopped training; the state at ``step`` was saved."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; state saved, rerun to resume")
        self.signum = signum
        self.step = step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class TrainResult:
    out: Path
    final_step: int
    saved_steps: list[int]
    manifest: Path
    log: Path
    final_loss: float | None = None


# -- entry point -----------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, fork_ranks: bool = False) -> TrainResult:
    """Train one cell. With ``gpus`` > 1 and no distributed environment, starts ``gpus`` local ranks.

    ``fork_ranks``: a CPU cell's local ranks are forks of this process, which then runs nothing on more
    than one thread before they start (``distributed.fork_ok``): each rank skips a fresh interpreter's
    imports, ~2 s of CPU. Only a caller that has run no torch op in this process may ask for it
    (``retrace train`` does); the ranks compute the same either way.
    """
    env = detect()
    if env is None and cfg.gpus > 1 and not cfg.simulate_ranks:
        fork = fork_ranks and (cfg.device == "cpu" or cfg.device == "auto" and not torch.cuda.is_available())
        if fork:  # the launcher never starts libgomp's pool, which a forked child could not use
            torch.set_num_threads(1)
        # Every input check first, here, so that bad input is one error before any rank starts.
        parent = DistEnv(rank=0, world_size=cfg.gpus, local_rank=0, local_world_size=cfg.gpus, source="local")
        Trainer(cfg, parent).prepare(pin_threads=not fork)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        fd, cfg_path = tempfile.mkstemp(prefix=".train-config.", suffix=".json", dir=out)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(cfg.to_dict(), fh)
        target = None
        if fork:
            from retrace.train import worker

            _preload_rank_modules()
            target = functools.partial(worker.main, [cfg_path])
        try:
            code = launch_local(["-m", "retrace.train.worker", cfg_path], cfg.gpus, fork_target=target)
        finally:
            Path(cfg_path).unlink(missing_ok=True)
        if code != 0:
            signum = code - 128 if code > 128 else -code if code < 0 else 0
            if signum in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
                raise TrainingInterrupted(signum, _latest_state_step(out))
            raise RetraceError(f"training ranks failed (exit status {code}); see their messages above")
        return _result_from_disk(out)
    return Trainer(cfg, env).run()


def _preload_rank_modules() -> None:
    """Import, once in the launcher, what every forked rank would otherwise import for itself."""
    import pyarrow.parquet  # noqa: F401 - the train log and the resume state
    import torch.distributed  # noqa: F401

    import retrace.model  # noqa: F401
    import retrace.train.determinism  # noqa: F401
    import retrace.train.engine  # noqa: F401
    import retrace.train.environment  # noqa: F401


def _latest_state_step(out: Path) -> int:
    steps = st.complete_steps(RunDir(out).state)
    return steps[-1] if steps else -1


def _result_from_disk(out: Path) -> TrainResult:
    run = RunDir(out)
    manifest = run.manifest
    m = json.loads(manifest.read_text(encoding="utf-8"))
    return TrainResult(out=out, final_step=m["final_step"], saved_steps=m["steps"], manifest=manifest,
                       log=run.train_log, final_loss=m.get("final_loss"))


# -- the trainer -----------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv | None):
        self.cfg = cfg
        self.env = env or DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, source="single")
        self.out = Path(cfg.out)
        self.rundir = RunDir(cfg.out)
        self.stop_signal: int | None = None
        self.pg_initialized = False
        self.optimizer_source: dict | None = None

    # ---- setup -----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        old_handlers = self._install_signals()  # from here on a signal stops at the end of a step
        from retrace.train import determinism

        restore = determinism.apply(deterministic=self.cfg.deterministic)  # before any CUDA or NCCL work
        try:
            self.prepare()
            self.device = self._device()
            self._init_process_group()
            self._arm_deadline()
            resume = self._find_resume()
            try:
                return self._train(resume)
            finally:
                self._shutdown()
        finally:
            restore()
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def prepare(self, *, pin_threads: bool = True) -> None:
        """Every input check, before any compute: layout, recipe, data length, start weights.
        ``pin_threads=False``: leave torch's thread count as it is (a launcher that forks its ranks)."""
        cfg = self.cfg
        cfg.check()
        if cfg.simulate_ranks:
            if self.env.world_size != 1:
                raise RetraceError("--simulate-ranks runs every rank in one process; start it without a launcher")
            if cfg.engine != "builtin":
                raise RetraceError("--simulate-ranks needs --engine builtin")
        elif self.env.world_size != cfg.gpus:
            raise RetraceError(f"--gpus {cfg.gpus} but the distributed environment has {self.env.world_size} ranks")
        if pin_threads:
            self._pin_threads()
        from retrace.checkpoints import open_config

        self.source = start_source(cfg.reference, cfg.start_step)
        try:
            hf_config = open_config(self.source)
        except RetraceError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise RetraceError(f"{self.source}: cannot read the reference's config: {exc}") from exc
        self.recipe = cfg.resolve_recipe(hf_config)
        r = self.recipe
        self.pdbs = cfg.pdbs if cfg.pdbs is not None else r.micro_batch
        self.gas = cfg.gas if cfg.gas is not None else r.gas
        if cfg.gpus * self.pdbs * self.gas != r.global_batch:
            raise RetraceError(
                f"impossible layout: gpus·pdbs·gas = {cfg.gpus}·{self.pdbs}·{self.gas} = "
                f"{cfg.gpus * self.pdbs * self.gas}, but the global batch is {r.global_batch}"
            )
        self.data = self._open_data()
        self.data.check_enough(cfg.steps, r.global_batch)
        self.hf_config = hf_config
        self.save_steps = sorted(set(cfg.save_steps) | {cfg.start_step, cfg.steps}) if cfg.save_steps else \
            pythia_schedule(cfg.start_step, cfg.steps)
        self.save_steps = [s for s in self.save_steps if cfg.start_step <= s <= cfg.steps]
        self._check_start_step()
        self.reanchor = None
        if cfg.reanchor:  # re-anchored segments: the published weights at every saved step after the start
            from retrace.train.reanchor import Reanchor

            self.reanchor = Reanchor(cfg.reanchor, [s for s in self.save_steps if s > cfg.start_step])
        if not st.complete_steps(self.rundir.state):
            self._open_start_params().close()  # a start step the source does not have fails here

    def _check_start_step(self) -> None:
        """A GPT-NeoX directory names its step (global_step{N}); it must be the start step asked for."""
        import re

        from retrace.checkpoints.neox import is_neox_dir, resolve_neox_dir

        path = Path(self.source)
        if path.is_dir() and is_neox_dir(path):
            m = re.fullmatch(r"global_step(\d+)", resolve_neox_dir(path).name)
            if m and int(m.group(1)) != self.cfg.start_step:
                raise RetraceError(f"{self.source} is step {m.group(1)}, not --start-step {self.cfg.start_step}")

    def _pin_threads(self) -> None:
        t = self.cfg.threads
        if t is None:
            t = max(1, (os.cpu_count() or 1) // max(1, self.env.local_world_size))
        self.threads = int(t)
        torch.set_num_threads(self.threads)
        os.environ["OMP_NUM_THREADS"] = str(self.threads)

    def _device(self) -> torch.device:
        from retrace.train.device import select_device

        return select_device(self.cfg.device, local_rank=self.env.local_rank, gpu_names=self.cfg.gpu_names,
                             ranks_here=self.env.local_world_size, one_per_task=self.env.source == "slurm")

    def _open_data(self):
        from retrace.data import open_training_data

        r, cfg = self.recipe, self.cfg
        from retrace.data import neox_num_samples

        # raw: the index maps depend on GPT-NeoX's num_samples = ceil(train_iters·B·1.005) of the run
        # being reproduced; preshuffled: the stream is the order, use all of it.
        num_samples = neox_num_samples(r.train_iters, r.global_batch) if cfg.data_kind == "raw" else None
        # The maps are read from the order cache the workflow built them in (never written from here:
        # several ranks open the data at once); without one they are built in memory.
        return open_training_data(cfg.data, kind=cfg.data_kind, seq_length=r.seq_length, seed=cfg.order_seed,
                                  num_samples=num_samples, shuffle_samples=cfg.shuffle_samples,
                                  cache_dir=cfg.order_cache, write_cache=False)

    def _open_start_params(self):
        from retrace.checkpoints import open_params

        try:
            return open_params(self.source)
        except RetraceError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise RetraceError(f"{self.source}: cannot open the start weights: {exc}") from exc

    def _save_sizes(self) -> dict:
        """The model's parameter count, ranks and partitioning: what sizes the save waits."""
        from retrace.pythia.sizes import config_from_hf

        return {"n_params": config_from_hf(self.hf_config).n_params, "dp": self.env.world_size,
                "zero1": self.sharded}

    def _init_process_group(self) -> None:
        """The process group, with a collective timeout that fits a save (``save_timeout_s``, sized from the
        model by default), and a gloo group of the same timeout for the waits around saves: a rank waiting
        for rank 0's checkpoint then blocks in a host barrier, never in an NCCL collective."""
        from retrace.placement import save_timeout_s

        cfg = self.cfg
        self.save_timeout = cfg.save_timeout_s or save_timeout_s(**self._save_sizes())
        self.save_group = None
        if self.env.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            # The default group's timeout also bounds the rendezvous (ranks of one job start seconds apart on
            # a busy node), so it never goes below RENDEZVOUS_TIMEOUT_S; saves wait in save_group instead.
            # Test hook: a collective timeout shorter than a save, to show the saves do not depend on it.
            pg_timeout = float(cfg.extra.get("pg_timeout_s") or max(self.save_timeout, RENDEZVOUS_TIMEOUT_S))
            torch.distributed.init_process_group(backend=backend, rank=self.env.rank,
                                                 world_size=self.env.world_size,
                                                 timeout=datetime.timedelta(seconds=pg_timeout))
            self.pg_initialized = True
        if self.env.world_size > 1:
            self.save_group = torch.distributed.new_group(backend="gloo",
                                                          timeout=datetime.timedelta(seconds=self.save_timeout))

    def _save_barrier(self, what: str) -> None:
        """Wait (host barrier of the save group) until every rank is past ``what`` (a save)."""
        if self.env.world_size > 1 and self.save_group is not None:
            self._in_save_group(lambda: torch.distributed.barrier(group=self.save_group), what)

    def _in_save_group(self, fn, what: str):
        try:
            return fn()
        except RuntimeError as exc:
            raise RetraceError(f"rank {self.env.rank}: the ranks did not all finish {what} within "
                               f"--save-timeout-s {self.save_timeout:g} s ({exc}); raise it if the "
                               "filesystem is slow") from exc

    def _arm_deadline(self) -> None:
        """Under SLURM, stop ``stop_lead_s`` before the job's end time (main rank; the others follow at the
        step's stop agreement). See retrace.train.deadline."""
        from retrace.placement import stop_lead_s
        from retrace.train.deadline import stop_deadline

        self.deadline = None
        if self.env.is_main:
            lead = self.cfg.stop_lead_s
            if lead is None:
                lead = stop_lead_s(**self._save_sizes())
            self.stop_lead = int(lead)
            self.deadline = stop_deadline(self.stop_lead)

    def _shutdown(self) -> None:
        owns = self.pg_initialized or getattr(getattr(self, "engine", None), "owns_process_group", False)
        if owns and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ---- model and engine ------------------------------------------------------------------------------
    def _build_model(self, load: bool):
        """The network in the compute dtype on the device; with ``load``, the start weights streamed in
        tensor by tensor (never a second full copy in memory)."""
        from retrace.model import GPTNeoX, config_from_hf, empty_on
        from retrace.train.engine import DTYPES

        mc = config_from_hf(self.hf_config, gelu=self.cfg.gelu, attention=self.cfg.attention,
                            rotary_angles=self.cfg.rotary_angles)
        if mc.seq_len < self.recipe.seq_length:
            mc = mc.replace(seq_len=self.recipe.seq_length)
        self.model_config = mc
        dtype = DTYPES[self.recipe.precision]
        model = GPTNeoX(mc, checkpoint_activations=self.cfg.checkpoint_activations, device="meta", dtype=dtype)
        empty_on(model, self.device)
        if not load:  # every value comes from the resume state
            return model
        with self._open_start_params() as reader, torch.no_grad():
            have = set(reader.names())
            missing = [n for n in mc.param_shapes() if n not in have]
            if missing:
                raise RetraceError(f"{self.source}: missing parameters {', '.join(missing[:3])}"
                                   + (" …" if len(missing) > 3 else ""))
            for name, p in model.named_parameters():
                t = reader.get(name)
                if tuple(t.shape) != tuple(p.shape):
                    raise RetraceError(f"{self.source}: {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(device=p.device, dtype=p.dtype))
        return model

    def _make_engine(self, model):
        if self.cfg.engine == "deepspeed":
            from retrace.train.ds_engine import DeepSpeedEngine

            return DeepSpeedEngine(model, self.recipe, self.recipe.precision, pdbs=self.pdbs, gas=self.gas,
                                   world_size=self.env.world_size, device=self.device, lr_iter=self.cfg.start_step,
                                   zero_stage=self.recipe.zero_stage)
        from retrace.train.engine import BuiltinEngine

        # ZeRO stage ≥ 1 (every Pythia size but 14m/31m): each rank keeps its shard of the fp32 master and
        # the moments, as DeeperSpeed did; the values are bitwise those of the replicated engine.
        return BuiltinEngine(model, self.recipe, self.recipe.precision, gas=self.gas, device=self.device,
                             world_size=self.env.world_size, lr_iter=self.cfg.start_step,
                             simulated_ranks=self.cfg.gpus if self.cfg.simulate_ranks else 1,
                             zero1=self.sharded and self.cfg.engine == "builtin", rank=self.env.rank)

    @property
    def sharded(self) -> bool:
        """Whether every rank holds its own part of the optimizer state (DeepSpeed, builtin ZeRO-1)."""
        if self.cfg.engine == "deepspeed":
            return True
        return self.recipe.zero_stage >= 1 and self.env.world_size > 1 and not self.cfg.simulate_ranks

    # ---- resume ----------------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return self.cfg.fingerprint(self.recipe, device=self.device.type)

    def _rank_file(self) -> str:
        return f"rank{self.env.rank}.safetensors" if self.sharded else "tensors.safetensors"

    def _find_resume(self):
        fp = self.fingerprint()

        def check(meta: dict) -> None:
            if meta.get("fingerprint") != fp:
                diff = sorted(k for k in fp if meta.get("fingerprint", {}).get(k) != fp[k])
                raise RetraceError(f"{self.rundir.state} holds a state of a different run (differs in: "
                                   f"{', '.join(diff)}); use another --out or delete it")
            if meta["step"] > self.cfg.steps:
                raise RetraceError(f"{self.rundir.state} is already at step {meta['step']} > --steps {self.cfg.steps}")

        # Each rank checks its own file of every complete state; the ranks then resume from the newest
        # step that every one of them can read (a rank whose newest file is damaged pulls all back).
        root = self.rundir.state
        readable = []
        for step in reversed(st.complete_steps(root)):
            d = st.state_dir(root, step)
            try:
                meta = st.verify_state(d, self._rank_file())
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"resume state {d} is unusable on rank {self.env.rank} ({exc}); falling back to "
                              "an older one", RuntimeWarning, stacklevel=2)
                print(f"retrace train: warning: resume state {d} is unusable on rank {self.env.rank} ({exc}); "
                      "trying an older one", file=sys.stderr)
                continue
            check(meta)  # a state of another run is an error, not damage
            readable.append(step)
        if self.env.world_size > 1:
            every: list[Any] = [None] * self.env.world_size
            self._in_save_group(lambda: torch.distributed.all_gather_object(every, readable,
                                                                            group=self.save_group),
                                "checking their resume states")
            common = set.intersection(*(set(r) for r in every))
            if self.env.is_main and common != set(readable):
                print(f"retrace train: ranks agree on resuming from step {max(common, default=None)} "
                      f"(readable per rank: {every})", file=sys.stderr)
        else:
            common = set(readable)
        if not common:
            return None
        return st.read_state(st.state_dir(root, max(common)), self._rank_file())

    # ---- the loop --------------------------------------------------------------------------------------
    def _train(self, resume) -> TrainResult:
        cfg, r = self.cfg, self.recipe
        torch.manual_seed(cfg.seed)
        model = self._build_model(load=resume is None)
        engine = self._make_engine(model)
        self.engine = engine
        ckpt_dir = self.rundir.checkpoints
        hashes: dict[str, str] = {}
        rows: list[dict] = []
        attempts: list[dict] = []
        if resume is not None:
            meta, tensors = resume
            engine.load_state(tensors, meta["engine"])
            st.set_rng_state(tensors, meta.get("rng", {}))
            step = int(meta["step"])
            hashes = dict(meta.get("checkpoints", {}))
            rows = self._read_log(step)
            attempts = self._read_attempts()
        else:
            step = cfg.start_step
            self._load_source_optimizer(engine)
            if self.env.is_main and step in self.save_steps:
                hashes[str(step)] = self._save_checkpoint(engine, step, ckpt_dir)
        self._save_barrier(f"the start checkpoint (step {step})")
        attempts.append({"started": timestamp(), "resumed_from": step if resume is not None else None,
                         # run.json is the main rank's: the others skip the SDPA probe (it costs each rank
                         # the import of torch._dynamo, 1.4 s of CPU)
                         "environment": self._environment() if self.env.is_main else {},
                         "rank_hosts": self._rank_hosts()})
        self._write_run_json(attempts, finished=False)

        trace = None
        if cfg.extra.get("trace_items"):  # test hook: record the item ids each rank reads
            trace = open(self.out / f"items.rank{self.env.rank}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        # Test hook only (kill-and-resume tests on fast machines): seconds to sleep after each step, and a
        # progress line every step (so a test can kill the run at a step it chose).
        delay = float(os.environ.get("RETRACE_TEST_STEP_DELAY", "0") or 0)
        ranks = range(cfg.gpus) if cfg.simulate_ranks else [self.env.rank]
        prints = fingerprints.StepFingerprints(r.global_batch, is_main=self.env.is_main)
        tokens_per_step = r.global_batch * r.seq_length
        t_start = time.perf_counter()
        last_print = 0.0
        first_step = step
        final_loss = rows[-1]["loss"] if rows else None
        while step < cfg.steps:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64)
            for rank in ranks:
                for k in range(self.gas):
                    ids = self.data.batch_items(step, micro=k, rank=rank, pdbs=self.pdbs, gpus=cfg.gpus,
                                                global_batch=r.global_batch)
                    sample = torch.as_tensor(self.data.samples(ids), dtype=torch.int64)
                    prints.saw(step, ids, sample)
                    if trace is not None:
                        trace.write(json.dumps({"step": step, "micro": k, "rank": rank,
                                                "ids": [int(i) for i in ids]}) + "\n")
                    loss_sum += engine.forward_backward(sample).double().cpu()
                if cfg.simulate_ranks:
                    engine.end_rank()
            res = engine.step(step=step + 1)
            if delay:
                time.sleep(delay)
            loss, stop, digests = self._exchange_step(loss_sum, prints.take())
            step += 1
            dt = time.perf_counter() - t0
            final_loss = loss
            rows.append({"step": step, "loss": loss, "lr": res.lr, "loss_scale": res.loss_scale,
                         "grad_norm": res.grad_norm, "skipped": res.skipped, "tokens_per_s": tokens_per_step / dt,
                         "step_time_s": dt, "lr_iter": engine.lr_iter, "adam_steps": engine.adam_steps,
                         **prints.row(engine, digests)})
            saving = step in self.save_steps
            if saving and self.env.is_main:
                hashes[str(step)] = self._save_checkpoint(engine, step, ckpt_dir)
            if saving and self.reanchor is not None:  # after the checkpoint, before the state
                self.reanchor(engine, step)
            if saving or stop or step == cfg.steps:
                self._save_state(engine, step, hashes, rows)
            now = time.perf_counter()
            if cfg.progress and self.env.is_main and (now - last_print > 2.0 or step == cfg.steps or stop or delay):
                last_print = now
                self._progress(step, loss, res, tokens_per_step, (now - t_start) / (step - first_step))
            if stop:
                if trace is not None:
                    trace.close()
                raise TrainingInterrupted(stop, step)
        if trace is not None:
            trace.close()
        # Success: everything else first, the manifest last.
        if self.env.is_main:
            self._write_log(rows)
            attempts[-1]["finished"] = timestamp()
            self._write_run_json(attempts, finished=True)
            manifest = self._write_manifest(ckpt_dir, hashes, final_loss)
        else:
            manifest = self.rundir.manifest
        self._save_barrier("the manifest")
        return TrainResult(out=self.out, final_step=cfg.steps, saved_steps=list(self.save_steps), manifest=manifest,
                           log=self.rundir.train_log, final_loss=final_loss)

    def _rank_hosts(self) -> list[str]:
        """Each rank's host, by rank: where an attempt ran (the environment record is the main rank's)."""
        me = socket.gethostname()
        if self.env.world_size == 1 or self.save_group is None:
            return [me]
        hosts: list[Any] = [None] * self.env.world_size
        self._in_save_group(lambda: torch.distributed.all_gather_object(hosts, me, group=self.save_group),
                            "reporting their hosts")
        return hosts

    def _environment(self) -> dict:
        """run.json's environment record, with the SDPA backend the cell's attention dispatches to."""
        from retrace.train.engine import DTYPES
        from retrace.train.environment import sdpa_backend

        mc = self.model_config
        sdpa = sdpa_backend(attention=mc.attention, device=self.device, dtype=DTYPES[self.recipe.precision],
                            heads=mc.heads, seq_len=self.recipe.seq_length, head_dim=mc.head_dim)
        return environment(self.device, engine_name=self.cfg.engine, deterministic=self.cfg.deterministic, sdpa=sdpa)

    def _exchange_step(self, loss_sum: torch.Tensor, digests: dict[int, bytes]) -> tuple[float, int, dict]:
        """What the ranks tell each other after a step, in one all_gather (each collective costs a rendezvous
        of every rank: on a busy CPU node, as long as the step's arithmetic): the mean loss over micro-batches
        and ranks (their sums added in rank order), whether any rank got a stop signal (its number), and
        every rank's sample digests (retrace.train.fingerprints). The main rank's deadline (the SLURM job's
        end time less the stop lead) counts as SIGUSR2."""
        if getattr(self, "deadline", None) is not None and self.stop_signal is None and time.time() >= self.deadline:
            self.stop_signal = signal.SIGUSR2
            print(f"retrace train: the job's time limit is {self.stop_lead} s away or less (--stop-lead-s): "
                  "saving and stopping after this step", file=sys.stderr, flush=True)
        values = [float(loss_sum), float(self.stop_signal or 0)]
        if self.env.world_size > 1:
            part = torch.from_numpy(fingerprints.pack(values, digests))
            dev = self.device if self.device.type == "cuda" else torch.device("cpu")
            parts = [torch.empty_like(part, device=dev) for _ in range(self.env.world_size)]
            torch.distributed.all_gather(parts, part.to(dev))
            total, any_signal, merged = 0.0, 0, {}
            for gathered in parts:  # rank order
                (loss_r, signal_r), digests_r = fingerprints.unpack(gathered.cpu().numpy(), len(values))
                total += loss_r
                any_signal = any_signal or int(signal_r)
                merged.update(digests_r)
            sig = any_signal and (self.stop_signal or signal.SIGTERM)
            digests = merged
        else:
            total, sig = values[0], int(values[1])
        return total / (self.gas * self.cfg.gpus), int(sig), digests

    def _barrier(self) -> None:
        if self.env.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    # ---- signals ---------------------------------------------------------------------------------------
    def _install_signals(self) -> dict:
        """SIGTERM/SIGUSR2/SIGINT set a flag; the loop saves the state after the current step and stops."""
        def handler(signum, _frame):
            if self.stop_signal is None:
                self.stop_signal = signum

        old = {}
        for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            try:
                old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return old

    # ---- writing -----------------------------------------------------------------------------------------
    def _save_checkpoint(self, engine, step: int, ckpt_dir: Path) -> str:
        """The fp16 checkpoint, streamed from the weights (no host copy of them) and hashed as written;
        the same bytes ``save_params(engine.export_params(torch.float16))`` writes."""
        from retrace.checkpoints.names import canonical_order
        from retrace.train.tensorfile import write_tensors

        delay = float(self.cfg.extra.get("save_delay_s") or 0)  # test hook: a slow filesystem on rank 0
        if delay:
            time.sleep(delay)
        params = dict(engine.iter_params())
        return write_tensors(self.rundir.checkpoint(step), [(n, params[n]) for n in canonical_order(params)],
                             dtype=torch.float16, sort=False,
                             metadata={"step": str(step), "reference": self.cfg.published or self.cfg.reference,
                                       "producer": "retrace train"})

    def _save_state(self, engine, step: int, hashes: dict, rows: list[dict]) -> None:
        root = self.rundir.state
        d = st.state_dir(root, step)
        rng_t, rng_meta = st.rng_state()
        # builtin: every rank holds the same replicated state, so the main rank alone writes it (ranks
        # writing one file name would race on the rename and on its recorded sha256); deepspeed: a
        # partition per rank, each in its own file.
        files: dict[str, str] = {}
        if self.sharded or self.env.is_main:
            tensors = [*engine.iter_state_tensors(), *rng_t.items()]  # views: streamed, hashed as written
            files[self._rank_file()] = st.save_tensors(d / self._rank_file(), tensors)
        what = f"their saves of step {step}"
        if self.env.world_size > 1 and self.sharded:
            gathered: list[Any] = [None] * self.env.world_size
            self._in_save_group(lambda: torch.distributed.all_gather_object(gathered, files, group=self.save_group),
                                what)
            files = {k: v for g in gathered for k, v in g.items()}
        else:
            self._save_barrier(what)
        if self.env.is_main:
            self._write_log(rows)
            st.write_state_json(root, step, {"engine": engine.state_meta(), "rng": rng_meta,
                                             "fingerprint": self.fingerprint(),
                                             "checkpoints": hashes, "threads": self.threads,
                                             "data_position": step * self.recipe.global_batch,
                                             "written": timestamp()}, files, keep=self.cfg.keep_states)
        self._save_barrier(f"the state of step {step}")

    def _write_log(self, rows: list[dict]) -> None:
        import pandas as pd

        cols = ["step", "loss", "lr", "loss_scale", "grad_norm", "skipped", "tokens_per_s", "step_time_s",
                "lr_iter", "adam_steps", *fingerprints.LOG_COLUMNS]
        frame = pd.DataFrame(rows, columns=cols)
        frame = frame.astype({"step": "int64", "loss": "float64", "lr": "float64", "loss_scale": "float64",
                              "grad_norm": "float64", "skipped": "bool", "tokens_per_s": "float64",
                              "step_time_s": "float64", "lr_iter": "int64", "adam_steps": "int64"})
        write_parquet(self.rundir.train_log, frame)

    def _read_log(self, step: int) -> list[dict]:
        path = self.rundir.train_log
        if not path.exists():
            return []
        import pandas as pd

        frame = pd.read_parquet(path)
        return frame[frame["step"] <= step].to_dict("records")

    def _read_attempts(self) -> list[dict]:
        try:
            return list(json.loads(self.rundir.run_json.read_text(encoding="utf-8")).get("attempts", []))
        except (OSError, ValueError):
            return []

    def _write_run_json(self, attempts: list[dict], finished: bool) -> None:
        if not self.env.is_main:
            return
        env = attempts[-1]["environment"]
        write_json(self.rundir.run_json, {
            "arguments": self.cfg.to_dict(),
            "source": self.source,
            "recipe": self.recipe.to_dict(),
            "model": dataclasses.asdict(self.model_config),
            "layout": {"gpus": self.cfg.gpus, "pdbs": self.pdbs, "gas": self.gas,
                       "global_batch": self.recipe.global_batch, "seq_length": self.recipe.seq_length},
            "engine": self.cfg.engine,
            "precision": self.recipe.precision,
            "distributed": {"source": self.env.source, "world_size": self.env.world_size,
                            "backend": "nccl" if self.device.type == "cuda" and self.env.world_size > 1
                            else ("gloo" if self.env.world_size > 1 else None),
                            "save_timeout_s": getattr(self, "save_timeout", None),
                            "local_start": os.environ.get(LOCAL_START_VAR)},  # fork|spawn (launch_local)
            "published": self.cfg.published,
            "deterministic": self.cfg.deterministic,
            "stop_deadline": getattr(self, "deadline", None),
            "threads_per_rank": self.threads,
            "save_steps": self.save_steps,
            "optimizer_state_from": self.optimizer_source,
            "start_weights": self._start_record(),
            "environment": env,
            "attempts": attempts,
            "finished": finished,
        })

    def _start_record(self) -> dict | None:
        """The provenance a staged start checkpoint carries (``retrace fetch-reference``'s record), if any."""
        from retrace.checkpoints.record import read_reference_record

        path = Path(self.source)
        if not (path.is_file() and path.name.endswith(".safetensors")):
            return None
        try:
            rec = read_reference_record(path).to_dict()
        except RetraceError:
            return None
        return rec if rec.get("repo") or rec.get("source") else None

    def _write_manifest(self, ckpt_dir: Path, hashes: dict, final_loss: float | None) -> Path:
        files = []
        for s in self.save_steps:
            path = self.rundir.checkpoint(s)
            name = path.name
            if not path.exists():
                raise RetraceError(f"{path} is missing although step {s} was trained")
            sha = hashes.get(str(s)) or sha256_file(path)
            files.append({"step": s, "file": name, "sha256": sha})
        manifest = self.rundir.manifest
        write_json(manifest, {"steps": list(self.save_steps), "files": files, "final_step": self.cfg.steps,
                              "start_step": self.cfg.start_step,
                              "reference": self.cfg.published or self.cfg.reference,
                              "start_weights": self.source,
                              "dtype": "float16", "final_loss": final_loss, "written": timestamp()})
        return manifest

    def _progress(self, step: int, loss: float, res, tokens_per_step: int, sec_per_step: float) -> None:
        left = (self.cfg.steps - step) * sec_per_step
        msg = (f"step {step}/{self.cfg.steps} loss {loss:.4f} lr {res.lr:.3e} scale {res.loss_scale:g}"
               f"{' SKIPPED' if res.skipped else ''} {tokens_per_step / sec_per_step:,.0f} tok/s ETA {_hms(left)}")
        if sys.stderr.isatty():
            print("\r" + msg, end="\n" if step == self.cfg.steps else "", file=sys.stderr, flush=True)
        else:
            print(msg, file=sys.stderr, flush=True)

    # ---- NeoX-native optimizer state -----------------------------------------------------------------
    def _optimizer_source_path(self) -> str | None:
        """A local GPT-NeoX directory holding the start step's ZeRO files, if the source is one (a Hub
        GPT-NeoX repo is fetched again with its optimizer states)."""
        from retrace.checkpoints import parse_source, resolve_hub

        src = parse_source(self.source)
        if src.kind != "hub":
            return str(src.path)
        snap = resolve_hub(src.repo_id, src.revision)
        if not snap.weights.is_dir():  # Hugging Face format: weights only
            return None
        try:
            return str(resolve_hub(src.repo_id, src.revision, include_optimizer=True).weights)
        except RetraceError as exc:
            warnings.warn(f"{self.source}: no ZeRO optimizer state ({exc}); starting Adam from zero",
                          RuntimeWarning, stacklevel=2)
            return None

    def _load_source_optimizer(self, engine) -> None:
        """From a GPT-NeoX native checkpoint with ZeRO optimizer files: fp32 master, Adam moments, counters."""
        from retrace.train.neox_state import open_optimizer_state

        path = self._optimizer_source_path()
        if path is None:
            return
        shapes = {n: tuple(s) for n, s in self.model_config.param_shapes().items()}
        opt = open_optimizer_state(path, shapes=shapes, n_layers=self.model_config.n_layers)
        if opt is None:
            return
        engine.load_optimizer_state(master=opt.master, exp_avg=opt.exp_avg, exp_avg_sq=opt.exp_avg_sq,
                                    adam_steps=opt.step, lr_iter=opt.lr_iter,
                                    loss_scaler=opt.loss_scaler if self.recipe.precision == "fp16" else None,
                                    adam_t_mode=self.cfg.adam_resume)
        self.optimizer_source = {"path": opt.source, "adam_steps": opt.step, "lr_iter": opt.lr_iter,
                                 "iteration": opt.iteration, "loss_scaler": opt.loss_scaler,
                                 "adam_resume": self.cfg.adam_resume, "adam_t": engine.adam_t}


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
