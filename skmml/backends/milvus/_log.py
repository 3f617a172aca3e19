"""The commit log of a Milvus memory: writes that become visible all at once, or never.

Milvus has no multi-row transactions, so visibility is built on top of it,
as MVCC databases do. Every write (an import, a ``partial_fit``, an
``expand``) is a *batch*: it opens a record in the companion collection
``<collection>__skmml_log`` (the record's Milvus-generated key is the batch
number), inserts its rows tagged with that number, and becomes visible by
one final single-row insert, its commit record. A reader reads the log once
per operation and filters every search and query on

    ``batch <= head and batch not in hidden``

where ``head`` is the highest committed batch and ``hidden`` holds the
batches at or below it that are open (still writing, or crashed) or rolled
back. Batch numbers grow with time (Milvus generates keys in increasing
order on one standalone server or Milvus Lite), so a batch opened after the
reader's look at the log is above ``head``.

A writer that fails rolls its batch back: a rollback record first (the
batch stays hidden whatever happens next), then its rows are deleted. A
writer that died (SIGKILL, lost machine, server killed under it) leaves an
open record: its rows stay hidden, and the next writer, or
:meth:`~skmml.MilvusMemory.recover`, rolls it back once its writer cannot
be alive: at once if it ran on this machine and its process is gone (or,
for Milvus Lite, in any other process: Lite serves one process per file),
else when its lease (a deadline bounded by the writer's calls and their
timeout) has passed.

Committed records below the head are compacted away by later commits; the
rollback records of batches whose rows may still arrive (a timed-out insert
the server applies later) are kept, so those rows stay hidden for good.
"""

import threading
import time
from collections import namedtuple

from ..._process import is_dead, process_tag, split_tag
from ._connection import _is_lite, _pymilvus, add_note

_LOG_SUFFIX = "__skmml_log"
OPEN, COMMITTED, ROLLED_BACK = 0, 1, 2
#: Longest owner description kept in an open record.
_MAX_OWNER = 256
#: Seconds a lease outlives the writer's calls, for clocks that disagree a little.
_LEASE_SLACK = 60.0
#: Most records one read of the log returns (Milvus's largest query window).
_MAX_RECORDS = 16384

#: Batches being written by this process: (uri, collection, batch).
_IN_FLIGHT = set()
_IN_FLIGHT_GUARD = threading.Lock()


def create_log(client, name, timeout):
    pymilvus = _pymilvus()
    DataType = pymilvus.DataType
    schema = pymilvus.MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    schema.add_field("batch", DataType.INT64)
    schema.add_field("state", DataType.INT8)
    schema.add_field("deadline", DataType.DOUBLE)
    schema.add_field("owner", DataType.VARCHAR, max_length=_MAX_OWNER)
    schema.add_field("slot", DataType.FLOAT_VECTOR, dim=2)
    index = client.prepare_index_params()
    index.add_index("slot", index_type="FLAT", metric_type="IP")
    client.create_collection(name + _LOG_SUFFIX, schema=schema, index_params=index,
                             consistency_level="Strong", num_shards=1, timeout=timeout)


class Snapshot(namedtuple("Snapshot", "head hidden")):
    """What one read of the log makes visible: batches up to `head` not in `hidden`."""

    def where(self, *clauses):
        """A Milvus filter of the visible rows matching every one of `clauses`."""
        terms = [f"batch <= {self.head}"]
        if self.hidden:
            terms.append(f"batch not in {sorted(self.hidden)}")
        return " and ".join([f"({c})" for c in clauses if c] + terms)

    def visible(self, batch):
        return batch <= self.head and batch not in self.hidden


class _Records:
    """One read of the log, by kind of record."""

    def __init__(self, rows):
        self.rows = rows
        self.opened = {r["key"]: r for r in rows if r["state"] == OPEN}
        self.committed = {r["batch"] for r in rows if r["state"] == COMMITTED}
        self.rolled_back = {r["batch"] for r in rows if r["state"] == ROLLED_BACK}

    def snapshot(self):
        head = max(self.committed, default=-1)
        hidden = self.rolled_back | (set(self.opened) - self.committed)
        return Snapshot(head, frozenset(b for b in hidden if b <= head))

    def state(self, batch):
        """The state of `batch` whose rows were seen *after* this read of the log.

        A batch without records either committed and was compacted (it is at
        or below the head) or began after this read (above the head: batch
        numbers grow). A rolled-back batch's records go only after its rows.
        """
        if batch in self.rolled_back:
            return ROLLED_BACK
        if batch in self.committed:
            return COMMITTED
        if batch in self.opened:
            return OPEN
        return COMMITTED if batch <= max(self.committed, default=-1) else OPEN


