"""`--tensor-parallel N`: one engine whose attention heads and MLP are split over N processes (one per GPU).

    rank 0 (the kvbatch process)                          ranks 1..N-1 (workers)
    ┌──────────────────────────────────────────┐          ┌───────────────────────────────┐
    │ job -> Engine: scheduler, sampling, pool │          │ serve(): wait for a command    │
    │   runner.forward(step) ── STEP ─────────────────────> │   forward(step) on own pages   │
    │   own forward (1/N heads, all_reduce) <──all_reduce─> │   (1/N heads, all_reduce)      │
    │   logits -> sample                       │          │   logits dropped               │
    └──────────────────────────────────────────┘          └───────────────────────────────┘

One scheduler (rank 0's) decides every step; every rank holds the KV pages of its own KV heads, with the same
block ids, so a block id means the same tokens everywhere. The layer split is tp_shard.py, the messages tp_comm.py.

Launch: `kvbatch run --tensor-parallel N` spawns the N-1 workers itself (torch.multiprocessing, spawn) and
rendezvouses over TCP on localhost; under `torchrun --nproc-per-node N kvbatch run ...` ranks > 0 serve (see
cli.py) and rank 0 runs the jobs. Backend: NCCL on GPUs, gloo on the CPU (tests).

Limits: Llama-style decoders only (q/k/v/o and gate/up/down Linears); each rank loads the whole checkpoint on
the CPU before keeping its share, so host memory must hold one copy per rank; a step that fails on one rank
is not isolated like single-process steps are: a lost worker ends the run (finished rows stay committed).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvbatch.errors import TensorParallelLost
from kvbatch.runner.engine import Engine, EngineConfig
from kvbatch.runner.model_loader import LoadedModel, load_model, resolve_device, resolve_dtype
from kvbatch.runner.model_runner import ModelRunner, StepInputs
from kvbatch.runner.parallel import comm as tp_comm
from kvbatch.runner.parallel.log_settings import LogSettings
from kvbatch.runner.parallel.shard import TensorParallelError, shard_model

log = logging.getLogger(__name__)
CONTROL_TIMEOUT = timedelta(days=7)  # a worker waits for rank 0's next message as long as rank 0 runs
Loader = Callable[[str, dict[str, Any], torch.device], LoadedModel]  # (model, engine settings, rank's device)


def load_on_cpu(model: str, settings: dict[str, Any], device: torch.device) -> LoadedModel:
    """The default Loader: the whole checkpoint on the CPU, in the dtype `device` will run."""
    dtype = resolve_dtype(settings.get("dtype", "auto"), device)
    return load_model(
        model,
        "cpu",
        str(dtype).removeprefix("torch."),
        settings.get("max_model_len"),
        settings.get("trust_remote_code", False),
        settings.get("allow_pickle", False),
        settings.get("allow_download", False),
    )


@dataclass
class _World:
    size: int
    use_cuda: bool
    loader: Loader
    procs: list[Any] = field(default_factory=list)  # spawned workers; empty under torchrun
    next_engine_id: int = 0
    control: Any = None  # the gloo group that carries rank 0's messages (tp_comm.py)
    in_step: bool = False  # a step was sent and rank 0's own share has not returned (an interrupt may land here)
    num_threads_before: int | None = None  # rank 0's torch threads before the ranks shared the cores

    @property
    def device(self) -> torch.device:
        return rank_device(0, self.use_cuda)

    def can_talk(self) -> bool:
        """True when the workers are waiting for a message: alive, and not inside a step rank 0 left."""
        return not self.in_step and all(p.is_alive() for p in self.procs)

    def check_alive(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise TensorParallelLost(
                f"tensor-parallel worker {dead[0].name} exited with code {dead[0].exitcode}; rerun to resume"
            )


_WORLD: _World | None = None


def rank_device(rank: int, use_cuda: bool) -> torch.device:
    return torch.device("cuda", rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")


def _uses_cuda(settings: dict[str, Any]) -> bool:
    device = settings.get("device") or "auto"
    if device == "cpu":
        return False
    if device not in ("auto", "cuda"):
        raise ValueError(
            f"with tensor parallel, rank r uses cuda:r; set engine.device to auto, cuda or cpu, not {device!r}"
        )
    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_world(size: int, use_cuda: bool, loader: Loader) -> _World:
    if use_cuda and size > torch.cuda.device_count():  # rank r runs on cuda:r; NCCL refuses two ranks on one GPU
        raise TensorParallelError(
            f"--tensor-parallel {size} needs {size} GPUs; this process sees {torch.cuda.device_count()} "
            "(CUDA_VISIBLE_DEVICES)"
        )
    world = _World(size, use_cuda, loader)
    backend = "nccl" if use_cuda else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the other ranks run serve_from_env()
        if int(os.environ["WORLD_SIZE"]) != size:
            raise ValueError(
                f"--tensor-parallel {size} under torchrun with {os.environ['WORLD_SIZE']} processes; make them equal"
            )
        dist.init_process_group(backend, init_method="env://")
    else:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        # torch's default follows OMP_NUM_THREADS and the CPUs given (Slurm), not every core of the node
        threads = max(1, torch.get_num_threads() // size)
        for rank in range(1, size):
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, size, init_method, loader, use_cuda, threads, LogSettings.of_this_process()),
                name=f"kvbatch-tp{rank}",
                daemon=True,
            )
            proc.start()
            world.procs.append(proc)
        if not use_cuda:
            world.num_threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)  # the ranks share the cores
        dist.init_process_group(backend, init_method=init_method, rank=0, world_size=size)
    if use_cuda:
        torch.cuda.set_device(world.device)
    world.control = _control_group()
    atexit.register(shutdown)
    return world


def _control_group() -> dist.ProcessGroup:
    """Every rank calls this once, right after joining: the group rank 0's messages travel on (tp_comm.py)."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def shutdown() -> None:
    """Stop the workers and leave the process group (at exit, or between tests)."""
    global _WORLD
    world, _WORLD = _WORLD, None
    if world is None:
        return
    try:
        if world.can_talk():
            tp_comm.send_command(tp_comm.EXIT, 0, world.control)
            for proc in world.procs:
                proc.join(timeout=30)
        # else: stuck in a step that rank 0 abandoned (a second signal): spawned workers are killed below;
        # under torchrun, rank 0's exit makes torchrun stop the others.
    finally:
        for proc in world.procs:
            if proc.is_alive():
                proc.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        if world.num_threads_before is not None:
            torch.set_num_threads(world.num_threads_before)


