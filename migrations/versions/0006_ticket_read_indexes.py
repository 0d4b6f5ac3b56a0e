"""ticket: covering indexes for the promise's history and backlog, and assignment load

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 21:50:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.create_index('ix_ticket_team_status_first_response',
                              ['team', 'status', 'first_response_at'], unique=False)
        batch_op.create_index('ix_ticket_team_first_response_created',
                              ['team', 'first_response_at', 'created_at'], unique=False)
        batch_op.create_index('ix_ticket_assignee_status', ['assignee', 'status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.drop_index('ix_ticket_assignee_status')
        batch_op.drop_index('ix_ticket_team_first_response_created')
        batch_op.drop_index('ix_ticket_team_status_first_response')