class CommitLog:
    """The commit log of one memory, read and written through `memory`'s client."""

    def __init__(self, memory):
        self.memory = memory
        self.name = memory.collection + _LOG_SUFFIX

    def records(self):
        """One read of the log."""
        rows = self.memory._call("read the commit log", self.memory._client().query, self.name,
                                 filter="state >= 0", limit=_MAX_RECORDS,
                                 output_fields=["batch", "state", "deadline", "owner"],
                                 consistency_level="Strong")
        if len(rows) >= _MAX_RECORDS:  # a truncated log would give a wrong snapshot
            raise RuntimeError(
                f"The commit log of {self.memory._where()} holds {_MAX_RECORDS} records or "
                "more (writes that failed while the server was unreachable); call recover() "
                "with no writer running, or re-import the memory.")
        return _Records(rows)

    def snapshot(self):
        """The visible state now."""
        return self.records().snapshot()

    def begin(self, n_calls):
        """Open a batch for a write of `n_calls` calls; return its number.

        First rolls back the batches of writers that died.
        """
        self._roll_back_dead(self.records(), force=False)
        lease = self.memory.timeout * (n_calls + 8) + _LEASE_SLACK
        # Registered before another thread of this process can take it for a dead one.
        with _IN_FLIGHT_GUARD:
            batch = self._insert({"batch": -1, "state": OPEN, "deadline": time.time() + lease,
                                  "owner": process_tag()[:_MAX_OWNER]})
            _IN_FLIGHT.add((self.memory.uri, self.memory.collection, batch))
        return batch

    def commit(self, batch):
        """Make `batch` visible with one insert; a batch past its lease is rolled back instead."""
        try:
            records = self.records()
            record = records.opened.get(batch)
            if record is None or batch in records.rolled_back or time.time() > record["deadline"]:
                self.roll_back(batch, settled=False)
                raise RuntimeError(
                    f"The write to {self.memory._where()} outlived its lease and was rolled "
                    "back: nothing of it is visible; retry it.")
            try:
                self._insert({"batch": batch, "state": COMMITTED, "deadline": 0.0,
                              "owner": ""})
            except ConnectionError as exc:
                # The commit record may still land; a rollback record outranks it.
                try:
                    self._insert({"batch": batch, "state": ROLLED_BACK, "deadline": 0.0,
                                  "owner": ""})
                except ConnectionError:
                    add_note(exc, "The commit record may have reached the server: the write "
                                 "is either wholly visible or not at all once the server is "
                                 "back; check with refresh() and counts().")
                raise
        finally:
            self._done(batch)
        self._delete_records(f"state == {OPEN} and key == {batch}")
        self._compact(batch)

    def roll_back(self, batch, settled=True):
        """Hide `batch` for good, then delete its rows.

        `settled`: every call of its writer has returned, so no row of it can
        still arrive, and its records may go once its rows are deleted.
        """
        try:
            self._insert({"batch": batch, "state": ROLLED_BACK, "deadline": 0.0, "owner": ""})
            self._delete_rows([batch])
            if settled:
                self._delete_records(f"(state == {OPEN} and key == {batch}) or "
                                     f"(state == {ROLLED_BACK} and batch == {batch})")
            else:
                self._delete_records(f"state == {OPEN} and key == {batch}")
        finally:
            self._done(batch)

    def recover(self, force=False):
        """Roll back the batches of dead writers and delete the rows of rolled-back ones.

        Returns (rolled_back, rows_removed): the batches rolled back now and
        the number of hidden rows deleted.
        """
        records = self.records()
        batches = sorted(records.rolled_back | set(self._dead_batches(records, force)))
        removed = self.memory._count(self.memory.collection, f"batch in {batches}") \
            if batches else 0
        rolled = self._roll_back_dead(records, force=force)
        if records.rolled_back:
            self._delete_rows(records.rolled_back)
        return rolled, removed

    # -- internals -------------------------------------------------------------------------

    def _insert(self, record):
        result = self.memory._call("write the commit log", self.memory._client().insert,
                                   self.name, [dict(record, slot=[0.0, 1.0])])
        return int(result["ids"][0])

    def _delete_records(self, where):
        self.memory._call("write the commit log", self.memory._client().delete, self.name,
                          filter=where)

    def _delete_rows(self, batches):
        self.memory._call("delete rolled-back rows", self.memory._client().delete,
                          self.memory.collection, filter=f"batch in {sorted(batches)}")

    def _done(self, batch):
        with _IN_FLIGHT_GUARD:
            _IN_FLIGHT.discard((self.memory.uri, self.memory.collection, batch))

    def _dead(self, record, force):
        """Whether the writer of the open `record` cannot be writing any more."""
        with _IN_FLIGHT_GUARD:
            if (self.memory.uri, self.memory.collection, record["key"]) in _IN_FLIGHT:
                return False
        if force:
            return True
        host, pid, _ = split_tag(record["owner"])
        me = process_tag()
        if record["owner"] == me:
            return True  # this process, not writing it: its writer gave up
        if host == split_tag(me)[0] and pid is not None and (
                is_dead(record["owner"]) or (_is_lite(self.memory.uri) and pid != split_tag(me)[1])):
            return True
        return time.time() > record["deadline"]

    def _dead_batches(self, records, force):
        return sorted(b for b, r in records.opened.items()
                      if b not in records.committed and b not in records.rolled_back
                      and self._dead(r, force))

    def _roll_back_dead(self, records, force):
        """Roll back the open batches whose writers died; return their numbers."""
        dangling = [b for b in records.opened if b in records.committed]
        if dangling:  # committed, but the writer died before closing its record
            self._delete_records(f"state == {OPEN} and key in {sorted(dangling)}")
        dead = self._dead_batches(records, force)
        if dead:
            self.memory._call("write the commit log", self.memory._client().insert, self.name,
                              [{"batch": b, "state": ROLLED_BACK, "deadline": 0.0, "owner": "",
                                "slot": [0.0, 1.0]} for b in dead])
            self._delete_rows(dead)
            self._delete_records(f"state == {OPEN} and key in {dead}")
        return dead

    def _compact(self, batch):
        """Delete commit records below `batch` whose open record is gone: they say nothing.

        Read after this batch's open record was deleted: a record whose open
        record is absent from this read belongs to a writer that closed it.
        """
        records = self.records()
        done = [r["key"] for r in records.rows
                if r["state"] == COMMITTED and r["batch"] < batch
                and r["batch"] not in records.opened]
        if done:
            self._delete_records(f"key in {sorted(done)}")
