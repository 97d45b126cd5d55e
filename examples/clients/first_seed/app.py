"""The first seed (a leaked SQLAlchemy AsyncSession per created task) reproduced with its own stack.

An asyncio SQLAlchemy application (asyncpg driver, ``pool_size=20,
max_overflow=10, pool_timeout=2s``) whose ``task_tracking.create_task_in_db()``
has the seed's bug: it gets a session, creates the task (commit, then refresh,
so the session is left *idle in transaction*) and never closes it.  Tasks go
to its own table ``app.app_tasks`` (schema ``app``).  ``taskwarden_caller``
names each connection ``seedapp:task_tracking.py:LINE:create_task_in_db``
(``crud`` is skipped as the CRUD layer).

CLI::

    python app.py --url postgresql://user@/db?host=/tmp/twpg --rate 20/s --duration 60
        [--fixed]                    the seed's fix (async with)
        [--no-caller]                no taskwarden_caller: application_name is plain "seedapp"
        [--pool-timeout 2]           seconds a checkout waits before TimeoutError
        [--housekeeping-interval 1]  seconds between prune_dead_sessions() runs; 0 = never
        [--leak-model registry|unreferenced]  see below
        [--pool-pre-ping] [--app seedapp]

Every attempt runs in its own asyncio task (as a web server runs a request).
stdout is JSON Lines, flushed, one object per line, always with "event":

    {"event":"start","pid":..,"fixed":false,"caller":true,"rate":20.0,"duration":60.0,
     "pool_size":20,"max_overflow":10,"pool_timeout":2.0,"leak_model":"registry","housekeeping_interval":1.0}
    {"event":"tick","t":3.01,"created":30,"failed":10,"ok_1s":0,"failed_1s":10,"in_flight":41,
     "checked_out":30,"tracked":80,"pruned":0,"gc_warnings":0,"last_error":"TimeoutError: QueuePool limit ..."}
    {"event":"pruned","t":8.2,"sessions":30,"pruned":30}   (housekeeping invalidated dead sessions)
    {"event":"end","t":62.0,"created":..,"failed":..,"checked_out":..,"tracked":..,"pruned":..,"last_error":..}

"tick" comes once a second: created/failed are running totals of attempts,
ok_1s/failed_1s those of the last second, checked_out is the pool's
checked-out count, tracked the size of the session registry, last_error the
first line of the last failure (null if none).  Exit status 0.

The leak model (measured, CPython 3.11, SQLAlchemy 2.1.9, asyncpg 0.32, PG 15):

* ``registry`` (default): ``_get_db_session()`` keeps every session it hands
  out in a module-level set (to close them at shutdown).  The strong reference
  makes the leak deterministic: at 20/s the pool is exhausted after exactly 30
  tasks (t~1.5 s), the server shows 30 backends ``idle in transaction`` named
  ``seedapp:task_tracking.py:LINE:create_task_in_db``, and every later attempt
  fails after pool_timeout with ``TimeoutError: QueuePool limit of size 20
  overflow 10 reached``.
* ``unreferenced``: the literal seed code, nothing keeps the session.  It is
  only freed by CPython's cyclic GC (a Session and its transaction reference
  each other); SQLAlchemy then warns "The garbage collector is trying to clean
  up non-checked-in connection ..., which will be terminated" and the slot
  comes back.  At 20/s the pool never filled (4-20 checked out, 300 created,
  0 failed in 15 s, 288 GC warnings): the leak depends on GC timing.

Recovery after the watchdog terminates the leaked backends
(``SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE
application_name LIKE 'seedapp:%' AND state = 'idle in transaction'``):
SQLAlchemy's pool does nothing for a checked-out connection whose backend
died -- it stays counted as checked out until its holder uses, closes or
invalidates it, or the holder is garbage-collected.  Nothing uses a leaked
session again, so with ``--housekeeping-interval 0`` (or ``--pool-pre-ping``,
which only checks connections being checked out of the pool) the application
stays wedged until restarted.  What brings capacity back is the application's
housekeeping (as seed 001's ResourceMonitor has): every interval
``task_tracking.prune_dead_sessions()`` invalidates the tracked sessions whose
asyncpg connection is closed (a local flag check, no I/O) and forgets them;
the pool reconnects on the next checkout.  It leaves live sessions alone, since
it cannot tell a leaked session from a busy one: that is the watchdog's call.
The bug is still there, so 30 tasks later the pool is exhausted again until the
next termination: terminating every 5 s gave exactly +30 created per
termination (210 in 31 s).  (``session.close()`` on such a session raises
``InterfaceError: ... the underlying connection is closed``; ``invalidate()``
is the call that works.)
"""
import argparse
import asyncio
import json
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))


