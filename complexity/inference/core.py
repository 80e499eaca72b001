"""The engine core: the model loop, run in its own process (the default of `complexity serve`)
or in a thread (an Engine handed to `AsyncEngine` / `create_app` in Python, e.g. tests).

This is vLLM v1's layout. The API process parses HTTP, tokenizes, detokenizes and streams; the
core process only schedules and runs the model, so the two never share a GIL and the model loop
never waits for Python HTTP work. Messages, pickled over two pipes:

    API -> core:  ("add", [(request_id, prompt_ids, params), ...]) | ("abort", [request_id, ...])
                  | ("shutdown",)
    core -> API:  ("ready", info) | ("error", message)              once, at start-up
                  ("outputs", [StepOutput, ...], stats)             one message per engine step
                  ("fatal", message)                                 before dying of a bug

A core process whose parent dies sees its command pipe close and exits; a parent whose core dies
sees the output pipe close and fails every request in flight (see AsyncEngine).

Why a thread for an Engine object: the model is already in this process (moving it would cost a
copy and a CUDA context); that mode serves tests and embedding, where simplicity beats speed.
"""

from __future__ import annotations

import faulthandler
import fcntl
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable

from ..runtime import hf_progress_bars_off
from .engine import Engine
from .outputs import StepOutput

logger = logging.getLogger(__name__)


def engine_info(engine: Engine) -> dict:
    """What the API process needs to know about the core's engine."""
    return {
        "vocab_size": engine.vocab_size,
        "max_seq_len": engine.max_seq_len,
        "max_batch": engine.max_batch,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "description": engine.describe(),
        "startup": dict(engine.startup),
    }


def engine_stats(engine: Engine) -> dict:
    return {
        "running": engine.num_running,
        "waiting": engine.num_waiting,
        "free_slots": len(engine.free_slots),
        "max_batch": engine.max_batch,
        **engine.stats,
    }


# At most this many steps' outputs are merged into one hand-over to the API process (it bounds
# the delay a merge can add to the first of them).
MAX_MERGED_STEPS = 16


# A core that does not stop when asked is sent STACKS_SIGNAL and given this long to write every
# thread's stack to its stderr (the server's log) before it is killed: what it was stuck in.
STACKS_SIGNAL = signal.SIGUSR1
STACKS_WAIT_S = 2.0


# The outputs pipe's buffer: about 60 steps of 256 rows. A 64 KiB default holds four, so the engine
# waited at the pipe whenever the API process was busy for a moment (a burst of finished
# responses to write): 10% of the wall time of 512 requests on an H100.
PIPE_BYTES = 1 << 20


def widen_pipe(conn) -> None:
    """Give `conn`'s pipe a PIPE_BYTES buffer (Linux, F_SETPIPE_SZ), so that the engine writes a
    step's outputs without waiting while the API process catches up; once it is full the engine
    waits (backpressure). Elsewhere, or above /proc/sys/fs/pipe-max-size, the default stays."""
    try:
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError):  # no F_SETPIPE_SZ here, or above the system's maximum
        pass


def pack_outputs(outputs: list[StepOutput]) -> tuple:
    """Column lists of a step's outputs: a third of the pickling time of the tuples themselves,
    paid in the engine process at every step."""
    return tuple(list(col) for col in zip(*outputs))


def unpack_outputs(columns: tuple) -> list[StepOutput]:
    return [StepOutput._make(row) for row in zip(*columns)]


