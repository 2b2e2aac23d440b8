"""The model worker thread: jobs answered in order, and a Pending job finished after the next one starts."""

from __future__ import annotations

import asyncio
import threading

import torch

from modelconsole.scheduler.worker import ModelWorker, Pending


async def test_pending_jobs_overlap_with_the_next_start_and_answer_in_order():
    loop = asyncio.get_running_loop()
    worker = ModelWorker("t", torch.device("cpu"), loop)
    trace: list[str] = []
    gate = threading.Event()
    answers: list[tuple[str, object, object]] = []
    done_all = asyncio.Event()

    def job(name, pending):
        def start():
            trace.append(f"start {name}")
            if name == "a":
                gate.wait(5)  # hold the thread until b and c are queued
            if pending:
                return Pending(lambda: trace.append(f"finish {name}") or name)
            return name
        return start

    def done(name):
        def cb(result, error):
            answers.append((name, result, error))
            if len(answers) == 4:
                done_all.set()
        return cb

    worker.submit(job("a", True), done("a"))
    worker.submit(job("b", True), done("b"))
    worker.submit(job("c", False), done("c"))
    worker.submit(lambda: (_ for _ in ()).throw(ValueError("boom")), done("d"))
    gate.set()
    await asyncio.wait_for(done_all.wait(), 5)
    worker.stop()
    worker.join(5)
    # b started before a finished (the device would go straight from a to b)
    assert trace.index("start b") < trace.index("finish a")
    assert [a[0] for a in answers] == ["a", "b", "c", "d"]
    assert answers[0][1] == "a" and answers[1][1] == "b" and answers[2][1] == "c"
    assert isinstance(answers[3][2], ValueError)


def test_torch_threads_are_chosen_per_worker_thread():
    """policy.torch_threads: configured wins (0 = torch's default), else one; and the worker thread
    really runs with the count it was given."""
    import asyncio

    from modelconsole.scheduler import policy
    from modelconsole.scheduler.worker import ModelWorker

    assert policy.torch_threads() == 1 and policy.torch_threads(4) == 4 and policy.torch_threads(0) == 0

    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        seen = []
        for n in (1, 2):
            w = ModelWorker(f"t{n}", torch.device("cpu"), loop, threads=n)
            seen.append(await w.call(torch.get_num_threads, inference=True))
            w.stop()
            w.join(10)
        return seen

    assert asyncio.run(scenario()) == [1, 2]
