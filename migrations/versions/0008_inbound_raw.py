"""inbound_raw: a message's bytes apart from its inbound row, which routing updates (SQLite
writes a whole row again when an update changes its size)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 19:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'inbound_raw',
        sa.Column('inbound_id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('raw', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['inbound_id'], ['inbound.id']),
        sa.PrimaryKeyConstraint('inbound_id'),
    )
    op.execute('INSERT INTO inbound_raw (inbound_id, raw) SELECT id, raw FROM inbound')
    # Not batch mode: on SQLite that copies the table, and dropping the old one is refused
    # while other tables' rows refer to it. SQLite drops a plain column in place (3.35+).
    op.execute('ALTER TABLE inbound DROP COLUMN raw')


def downgrade() -> None:
    op.add_column('inbound', sa.Column('raw', sa.LargeBinary(), nullable=True))
    op.execute('UPDATE inbound SET raw = (SELECT raw FROM inbound_raw '
               'WHERE inbound_raw.inbound_id = inbound.id)')
    op.drop_table('inbound_raw')
    # SQLite makes a column NOT NULL only by copying the table, which the foreign keys onto
    # inbound refuse while it has rows: there it stays nullable (0007's code always fills it).
    if op.get_bind().dialect.name != 'sqlite':
        op.alter_column('inbound', 'raw', existing_type=sa.LargeBinary(), nullable=False)