def run_engine_loop(engine: Engine, poll: Callable[[float | None], list], send: Callable[[tuple], None]) -> None:
    """Serve commands until "shutdown": `poll(timeout)` returns the commands that arrived (waiting
    up to `timeout` seconds when there is nothing to run), `send(message)` ships one step's outputs.

    The stats sent with each step's outputs carry two running totals: the seconds spent in
    `engine.step()` and the seconds spent in `send` (in a process core, blocked while the API
    process has not read earlier steps yet). Outside those the loop is idle or polling."""
    busy = {"step_seconds": 0.0, "output_seconds": 0.0}
    while True:
        outputs: list[StepOutput] = []
        stop = False
        for cmd in poll(0.0 if engine.has_work() else None):
            kind = cmd[0]
            if kind == "add":
                for rid, ids, params in cmd[1]:
                    try:
                        engine.add_request(ids, params, request_id=rid, checked=True)
                    except Exception as err:  # checked in the API process; still fail only this request
                        outputs.append(
                            StepOutput(rid, [], None, None, True, "error", len(ids), 0, f"{type(err).__name__}: {err}")
                        )
            elif kind == "abort":
                for rid in cmd[1]:
                    engine.abort(rid)
            elif kind == "shutdown":
                stop = True
        if stop:  # cancel what is left: every request still gets its final output
            for req in list(engine.waiting) + list(engine.running.values()):
                engine.abort(req.request_id)
        if engine.has_work():
            t = time.perf_counter()
            outputs += engine.step()
            busy["step_seconds"] += time.perf_counter() - t
        if outputs:
            t = time.perf_counter()
            send(("outputs", outputs, {**engine_stats(engine), **busy}))
            busy["output_seconds"] += time.perf_counter() - t
        if stop:
            return


class ThreadCore:
    """The loop in a thread of this process, over an Engine object."""

    def __init__(self, engine: Engine, on_message: Callable[[tuple], None]):
        self.engine, self.on_message = engine, on_message
        self.info = engine_info(engine)
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="complexity-engine", daemon=True)
        self._thread.start()

    def _poll(self, timeout: float | None) -> list:
        if not self._inbox:
            self._wake.wait(0.1 if timeout is None else timeout)
        self._wake.clear()
        cmds = []
        while self._inbox:
            cmds.append(self._inbox.popleft())
        return cmds

    def _run(self) -> None:
        try:
            run_engine_loop(self.engine, self._poll, self.on_message)
        except Exception:
            logger.exception("the engine loop died")
            self.on_message(("fatal", traceback.format_exc()))

    def send(self, cmd: tuple) -> None:
        self._inbox.append(cmd)  # deque appends are atomic
        self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float) -> None:
        if self._thread is not None:
            self.send(("shutdown",))
            self._thread.join(timeout)


