"""CRUD layer (the seed's ``create_task(db=db, ...)``): add, commit, refresh, return."""
from db import AppTask


async def create_task(db, title):
    task = AppTask(title=title)
    db.add(task)
    await db.commit()       # flush + COMMIT: the connection goes back to the pool ...
    await db.refresh(task)  # ... and this SELECT autobegins a new transaction on a new checkout
    return task             # the session now holds a connection "idle in transaction"
