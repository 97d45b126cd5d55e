"""Tests for the taskwarden caller helpers against a real PostgreSQL (no mocks).

    TASKWARDEN_TEST_DATABASE_URL=postgresql://user@/postgres?host=/tmp/twpg \\
        python3 examples/clients/test_clients.py

Needs SQLAlchemy, asyncpg, psycopg, psycopg_pool (requirements.txt); if they are
missing it re-runs itself with $TASKWARDEN_CLIENTS_PYTHON or the venv
/root/.cache/taskwarden/clients-venv.  It creates a throwaway database
clients_test_<pid> and drops it at the end.  Every check reads
pg_stat_activity from a SEPARATE connection.  The node-postgres tests run as
`node examples/clients/node/test.js` (npm ci is run first if node_modules is missing).
"""
import asyncio
import atexit
import os
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_PY = os.environ.get("TASKWARDEN_CLIENTS_PYTHON", "/root/.cache/taskwarden/clients-venv/bin/python")
try:
    import psycopg
    import psycopg_pool
    import sqlalchemy
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.orm import Session
except ImportError:
    if __name__ == "__main__" and os.path.exists(VENV_PY) and not os.environ.get("_TWC_REEXEC"):
        os.environ["_TWC_REEXEC"] = "1"
        os.execv(VENV_PY, [VENV_PY] + sys.argv)
    raise
sys.path.insert(0, os.path.join(HERE, "python"))
import taskwarden_caller  # noqa: E402

FILE = os.path.basename(__file__)
_ctx = {}


def ctx():
    """Create the throwaway database once; return URLs and an observer connection."""
    if _ctx:
        return _ctx
    base = os.environ.get("TASKWARDEN_TEST_DATABASE_URL")
    assert base, "TASKWARDEN_TEST_DATABASE_URL is not set"
    db = "clients_test_%d" % os.getpid()
    admin = psycopg.connect(base, autocommit=True)
    admin.execute('CREATE DATABASE "%s"' % db)
    url = make_url(base).set(database=db)
    _ctx.update(
        db=db, admin=admin,
        conninfo=url.render_as_string(hide_password=False),
        sync_url=url.set(drivername="postgresql+psycopg"),
        async_url=url.set(drivername="postgresql+asyncpg"),
        observer=psycopg.connect(url.render_as_string(hide_password=False), autocommit=True),
    )
    _ctx["pg16"] = _ctx["observer"].info.server_version >= 160000
    atexit.register(_drop)
    return _ctx


def _drop():
    c = _ctx
    c["observer"].close()
    c["admin"].execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (c["db"],))
    c["admin"].execute('DROP DATABASE IF EXISTS "%s"' % c["db"])
    c["admin"].close()


