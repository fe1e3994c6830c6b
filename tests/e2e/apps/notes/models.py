"""The notes app's SQLAlchemy models (classic ``Column`` style), on an in-memory SQLite database."""

from sqlalchemy import Column, Integer, String, create_engine, select
from sqlalchemy.orm import Session, declarative_base
from sqlalchemy.pool import StaticPool

Base = declarative_base()


class Note(Base):
    __tablename__ = "notes"

    id = Column(Integer, primary_key=True)
    text = Column(String(80), nullable=False)


ENGINE = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
Base.metadata.create_all(ENGINE)
with Session(ENGINE) as session:
    session.add_all([Note(text="First note"), Note(text="Second note")])
    session.commit()


def texts():
    with Session(ENGINE) as session:
        return [note.text for note in session.scalars(select(Note).order_by(Note.id))]
