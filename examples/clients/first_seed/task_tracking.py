"""Task tracking (the seed's ``agents/task_tracking.py``), with the seed's bug.

``create_task_in_db()`` is the seed's code: it gets a session from
``_get_db_session()``, creates the task and never closes the session.  The
session is left holding a pooled connection "idle in transaction" (the CRUD
layer refreshes the task after committing, which begins a new transaction).

``_get_db_session()`` remembers every session it hands out (``_tracked``) so
that shutdown can close whatever is still open: that strong reference is what
makes the leak deterministic (see app.py).  ``prune_dead_sessions()`` is the
application's housekeeping: it invalidates tracked sessions whose connection
the server has already closed -- it never touches a live session, since it
cannot tell a leaked one from a busy one.
"""
from sqlalchemy import event
from sqlalchemy.orm import Session

import crud
import db

_tracked = set()
LEAK_MODEL = "registry"  # "registry" (default) | "unreferenced" (the literal seed code; see app.py)


@event.listens_for(Session, "after_begin")
def _remember_connection(session, transaction, connection):
    session.info["connection"] = connection  # the Connection this session's transaction runs on


def _get_db_session():
    if db.AsyncSessionLocal is None:
        return None
    session = db.AsyncSessionLocal()
    if LEAK_MODEL == "registry":
        _tracked.add(session)
    return session


async def create_task_in_db(title):
    """BUGGY, as in the seed: the session is used and never closed."""
    db_session = _get_db_session()
    if not db_session:
        return None
    task = await crud.create_task(db=db_session, title=title)
    # SESSION NEVER CLOSED
    return task.task_id


async def create_task_in_db_fixed(title):
    """The seed's fix: ``async with`` closes the session; rollback on error."""
    async with db.AsyncSessionLocal() as db_session:
        try:
            task = await crud.create_task(db=db_session, title=title)
            return task.task_id
        except Exception:
            await db_session.rollback()
            raise


def _connection_is_dead(session):
    conn = session.info.get("connection")
    if conn is None or conn.closed:
        return False  # holds no connection
    return conn.invalidated or conn.connection.driver_connection.is_closed()  # local check, no I/O


async def prune_dead_sessions():
    """Invalidate (and forget) tracked sessions whose connection the server closed; returns how many."""
    dead = [s for s in _tracked if _connection_is_dead(s)]
    for session in dead:
        _tracked.discard(session)
        await session.invalidate()  # the pool gets the slot back; no round trip on a dead connection
    return len(dead)


async def close_all():
    """Shutdown: close whatever is still open."""
    while _tracked:
        session = _tracked.pop()
        try:
            await session.close()
        except Exception:  # close() rolls back, which raises on a connection the server closed
            await session.invalidate()
