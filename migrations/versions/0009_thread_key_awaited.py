"""thread_key.awaited: Message-IDs answered by a ticket's first message before they arrived,
so that such a late original joins the ticket its reply opened

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 02:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('thread_key', schema=None) as batch_op:
        batch_op.add_column(sa.Column('awaited', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM thread_key WHERE awaited"))
    with op.batch_alter_table('thread_key', schema=None) as batch_op:
        batch_op.drop_column('awaited')
