"""spool_cursor: how far each SMTP intake spool was moved into inbound; inbound indexes
for routing in order of arrival and for a reply's look for its original

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 00:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import router.models

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'spool_cursor',
        sa.Column('spool', sa.String(length=64), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('moved_through', sa.BigInteger(), nullable=False),
        sa.Column('moved_at', router.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('spool'),
    )
    with op.batch_alter_table('inbound', schema=None) as batch_op:
        batch_op.create_index('ix_inbound_message_id', ['message_id'], unique=False)
        batch_op.create_index('ix_inbound_status_received', ['status', 'received_at', 'id'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inbound', schema=None) as batch_op:
        batch_op.drop_index('ix_inbound_status_received')
        batch_op.drop_index('ix_inbound_message_id')
    op.drop_table('spool_cursor')
