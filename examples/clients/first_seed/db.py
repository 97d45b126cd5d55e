"""The application's database module (the seed's ``api/core/db.py``): one engine, one session factory."""
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy import DateTime, String, func

engine = None
AsyncSessionLocal = None


class Base(DeclarativeBase):
    pass


class AppTask(Base):
    __tablename__ = "app_tasks"
    __table_args__ = {"schema": "app"}
    task_id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    created_at = mapped_column(DateTime(timezone=True), server_default=func.now())


def configure(url, pool_timeout=2.0, pool_pre_ping=False, connect_args=None):
    """Create the engine the way the seeds do: pool_size=20, max_overflow=10."""
    global engine, AsyncSessionLocal
    engine = create_async_engine(url, pool_size=20, max_overflow=10, pool_timeout=pool_timeout,
                                 pool_pre_ping=pool_pre_ping, connect_args=connect_args or {})
    AsyncSessionLocal = async_sessionmaker(engine, expire_on_commit=True)
    return engine