def _core_main(cmd_conn, out_conn, checkpoint: str, engine_kwargs: dict, threads: int | None, spawned: float) -> None:
    """Entry point of the core process; `spawned`: the parent's time.time() when it started it."""
    process_s = time.time() - spawned  # the interpreter and its imports (torch, transformers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the API process decides
    faulthandler.register(STACKS_SIGNAL, all_threads=True)  # see ProcessCore.close
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-core: %(message)s")
    # tqdm's bars (the weights' loading, torch.compile's tracer) share a lock that tqdm makes a
    # named semaphore for bars in other processes; the os._exit below never releases it, and the
    # resource tracker then reported a leaked semaphore at every shutdown. This process's bars are
    # all its own: a thread lock serves them.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        # No "Loading weights" bar in the server's log: its startup line says when loading is done.
        with hf_progress_bars_off():
            engine = Engine.from_pretrained(checkpoint, **engine_kwargs)
    except Exception as err:  # a bad checkpoint / flag: a clean message for the parent to print
        if isinstance(err, (ValueError, FileNotFoundError, KeyError)):
            out_conn.send(("error", str(err)))
        else:
            logger.exception("the engine could not start")
            out_conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    engine.startup["process_s"] = process_s
    out_conn.send(("ready", engine_info(engine)))

    def poll(timeout):
        if not cmd_conn.poll(timeout):
            return []
        cmds = []
        while cmd_conn.poll(0):
            cmds.append(cmd_conn.recv())
        return cmds

    def send(msg):
        if msg[0] == "outputs":
            msg = ("outputs", pack_outputs(msg[1]), msg[2])
        out_conn.send(msg)

    try:
        run_engine_loop(engine, poll, send)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the API process is gone: nothing left to serve
    except Exception:
        logger.exception("the engine loop died")
        try:
            out_conn.send(("fatal", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)
    # Out at once, past the interpreter's teardown (the compiler's worker pool, CUDA graphs and
    # context): on an H100 it outlasted the API process's 30 s wait, and nothing here needs it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class ProcessCore:
    """The loop in a spawned process that loads the checkpoint itself."""

    def __init__(
        self, checkpoint: str, engine_kwargs: dict, on_message: Callable[[tuple], None], threads: int | None = None
    ):
        self.checkpoint, self.engine_kwargs, self.on_message, self.threads = (
            checkpoint,
            engine_kwargs,
            on_message,
            threads,
        )
        self.info: dict | None = None
        self._gone = False
        self._lock = threading.Lock()
        self._reap_lock = threading.Lock()
        self._proc = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Spawn the process and wait until its engine is ready (model loaded, graphs captured).
        Raises ValueError with the core's message if it could not start."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Spawn the process and return: it imports torch and loads the checkpoint while the
        caller does its own set-up. `wait_ready` next (or `kill`)."""
        ctx = multiprocessing.get_context("spawn")
        cmd_recv, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_send = ctx.Pipe(duplex=False)
        widen_pipe(out_send)
        self._proc = ctx.Process(
            target=_core_main,
            name="complexity-engine-core",
            daemon=True,
            args=(cmd_recv, out_send, self.checkpoint, self.engine_kwargs, self.threads, time.time()),
        )
        self._proc.start()
        cmd_recv.close()
        out_send.close()  # the parent keeps only its ends: EOF then means the child is gone

    def wait_ready(self) -> None:
        """Wait until the launched engine is ready. Raises ValueError with the core's message if it
        could not start."""
        try:
            msg = self._out.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited during start-up (exit code {self._proc.exitcode})") from None
        if msg[0] == "error":
            self._proc.join(10)
            raise ValueError(msg[1])
        self.info = msg[1]
        self._reader = threading.Thread(target=self._read, name="complexity-engine-outputs", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            msgs, gone = self._receive()
            for msg in msgs:
                self.on_message(msg)
                if msg[0] == "fatal":
                    return
            if gone:
                self._gone = True
                self._join(5)
                self.on_message(("dead", f"the engine process exited (exit code {self._proc.exitcode})"))
                return

    def _receive(self) -> tuple[list[tuple], bool]:
        """(the next message, with every "outputs" message already waiting behind it merged into
        it; whether the pipe has closed). Merged steps cost the API process one batched
        detokenization and one wake-up per stream, not one each: when it falls behind it catches
        up in bigger deltas, instead of making the engine wait at the pipe."""
        msgs, columns, stats = [], [], None
        gone = False
        try:
            while True:
                msg = self._out.recv()
                if msg[0] != "outputs":
                    msgs.append(msg)
                    break
                columns.append(msg[1])
                stats = msg[2]
                if len(columns) == MAX_MERGED_STEPS or not self._out.poll(0):
                    break
        except (EOFError, OSError):
            gone = True
        if columns:  # before a start-up or fatal message: it came after these steps
            msgs.insert(0, ("outputs", [o for c in columns for o in unpack_outputs(c)], stats))
        return msgs, gone

    def send(self, cmd: tuple) -> None:
        with self._lock:
            try:
                self._cmd.send(cmd)
            except (OSError, ValueError):  # the process is gone; the reader reports it
                pass

    def alive(self) -> bool:
        # the reader's view (EOF on the pipe), not is_alive(): that is a waitpid per call, and the
        # server asks at every request
        return self._proc is not None and not self._gone

    def _join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the core process to exit; whether it has. One thread at a
        time (the reader, seeing the pipe close, and close()): when two reap the same child, the
        loser's waitpid fails and multiprocessing reports the exited process as alive."""
        with self._reap_lock:
            self._proc.join(timeout)
            return not self._proc.is_alive()

    def kill(self) -> None:
        """End the process at once, ready or not (a start its caller abandoned): no handshake,
        which a core still loading would answer only once loaded."""
        if self._proc is not None:
            self._proc.kill()
            self._join(5)

    def close(self, timeout: float) -> None:
        if self._proc is None:
            return
        self.send(("shutdown",))
        if not self._join(timeout):
            logger.warning(
                "the engine process did not stop in %.0fs: its threads' stacks follow, then it is killed", timeout
            )
            try:
                os.kill(self._proc.pid, STACKS_SIGNAL)
                self._join(STACKS_WAIT_S)
            except OSError:  # gone meanwhile
                pass
            self._proc.kill()
            self._join(5)
        if self._reader is not None:
            self._reader.join(5)


__all__ = ["ProcessCore", "ThreadCore", "run_engine_loop"]