def emit(**fields):
    sys.stdout.write(json.dumps(fields, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def run(args):
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    import db
    import task_tracking
    import taskwarden_caller

    st = {"created": 0, "failed": 0, "ok_1s": 0, "failed_1s": 0, "last_error": None, "gc_warnings": 0, "pruned": 0}
    shown = warnings.showwarning

    def count_gc_warnings(message, category, *rest, **kw):
        if "garbage collector" in str(message):
            st["gc_warnings"] += 1
        else:
            shown(message, category, *rest, **kw)

    warnings.simplefilter("always")
    warnings.showwarning = count_gc_warnings

    task_tracking.LEAK_MODEL = args.leak_model
    url = make_url(args.url).set(drivername="postgresql+asyncpg")
    connect_args = {"server_settings": {"application_name": args.app}}  # before any caller is set
    engine = db.configure(url, pool_timeout=args.pool_timeout, pool_pre_ping=args.pool_pre_ping,
                          connect_args=connect_args)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE SCHEMA IF NOT EXISTS app"))
        await conn.run_sync(db.Base.metadata.create_all)
    if not args.no_caller:
        taskwarden_caller.install(engine, app=args.app, skip=("crud",))
    create = task_tracking.create_task_in_db_fixed if args.fixed else task_tracking.create_task_in_db
    t0 = time.monotonic()

    async def attempt(n):
        try:
            await create("task %d" % n)
            st["created"] += 1
            st["ok_1s"] += 1
        except Exception as e:  # noqa: BLE001 - the outcome is what we report
            st["failed"] += 1
            st["failed_1s"] += 1
            st["last_error"] = ("%s: %s" % (type(e).__name__, e)).splitlines()[0][:300]

    async def housekeeping():
        while True:
            await asyncio.sleep(args.housekeeping_interval)
            n = await task_tracking.prune_dead_sessions()
            if n:
                st["pruned"] += n
                emit(event="pruned", t=round(time.monotonic() - t0, 3), sessions=n, pruned=st["pruned"])

    def snapshot():
        return dict(created=st["created"], failed=st["failed"], checked_out=engine.sync_engine.pool.checkedout(),
                    tracked=len(task_tracking._tracked), pruned=st["pruned"], gc_warnings=st["gc_warnings"])

    emit(event="start", pid=os.getpid(), fixed=args.fixed, caller=not args.no_caller, rate=args.rate,
         duration=args.duration, pool_size=20, max_overflow=10, pool_timeout=args.pool_timeout,
         leak_model=args.leak_model, housekeeping_interval=args.housekeeping_interval)
    keeper = asyncio.create_task(housekeeping()) if args.housekeeping_interval > 0 else None
    pending, n, next_tick = set(), 0, 1.0
    while (now := time.monotonic() - t0) < args.duration:
        while n < int(now * args.rate) + 1:
            n += 1
            task = asyncio.create_task(attempt(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if now >= next_tick:
            emit(event="tick", t=round(now, 3), **snapshot(), ok_1s=st["ok_1s"], failed_1s=st["failed_1s"],
                 in_flight=len(pending), last_error=st["last_error"])
            st["ok_1s"] = st["failed_1s"] = 0
            next_tick += 1.0
        await asyncio.sleep(min(1.0 / args.rate, 0.05))
    if pending:
        await asyncio.wait(pending, timeout=args.pool_timeout + 5)
    if keeper:
        keeper.cancel()
    emit(event="end", t=round(time.monotonic() - t0, 3), **snapshot(), last_error=st["last_error"])
    try:
        await task_tracking.close_all()
    finally:
        await engine.dispose()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("TASKWARDEN_TEST_DATABASE_URL"), help="postgresql:// URL")
    p.add_argument("--rate", default="20/s", help="attempts per second, e.g. 20/s")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to drive")
    p.add_argument("--pool-timeout", type=float, default=2.0)
    p.add_argument("--housekeeping-interval", type=float, default=1.0, help="0 disables prune_dead_sessions()")
    p.add_argument("--fixed", action="store_true", help="use the seed's fix (async with)")
    p.add_argument("--no-caller", action="store_true", help="do not install taskwarden_caller")
    p.add_argument("--app", default="seedapp", help="application_name prefix")
    p.add_argument("--leak-model", choices=("registry", "unreferenced"), default="registry")
    p.add_argument("--pool-pre-ping", action="store_true")
    args = p.parse_args(argv)
    if not args.url:
        p.error("--url or TASKWARDEN_TEST_DATABASE_URL is required")
    args.rate = float(str(args.rate).removesuffix("/s"))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
