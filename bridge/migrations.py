"""Numbered schema steps, recorded in a table and applied once, safely, by whichever process starts first."""
import logging

from peewee import CharField, IntegerField, Model
from playhouse.migrate import SchemaMigrator, migrate as apply_operations

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


def _add_column(database, model, name):
    """Add the model's column `name` unless it is there already (step 1 creates fresh tables whole)."""
    table = model._meta.table_name
    if name not in {column.name for column in database.get_columns(table)}:
        apply_operations(SchemaMigrator.from_database(database).add_column(table, name, model._meta.fields[name]))


def _token_scope(database):
    _add_column(database, models.ApiToken, "scope")


def _money_path(database):
    _add_column(database, models.ReservationLine, "offer_price")
    _add_column(database, models.OrderItem, "preorder_code_id")
    models.OrderItem._schema.create_indexes(safe=True)  # the index on preorder_code_id


def _order_created_at_index(database):
    # IF NOT EXISTS: a database created after this step was written got the index from step 1.
    database.execute_sql('CREATE INDEX IF NOT EXISTS "order_created_at" ON "order" ("created_at")')


def _checked_at(database):
    _add_column(database, models.CwsProduct, "checked_at")


# Append only: a shipped step never changes; new columns or tables get a new numbered step.
STEPS = [(1, "initial tables", _initial),
         (10, "cws_product.checked_at (reads of one product)", _checked_at),
         (20, "money path: published price, pre-order code ids", _money_path),
         (30, "api_token.scope", _token_scope),
         (50, "index on order.created_at (report)", _order_created_at_index)]


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
