"""Numbered schema steps, recorded in a table and applied once, safely, by whichever process starts first."""
import logging

from peewee import CharField, IntegerField, Model

from . import db as models
from .log import event

log = logging.getLogger(__name__)


class SchemaStep(Model):
    number = IntegerField(primary_key=True)
    name = CharField()

    class Meta:
        database = models.database
        table_name = "schema_step"


def _initial(database):
    database.create_tables(models.MODELS, safe=True)


def _add_columns(database, model, *names):
    """Add model fields as columns; a database made by step 1 after the fields existed already has them."""
    table = model._meta.table_name
    present = {column.name for column in database.get_columns(table)}
    for name in names:
        field = model._meta.fields[name]
        if field.column_name not in present:
            database.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{field.column_name}" {_column_type(database, field)}')
    model._schema.create_indexes(safe=True)


def _column_type(database, field):
    return database.get_context_options()["field_types"].get(field.field_type, field.field_type)


def _money_path(database):
    _add_columns(database, models.ReservationLine, "offer_price")
    _add_columns(database, models.OrderItem, "preorder_code_id")


# Append only: a shipped step never changes; new columns or tables get a new numbered step.
STEPS = [(1, "initial tables", _initial), (20, "money path: published price, pre-order code ids", _money_path)]


def migrate(database):
    """Apply pending steps under the database's write lock, so two processes starting together can't collide."""
    with models.write_transaction(database):
        if not models.is_sqlite(database):
            # Before any DDL: two PostgreSQL sessions creating one table at once collide, IF NOT EXISTS or not.
            database.execute_sql("SELECT pg_advisory_xact_lock(4242001)")
        database.create_tables([SchemaStep], safe=True)
        done = {step.number for step in SchemaStep.select()}
        for number, name, apply in STEPS:
            if number not in done:
                apply(database)
                SchemaStep.create(number=number, name=name)
                event(log, "schema.migrated", step=number, name=name)


def open_database(url):
    """Connect to DATABASE_URL and bring the schema up to date: what every process does at start."""
    database = models.connect(url)
    migrate(database)
    return database
