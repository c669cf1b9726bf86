"""`--engine ray`: the same stages on Ray Data, for folders larger than one machine.

The inputs become a dataset of paths; decoding runs in Ray tasks, explaining and writing
in a pool of actors (one model each) via `map_batches`; the driver streams the records
back as they complete (to `--jsonl`, the summary and the progress bar). Workers write
exactly the files a local run writes, under the same `--out`, which every worker must be
able to write (a shared file system on a cluster). Ray is imported only here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camcli.errors import CamcliError, Interrupted, UsageError
from camcli.io import InputItem, json_text
from camcli.run.plan import ExplainConfig, Prepared, prepare
from camcli.run.reporting import Reporter, RunSummary
from camcli.run.stages import (
    Decoded,
    Outcome,
    build_record,
    decode,
    explain_batch,
    prior_for,
    remove_stale,
    write_outputs,
)

INSTALL = "pip install 'camcli[ray]'"
# A decode task's CPU share: decoding (cv2, the GIL released) is lighter than a model actor.
DECODE_CPUS = 0.5


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local instance; "auto" or "ray://HOST:PORT": a cluster
    workers: int = 2  # model actors
    gpus_per_worker: float = 0.0


def require_ray() -> Any:
    """The ray module, or a usage error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra
    except ImportError:
        raise UsageError(f"--engine ray needs Ray Data: {INSTALL}") from None
    return ray


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 into a temporary file while Ray starts (its C++ core prints a line
    of its own whatever the log level); shown after all if starting fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _decode_rows(batch: dict[str, Any], config: ExplainConfig, spec: Any) -> dict[str, Any]:
    """Ray task: paths -> RGB images and model inputs (a broken file becomes its error)."""
    out: dict[str, list[Any]] = {"path": [], "key": [], "image": [], "tensor": [], "error": []}
    for path, key in zip(batch["path"], batch["key"], strict=True):
        decoded = decode(InputItem(Path(path), str(key)), spec, config.max_pixels)
        out["path"].append(str(path))
        out["key"].append(str(key))
        out["image"].append(decoded.image)
        out["tensor"].append(None if decoded.tensor is None else decoded.tensor.numpy())
        out["error"].append(decoded.error or "")
    return out


class ExplainActor:
    """One model per actor: explain a batch of decoded rows, write their files, return the
    records (as JSON text: a column of plain strings) and how each image ended."""

    def __init__(self, config: ExplainConfig, gpus: float) -> None:
        from camcli.allocator import reuse_freed_memory

        reuse_freed_memory()  # the actor's process serves camcli alone (camcli.allocator)
        self.prepared = prepare(config, "cuda" if gpus > 0 else "cpu")
        # the actor's own model stays in the engine's memory format for its whole life
        # (converting it per batch would copy every weight twice a batch)
        self._session = ExitStack()
        self._session.enter_context(self.prepared.explainer.session())

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        import torch

        decoded = []
        for path, key, image, tensor, error in zip(
            batch["path"], batch["key"], batch["image"], batch["tensor"], batch["error"], strict=True
        ):
            item = InputItem(Path(path), str(key))
            prior = prior_for(self.prepared, item)
            ok = not error
            decoded.append(
                Decoded(
                    item,
                    image if ok else None,
                    torch.from_numpy(tensor) if ok else None,
                    None if ok else str(error),
                    prior=prior,
                )
            )
        records, states = [], []
        remove_stale(self.prepared, [d.item for d in decoded])
        outcomes = explain_batch(self.prepared, decoded)
        for outcome in outcomes:
            try:
                record = write_outputs(self.prepared, outcome, build_record(self.prepared, outcome))
                state = "done" if outcome.error is None else "failed"
            except Exception as exc:  # noqa: BLE001 - a failed write is that image's error, not the job's
                record = build_record(self.prepared, Outcome(outcome.item, None, f"cannot write outputs: {exc}"))
                state = "failed"
            records.append(json_text(record))
            states.append(state)
        return {"record": records, "state": states}


def run_on_ray(prepared: Prepared, items: Sequence[InputItem], reporter: Reporter, options: RayOptions) -> RunSummary:
    """Explain `items` on Ray; `prepared` (built on the driver's CPU) has checked every
    option, answers which images are finished and gives the decoders the input recipe."""
    ray = require_ray()
    config = prepared.config
    summary = RunSummary()
    todo = []
    for item in items:
        prior = prior_for(prepared, item)
        if prior is not None and prior.finished:  # finished earlier: never sent to the cluster
            summary.skipped += 1
            reporter.emit(prior.record)  # type: ignore[arg-type]
            reporter.advance(1)
        else:
            todo.append(item)
    if not todo:
        return summary
    started = not ray.is_initialized()
    if started:  # camcli's own lines on stderr, not Ray's (its C++ and Ray Data's INFO/WARNING logs)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        with _quiet_stderr():
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # camcli's bar on the driver, fed by the records
    context.print_on_execution_start = False
    try:
        rows = ray.data.from_items([{"path": str(item.path), "key": item.key} for item in todo])
        decoded = rows.map_batches(
            _decode_rows,
            fn_kwargs={"config": config, "spec": prepared.loaded.input},
            batch_size=config.batch_size,
            num_cpus=DECODE_CPUS,  # not the actors' 1: Ray would fuse decoding into the actors
        )
        explained = decoded.map_batches(
            ExplainActor,
            fn_constructor_kwargs={"config": config, "gpus": options.gpus_per_worker},
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_gpus=options.gpus_per_worker or None,
        )
        for row in explained.iter_rows():
            record = json.loads(row["record"])
            failed = None if row["state"] == "done" else f"{record['image']}: {record['error']}"
            summary.ended(reporter, record, failed)
    except (KeyboardInterrupt, Interrupted):  # the CLI's handler raises Interrupted
        summary.interrupted = True
    except Exception as exc:  # an actor's own error (a usage error found on a worker) as one line
        cause = getattr(exc, "cause", None)
        if isinstance(cause, CamcliError):
            raise cause from None
        raise
    finally:
        if started:
            ray.shutdown()
    return summary
