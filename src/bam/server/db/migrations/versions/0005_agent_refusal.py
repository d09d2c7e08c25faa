"""Agents remember a refusal only an operator can end (a diverged chain), for the dashboard.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("refused_reason", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("refused_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("refused_at")
        batch_op.drop_column("refused_reason")
