"""`JobStore`: the server's persistent queue, one SQLite file (`outputs/jobs.sqlite3`).

Every accepted job is a row that ends `done`, `failed` or `cancelled`; a job's input pictures are kept in
the row (PNG bytes) until it ends, so a queued image-to-image job survives a restart. The database is in
WAL mode with `synchronous=FULL`: a job answered 202 is on disk.
"""

import json
import sqlite3
import threading
import time
import uuid

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    parameters TEXT NOT NULL,
    batch_key TEXT NOT NULL,
    num_images INTEGER NOT NULL,
    image BLOB,
    mask BLOB,
    images TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
"""
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
COLUMNS = "seq, id, created, state, parameters, images, error, step, total, cancel_requested, finished"


def _job(row):
    """A `COLUMNS` row -> the job dict (`position` is added by the caller)."""
    seq, id_, created, state, parameters, images, error, step, total, cancel_requested, finished = row
    return {"seq": seq, "id": id_, "created": created, "state": state, "parameters": json.loads(parameters),
            "images": json.loads(images), "error": error, "step": step, "total": total,
            "cancel_requested": bool(cancel_requested), "finished": finished}


class JobStore:
    """The jobs of one outputs folder, shared by the HTTP handlers and the worker thread.

    One connection guarded by a lock; every method is one transaction. `wakeup` is set whenever a job
    is added or a cancellation is asked for (the worker waits on it).

    Args:
        path: the SQLite file, created with its table if missing.
    """

    def __init__(self, path):
        self.path = path
        self.wakeup = threading.Event()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self):
        with self._lock:
            self._db.close()

    def _transaction(self, function):
        """`function(connection)` inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = function(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def add(self, parameters, batch_key, total=0, image=None, mask=None):
        """Queues a job; returns its id (32 hex digits).

        Args:
            parameters: the resolved, JSON-able parameters (`num_images` among them).
            batch_key: jobs with equal keys may run in one batch.
            total: the number of denoising steps the job will run.
            image, mask: the input pictures as PNG bytes, or None.
        """
        job_id = uuid.uuid4().hex
        self._transaction(lambda db: db.execute(
            "INSERT INTO jobs (id, created, state, parameters, batch_key, num_images, image, mask, total) "
            "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
            (job_id, time.time(), json.dumps(parameters), batch_key, parameters["num_images"], image, mask, total)))
        self.wakeup.set()
        return job_id

    def _get(self, db, job_id):
        row = db.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = _job(row)
        job["position"] = self._position(db, job)
        return job

    @staticmethod
    def _position(db, job):
        if job["state"] != "queued":
            return None
        return db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (job["seq"],)).fetchone()[0]

    def get(self, job_id):
        """The job dict (id, created, state, position, parameters, images (file names), error, step, total,
        cancel_requested, finished), or None for an unknown id."""
        return self._transaction(lambda db: self._get(db, job_id))

    def position(self, job_id):
        """How many queued jobs are ahead of this one (0 = next), or None unless it is queued."""
        job = self.get(job_id)
        return None if job is None else job["position"]

    def list(self, limit=20, before=None):
        """Up to `limit` jobs, newest first; with `before` (an id), only those created before it.

        Raises:
            KeyError: `before` is not a job id.
        """

        def select(db):
            bound = float("inf")
            if before is not None:
                row = db.execute("SELECT seq FROM jobs WHERE id = ?", (before,)).fetchone()
                if row is None:
                    raise KeyError(before)
                bound = row[0]
            rows = db.execute(f"SELECT {COLUMNS} FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                              (bound, limit)).fetchall()
            return [dict(_job(row), position=self._position(db, _job(row))) for row in rows]

        return self._transaction(select)

    def counts(self):
        """`{state: number of jobs}` for every state."""
        rows = self._transaction(lambda db: db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {**dict.fromkeys(STATES, 0), **dict(rows)}

    def next_batch(self, max_images):
        """Marks running and returns the oldest queued job and the queued jobs after it with the same batch
        key, in order, while their images sum to at most `max_images` (the oldest job is taken whatever its
        count). Each job dict also has `image` and `mask` (PNG bytes or None). [] when nothing is queued."""

        def take(db):
            first = db.execute("SELECT seq, batch_key FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if first is None:
                return []
            rows = db.execute(f"SELECT {COLUMNS}, num_images, image, mask FROM jobs WHERE state = 'queued' "
                              "AND batch_key = ? AND seq >= ? ORDER BY seq", (first[1], first[0])).fetchall()
            jobs, count = [], 0
            for row in rows:
                if jobs and count + row[-3] > max_images:
                    break
                jobs.append(dict(_job(row[:-3]), image=row[-2], mask=row[-1], state="running", step=0))
                count += row[-3]
            db.executemany("UPDATE jobs SET state = 'running', step = 0 WHERE id = ?", [(j["id"],) for j in jobs])
            return jobs

        return self._transaction(take)

    def progress(self, ids, step, total):
        """Records that the running jobs `ids` have done `step` of `total` steps."""
        self._transaction(lambda db: db.executemany(
            "UPDATE jobs SET step = ?, total = ? WHERE id = ? AND state = 'running'", [(step, total, i) for i in ids]))

    def _end(self, db, ids, state, **values):
        """Moves the running jobs `ids` to the final `state`, dropping their input pictures."""
        sets = "".join(f", {column} = ?" for column in values)
        db.executemany(f"UPDATE jobs SET state = ?, finished = ?, image = NULL, mask = NULL{sets} "
                       "WHERE id = ? AND state = 'running'",
                       [(state, time.time(), *values.values(), i) for i in ids])

    def finish(self, job_id, images):
        """Marks the running job done with its image file names."""
        self._transaction(lambda db: self._end(db, [job_id], "done", images=json.dumps(list(images))))

    def fail(self, ids, reason):
        """Marks the running jobs `ids` failed with the one-line `reason`."""
        self._transaction(lambda db: self._end(db, ids, "failed", error=reason))

    def cancel(self, job_id):
        """Cancels a job: a queued one at once, a running one at the worker's next step (`cancel_requested`).

        Returns:
            The job's state before the call ("queued", "running", or a final state: nothing was changed),
            or None for an unknown id.
        """

        def cancel(db):
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row[0] == "queued":
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, image = NULL, mask = NULL "
                           "WHERE id = ?", (time.time(), job_id))
            elif row is not None and row[0] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return None if row is None else row[0]

        state = self._transaction(cancel)
        self.wakeup.set()
        return state

    def settle_cancelled(self, ids):
        """Marks cancelled those of the running jobs `ids` whose cancellation was asked for; returns the set
        of `ids` that are cancelled (now or before)."""

        def settle(db):
            marks = ",".join("?" * len(ids))
            wanted = db.execute(f"SELECT id FROM jobs WHERE id IN ({marks}) AND state = 'running' "
                                "AND cancel_requested = 1", list(ids)).fetchall()
            self._end(db, [row[0] for row in wanted], "cancelled")
            rows = db.execute(f"SELECT id FROM jobs WHERE id IN ({marks}) AND state = 'cancelled'", list(ids))
            return {row[0] for row in rows.fetchall()}

        return self._transaction(settle)

    def recover(self):
        """At start: the jobs a stopped server left running are queued again (those whose cancellation was
        asked for end cancelled). Returns the number queued again."""

        def recover(db):
            self._end(db, [r[0] for r in db.execute(
                "SELECT id FROM jobs WHERE state = 'running' AND cancel_requested = 1").fetchall()], "cancelled")
            return db.execute("UPDATE jobs SET state = 'queued', step = 0 WHERE state = 'running'").rowcount

        return self._transaction(recover)