def start_tensor_parallel(model: str, settings: dict[str, Any], size: int, loader: Loader = load_on_cpu) -> Engine:
    """Rank 0's engine for `model`, with ranks 1..size-1 building their shares at the same time."""
    global _WORLD
    use_cuda = _uses_cuda(settings)
    if _WORLD is None:
        _WORLD = _start_world(size, use_cuda, loader)
    world = _WORLD
    if (world.size, world.use_cuda, world.loader) != (size, use_cuda, loader):
        raise ValueError(
            f"one run uses one tensor-parallel layout; already {world.size} ranks on "
            f"{'cuda' if world.use_cuda else 'cpu'}"
        )
    world.check_alive()
    engine_id, world.next_engine_id = world.next_engine_id, world.next_engine_id + 1
    tp_comm.send_command(tp_comm.LOAD, engine_id, world.control, (model, settings))
    engine = build_rank_engine(model, settings, world.loader, 0, size, world.device)
    return TensorParallelEngine(engine, engine_id, world)


def build_rank_engine(
    model: str, settings: dict[str, Any], loader: Loader, rank: int, size: int, device: torch.device
) -> Engine:
    """This rank's engine: its share of the layers on its device, and a pool of the size every rank can hold."""
    return _rank_engine(model, settings, _load_share(model, settings, loader, rank, size, device), device)


def _load_share(
    model: str, settings: dict[str, Any], loader: Loader, rank: int, size: int, device: torch.device
) -> LoadedModel:
    """This rank's share of the layers on its device. No collective runs here, so an error here (a missing model,
    heads that do not split) is met by every rank alike, before any of them waits for the others."""
    loaded = loader(model, settings, device)
    shard_model(loaded.model, rank, size)
    if next(
        loaded.model.parameters()
    ).is_meta:  # a random benchmark model (tp_random.py): only this rank's share is made
        loader.materialize(loaded.model, device, rank, size)  # type: ignore[attr-defined]
    loaded.model.to(device)
    return dataclasses.replace(loaded, device=device)