def seen(pid):
    """(application_name, state) of backend `pid`, read from the observer connection."""
    row = ctx()["observer"].execute("SELECT application_name, state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    assert row is not None, "backend %s not in pg_stat_activity" % pid
    return row


def eventually(pid, want, timeout=3.0):
    """seen(pid), polled until it equals `want` or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while (got := seen(pid)) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def server_view(name):
    """What PostgreSQL shows for `name`: non-ASCII bytes become '?' (<=15) or '\\xNN' (16+), cut to 63 bytes."""
    out = "".join(chr(b) if 32 <= b < 127 else ("\\x%02x" % b if ctx()["pg16"] else "?") for b in name.encode())
    return out[:63]


# a "CRUD layer" module whose frames the apps skip with skip=("fakecrud",)
fakecrud = types.ModuleType("fakecrud")
exec(compile(
    "from sqlalchemy import text\n"
    "def pid(conn):\n    return conn.execute(text('SELECT pg_backend_pid()')).scalar()\n"
    "async def apid(session):\n    return (await session.execute(text('SELECT pg_backend_pid()'))).scalar()\n",
    os.path.join(HERE, "fakecrud.py"), "exec"), fakecrud.__dict__)
sys.modules["fakecrud"] = fakecrud


# ---------------------------------------------------------------- SQLAlchemy sync (psycopg)
def sync_open(engine):
    line = sys._getframe().f_lineno + 1
    conn = engine.connect()
    return conn, line


def test_sqlalchemy_sync_psycopg():
    engine = taskwarden_caller.install(sqlalchemy.create_engine(ctx()["sync_url"], pool_size=2), app="app", skip=("fakecrud",))
    try:
        conn, line = sync_open(engine)
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        assert seen(pid)[0] == "app:%s:%d:sync_open" % (FILE, line), seen(pid)
        conn.close()
        assert seen(pid) == ("app", "idle"), seen(pid)  # reset, and no transaction left open
        with Session(engine) as session:  # ORM: checkout at the first statement, inside the skipped CRUD layer
            line = sys._getframe().f_lineno + 1
            pid2 = fakecrud.pid(session)
            assert seen(pid2)[0] == "app:%s:%d:test_sqlalchemy_sync_psycopg" % (FILE, line), seen(pid2)
        assert seen(pid2) == ("app", "idle"), seen(pid2)
    finally:
        engine.dispose()


# ---------------------------------------------------------------- SQLAlchemy asyncio (asyncpg)
async def async_session_open(session):
    line = sys._getframe().f_lineno + 1
    pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar()
    return pid, line


async def async_engine_connect(engine):
    line = sys._getframe().f_lineno + 1
    async with engine.connect() as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
        return pid, line, seen(pid)


async def _async_checks():
    engine = taskwarden_caller.install(create_async_engine(ctx()["async_url"], pool_size=2), app="app", skip=("fakecrud",))
    try:
        session = AsyncSession(engine)
        pid, line = await async_session_open(session)
        assert seen(pid) == ("app:%s:%d:async_session_open" % (FILE, line), "idle in transaction"), seen(pid)
        await session.close()
        assert seen(pid) == ("app", "idle"), seen(pid)
        pid, line, during = await async_engine_connect(engine)
        assert during[0] == "app:%s:%d:async_engine_connect" % (FILE, line), during
        assert seen(pid) == ("app", "idle"), seen(pid)
        async with AsyncSession(engine) as session:  # through a skipped CRUD layer, inside a Task
            line = sys._getframe().f_lineno + 1
            pid = await asyncio.ensure_future(fakecrud.apid(session))
            assert seen(pid)[0] == "app:%s:%d:_async_checks" % (FILE, line), seen(pid)
        assert seen(pid) == ("app", "idle"), seen(pid)
    finally:
        await engine.dispose()


def test_sqlalchemy_asyncio_asyncpg():
    asyncio.run(_async_checks())


async def _async_psycopg_checks():
    url = ctx()["async_url"].set(drivername="postgresql+psycopg_async")
    engine = taskwarden_caller.install(create_async_engine(url, pool_size=1), app="app")
    try:
        session = AsyncSession(engine)
        pid, line = await async_session_open(session)
        assert seen(pid) == ("app:%s:%d:async_session_open" % (FILE, line), "idle in transaction"), seen(pid)
        await session.close()
        assert seen(pid) == ("app", "idle"), seen(pid)
    finally:
        await engine.dispose()


def test_sqlalchemy_asyncio_psycopg():
    asyncio.run(_async_psycopg_checks())


# ---------------------------------------------------------------- psycopg 3 directly
def psycopg_open():
    line = sys._getframe().f_lineno + 1
    conn = taskwarden_caller.connect("app", ctx()["conninfo"], autocommit=True)
    return conn, line


def pooled_use(pool):
    with pool.connection() as conn:
        line = sys._getframe().f_lineno + 1
        taskwarden_caller.set_caller(conn, "app")
        pid = conn.info.backend_pid
        return pid, line, seen(pid)


def test_psycopg_connect_and_pool():
    conn, line = psycopg_open()
    assert seen(conn.info.backend_pid)[0] == "app:%s:%d:psycopg_open" % (FILE, line), seen(conn.info.backend_pid)
    conn.close()
    line = sys._getframe().f_lineno + 1
    conn = psycopg.connect(ctx()["conninfo"], application_name=taskwarden_caller.caller("app"))  # the one-liner
    assert seen(conn.info.backend_pid)[0] == "app:%s:%d:test_psycopg_connect_and_pool" % (FILE, line)
    conn.close()
    with psycopg_pool.ConnectionPool(ctx()["conninfo"], min_size=1, max_size=1, reset=taskwarden_caller.resetter("app"), open=True) as pool:
        pid, line, during = pooled_use(pool)
        assert during == ("app:%s:%d:pooled_use" % (FILE, line), "idle"), during
        assert eventually(pid, ("app", "idle")) == ("app", "idle"), seen(pid)  # reset= runs in a pool worker


# ---------------------------------------------------------------- 63-byte truncation
def a_python_function_whose_name_is_far_too_long_for_sixty_three_bytes(engine):
    line = sys._getframe().f_lineno + 1
    conn = engine.connect()
    return conn, line


def tâche_générée(engine):
    line = sys._getframe().f_lineno + 1
    conn = engine.connect()
    return conn, line


def test_truncation_63_bytes():
    engine = taskwarden_caller.install(sqlalchemy.create_engine(ctx()["sync_url"], pool_size=1), app="app")
    try:
        conn, line = a_python_function_whose_name_is_far_too_long_for_sixty_three_bytes(engine)
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        assert seen(pid)[0] == "app:%s:%d" % (FILE, line), seen(pid)  # the function is dropped first
        conn.close()
        conn, line = tâche_générée(engine)  # non-ASCII, fits: kept whole
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        want = "app:%s:%d:tâche_générée" % (FILE, line)
        assert conn.exec_driver_sql("SHOW application_name").scalar() == server_view(want)
        assert seen(pid)[0] == server_view(want), (seen(pid), server_view(want))
        conn.close()
    finally:
        engine.dispose()
    app = "é" * 40  # 80 bytes: even APP alone must be shortened, on a character boundary
    name = taskwarden_caller.caller(app)
    assert name == "é" * 31 and len(name.encode()) == 62, name
    assert taskwarden_caller.fit("ab" + "€" * 30) == "ab" + "€" * 20  # 62 bytes; 63 would split a '€'
    conn = psycopg.connect(ctx()["conninfo"], autocommit=True)
    taskwarden_caller.set_caller(conn, app)
    assert seen(conn.info.backend_pid)[0] == server_view(name)
    conn.close()


# ---------------------------------------------------------------- node-postgres
def test_node_pg():
    node_dir = os.path.join(HERE, "node")
    if not os.path.isdir(os.path.join(node_dir, "node_modules", "pg")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", node_dir], check=True)
    env = dict(os.environ, TASKWARDEN_TEST_DATABASE_URL=ctx()["conninfo"])
    r = subprocess.run(["node", os.path.join(node_dir, "test.js")], env=env, capture_output=True, text=True, timeout=120)
    sys.stdout.write("".join("    " + l + "\n" for l in r.stdout.splitlines()))
    assert r.returncode == 0 and "0 failed" in r.stdout, r.stdout + r.stderr


def main():
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and callable(f)]
    passed = failed = 0
    for name, fn in tests:
        t0 = time.monotonic()
        try:
            fn()
            passed += 1
            print("PASS %s (%.2fs)" % (name, time.monotonic() - t0), flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print("FAIL %s: %s: %s" % (name, type(e).__name__, e), flush=True)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
