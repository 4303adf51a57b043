# Yours: `copier update` never overwrites or deletes this file.
"""Alembic's entry point for `alembic upgrade head` (the migrate service, make migrate) and
`alembic revision --autogenerate` (make makemigration). The database URL comes from the app's own
settings (POSTGRES_* variables and the password file POSTGRES_PASSWORD_FILE), never alembic.ini.
"""

from logging.config import fileConfig

from alembic import context
from app.models import Base
from app.settings import settings
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import URL, make_url

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)

# The tables autogenerate compares the database with.
target_metadata = Base.metadata


def database_url() -> URL:
    """The app's URL, with SQLAlchemy's name for the psycopg (3) driver the app uses."""
    return make_url(settings.database_url).set(drivername="postgresql+psycopg")


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it (no connection)."""
    context.configure(dialect_name="postgresql", target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