def _rank_engine(model: str, settings: dict[str, Any], loaded: LoadedModel, device: torch.device) -> Engine:
    config = EngineConfig(model=model, **{**settings, "device": str(device), "cuda_graphs": False})
    engine = Engine(config, loaded)  # on a GPU the pool is profiled: every rank runs that step together
    agreed = torch.tensor([engine.pool_size.num_blocks], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if int(agreed) != engine.pool_size.num_blocks:  # same block ids must exist on every rank
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
        engine = Engine(dataclasses.replace(config, num_blocks_override=int(agreed)), loaded)
    return engine


class _BroadcastingRunner(ModelRunner):
    """Rank 0's runner: every step goes to the workers first, then through rank 0's own share."""

    def __init__(self, base: ModelRunner, engine_id: int, world: _World) -> None:
        super().__init__(base.model, base.kv_cache, base.backend, base.fused)
        self.engine_id, self.world = engine_id, world

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        self.world.check_alive()
        self.world.in_step = True
        tp_comm.send_step(self.engine_id, inputs, self.world.control)
        try:
            logits = super().forward(inputs)
        except Exception as exc:
            # The workers run this step and wait in its collectives: the engine's usual retry (each row alone)
            # would pair its all-reduces with theirs, a hang or wrong tokens. in_step stays set, so shutdown
            # kills the workers rather than talk to them.
            raise TensorParallelLost(
                f"a tensor-parallel step failed on rank 0 ({type(exc).__name__}: {exc}); "
                "the ranks are out of step, so the run stops: finished rows are kept, rerun to resume"
            ) from exc
        self.world.in_step = False
        return logits


class TensorParallelEngine(Engine):
    """Rank 0's Engine (scheduler, pool, sampling) with a runner that drives every rank."""

    def __init__(self, engine: Engine, engine_id: int, world: _World) -> None:  # noqa: D107 - adopts a built engine
        self.__dict__.update(engine.__dict__)
        self.runner = _BroadcastingRunner(engine.runner, engine_id, world)
        self.engine_id, self.world = engine_id, world

    def close(self) -> None:
        if _WORLD is self.world and self.world.can_talk():
            tp_comm.send_command(tp_comm.CLOSE, self.engine_id, self.world.control)
        parent_close = getattr(Engine, "close", None)
        if parent_close is not None:
            parent_close(self)


# ---- ranks > 0 -------------------------------------------------------------------------------------------


def _worker_main(
    rank: int, size: int, init_method: str, loader: Loader, use_cuda: bool, threads: int, log_settings: LogSettings
) -> None:
    log_settings.apply()  # -q, -v and the hidden weight-loading bars of rank 0's command
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)  # rank 0 decides when to stop, and tells us
    torch.set_num_threads(threads)
    device = rank_device(rank, use_cuda)
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank, world_size=size)
    serve(rank, size, device, loader, _control_group())


def serve_from_env(loader: Loader = load_on_cpu) -> None:
    """A rank > 0 under torchrun: join the group from RANK/WORLD_SIZE/MASTER_ADDR and serve until rank 0 exits."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available()
    device = rank_device(int(os.environ.get("LOCAL_RANK", rank)), use_cuda)
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    serve(rank, size, device, loader, _control_group())


def serve(rank: int, size: int, device: torch.device, loader: Loader, control: dist.ProcessGroup) -> None:
    engines: dict[int, Engine] = {}
    try:
        while True:
            command, engine_id, header = tp_comm.receive(control)
            if command == tp_comm.STEP:
                engines[engine_id].runner.forward(tp_comm.receive_step(header, device, control))
            elif command == tp_comm.LOAD:
                model, settings = tp_comm.receive_object(control)
                try:
                    loaded = _load_share(model, settings, loader, rank, size, device)
                except Exception as exc:  # noqa: BLE001 - rank 0 meets the same error and reports it as the job's
                    log.warning(
                        "rank %d: cannot load %s (%s: %s); waiting for the next job",
                        rank,
                        model,
                        type(exc).__name__,
                        exc,
                    )
                    continue
                engines[engine_id] = _rank_engine(model, settings, loaded, device)
            elif command == tp_comm.CLOSE:
                engines.pop(engine_id, None)
            elif command == tp_comm.EXIT:
                break
            else:
                raise RuntimeError(f"rank {rank}: unknown tensor-parallel command {command}")
    finally:
        dist.destroy_process_group()


class TensorParallelFactory:
    """An EngineFactory (picklable, for data-parallel children) with a custom Loader, e.g. a test model."""

    def __init__(self, loader: Loader = load_on_cpu) -> None:
        self.loader = loader

    def __call__(self, model: str, settings: dict[str, Any]) -> Engine:
        settings = dict(settings)
        size = settings.pop("tensor_parallel", 1)
        if size == 1:
            return Engine(
                EngineConfig(model=model, **settings),
                self.loader(model, settings, resolve_device(settings.get("device", "auto"))),
            )
        return start_tensor_parallel(model, settings, size, self.loader)
