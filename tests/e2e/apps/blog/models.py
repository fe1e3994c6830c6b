"""The blog's SQLAlchemy models, on an in-memory SQLite database of each process."""

import os

from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool


class Base(DeclarativeBase):
    pass


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(80))


ENGINES = {}  # pid -> engine: each worker fills its own database


def engine():
    found = ENGINES.get(os.getpid())
    if found is None:
        found = ENGINES[os.getpid()] = create_engine("sqlite://", poolclass=StaticPool)
        Base.metadata.create_all(found)
        with Session(found) as session:
            session.add_all([Post(title="First post"), Post(title="Second post")])
            session.commit()
    return found


def titles():
    with Session(engine()) as session:
        return [post.title for post in session.scalars(select(Post).order_by(Post.id))]
