"""Ray executor: the same per-study work on a Ray cluster, in model-holding actors.

Each actor builds one :class:`~medgen.batch.work.StudyWorker` (so the model is loaded once
per actor, and with GPUs one actor per GPU: ``num_gpus=1`` when the pipeline asks for
``cuda``) and runs the studies it is given in order. The driver alone writes the ledger:
an actor returns its stage outcomes and the driver records them, so the ledger and the
outputs are exactly those of a local run. An actor that dies (node lost, killed, out of
memory) is reported like a dead local worker and replaced.

``pip install 'medgen[ray]'``; ``address=None`` starts a local Ray, ``"auto"`` joins the
cluster this machine belongs to.
"""

from __future__ import annotations

import time

from medgen.batch.spec import BatchPipeline
from medgen.batch.work import StudyTask


def _actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class StudyActor:
        """Holds a StudyWorker; ``run`` returns the study's stage outcomes."""

        def __init__(self, pipeline_json: str, worker_id: str) -> None:
            from medgen.batch.work import StudyWorker

            self.worker = StudyWorker(BatchPipeline.model_validate_json(pipeline_json), worker_id)

        def run(self, task: StudyTask):
            outcomes = []
            self.worker.run(task, outcomes.append)
            return outcomes

        def models_loaded(self) -> int:
            return self.worker.models_loaded

    return StudyActor


class RayExecutor:
    """``n_workers`` actors, each given up to ``depth`` studies at a time (see
    :class:`medgen.batch.local.LocalExecutor` for the events)."""

    name = "ray"

    def __init__(self, pipeline: BatchPipeline, n_workers: int, *, address: str | None = None, depth: int = 2) -> None:
        try:
            import ray
        except ImportError:
            from medgen.errors import MedgenError

            raise MedgenError("the ray executor needs Ray: pip install 'medgen[ray]'") from None
        self._ray = ray
        self.pipeline = pipeline
        self.n_workers = n_workers
        self.depth = depth
        self.address = address
        self._started_ray = False
        self._actors: dict[str, object] = {}
        self._held: dict[str, list[str]] = {}
        self._futures: dict[object, tuple[str, str]] = {}
        self._started: list[tuple] = []
        self._serial = 0
        self._gpus = 1 if pipeline.model_settings().device == "cuda" else 0

    def start(self) -> None:
        if not self._ray.is_initialized():
            self._ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        for _ in range(self.n_workers):
            self._spawn()

    def _spawn(self) -> str:
        wid = f"ray-{self._serial}"
        self._serial += 1
        actor_cls = _actor_class()
        self._actors[wid] = actor_cls.options(num_gpus=self._gpus, num_cpus=1).remote(
            self.pipeline.model_dump_json(), wid)
        self._held[wid] = []
        return wid

    def free_slots(self) -> list[str]:
        return [w for w, held in self._held.items() for _ in range(self.depth - len(held))]

    def submit(self, worker_id: str, task: StudyTask) -> None:
        self._held[worker_id].append(task.key)
        self._futures[self._actors[worker_id].run.remote(task)] = (worker_id, task.key)
        if len(self._held[worker_id]) == 1:  # an actor runs its calls in order: this one now
            self._started.append(("started", worker_id, task.key))

    def poll(self, timeout: float) -> list[tuple]:
        events, self._started = self._started, []
        if not self._futures:
            time.sleep(min(timeout, 0.05))
            return events
        ready, _ = self._ray.wait(list(self._futures), num_returns=1, timeout=0.0 if events else timeout)
        for ref in ready:
            wid, key = self._futures.pop(ref)
            try:
                outcomes = self._ray.get(ref)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError) as exc:
                events.append(self._bury(wid, type(exc).__name__))
                continue
            events.extend(("stage", wid, o) for o in outcomes)
            events.append(("finished", wid, key))
            if key in self._held.get(wid, []):
                self._held[wid].remove(key)
                if self._held[wid]:
                    events.append(("started", wid, self._held[wid][0]))
        return events

    def _bury(self, wid: str, why: str) -> tuple:
        keys = self._held.pop(wid, [])
        self._futures = {r: v for r, v in self._futures.items() if v[0] != wid}
        actor = self._actors.pop(wid, None)
        if actor is not None:
            self._ray.kill(actor)
        self._spawn()
        return ("died", wid, keys, f"Ray actor died ({why})")

    def close(self) -> None:
        for actor in self._actors.values():
            self._ray.kill(actor)
        self._actors.clear()
        if self._started_ray:
            self._ray.shutdown()
