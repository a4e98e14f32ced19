"""Worker entry points that fail on purpose, for the tensor-parallel fault tests (a
module of their own: the spawned process imports it, and nothing heavy)."""

import os
import time


def rank_one_raises(rank, placement, config, source, threads, conn, parent_pid):
    """Every rank loads nothing and reports ready; rank 1 then raises as a broken step
    would (through worker_main's own error path), the others wait for ever as healthy
    ranks waiting for the driver's next step do."""
    from pagedserve.distributed import worker

    def run_rank(rank, *args):
        conn.send(("ready", rank, os.getpid(), 0))
        if rank == 1:
            raise RuntimeError(f"injected fault on rank {rank}")
        while True:
            time.sleep(1)

    worker.run_rank = run_rank
    worker.worker_main(rank, placement, config, source, threads, conn, parent_pid)
