"""spool_cursor: how far each SMTP intake spool was moved into inbound

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


def downgrade() -> None:
    op.drop_table('spool_cursor')
