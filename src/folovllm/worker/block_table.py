"""The runner's copy of every running request's block table, kept up to date from changes alone.

Each step the scheduler says, per request, "from entry ``block_offset`` on, the
table is now ``new_block_ids``" (usually nothing: a block holds 16 decode
steps). The table rows live in one numpy array; a step's ``[num_seqs, width]``
block table is a gather of rows, and its slot mapping is computed from it
with array arithmetic, not per-token Python.
"""

from __future__ import annotations

import numpy as np

from folovllm.core.sched.output import SchedulerOutput


class BlockTable:
    def __init__(self, max_num_reqs: int, max_blocks_per_req: int) -> None:
        self.table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int32)
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    def update(self, sched: SchedulerOutput) -> np.ndarray:
        """Apply one step's changes; returns the row of each scheduled request, in step order."""
        for rid in (*sched.finished_req_ids, *sched.preempted_req_ids):
            row = self.row_of.pop(rid, None)
            if row is not None:
                self._free_rows.append(row)
        rows = np.empty(len(sched.scheduled), dtype=np.int64)
        for i, s in enumerate(sched.scheduled):
            row = self.row_of.get(s.req_id)
            if row is None:
                if s.block_offset:
                    raise ValueError(
                        f"request {s.req_id!r} changes its block table from entry "
                        f"{s.block_offset} but the runner has no table for it"
                    )
                if not self._free_rows:
                    raise ValueError(f"more than {len(self.num_blocks)} requests hold block tables")
                row = self.row_of[s.req_id] = self._free_rows.pop()
            end = s.block_offset + len(s.new_block_ids)
            if s.new_block_ids:
                self.table[row, s.block_offset : end] = s.new_block_ids
            self.num_blocks[row] = end
            rows[i] = row
        return rows
