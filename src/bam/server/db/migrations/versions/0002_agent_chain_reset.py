"""Chain epochs: an operator may reset an agent's evidence chain; the new chain is a new epoch.

An agent that lost its chain state (a wiped or restored spool) can no longer link to the
server's chain head; an operator resets it (``bam server reset-chain``), which starts epoch
``chain_epoch + 1`` at ``bam_seq`` 1. Stored evidence is unique per (agent, epoch, seq).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("chain_epoch", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("evidence", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("chain_epoch", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.drop_constraint("uq_evidence_agent_seq", type_="unique")
        batch_op.create_unique_constraint(
            "uq_evidence_agent_epoch_seq", ["agent_id", "chain_epoch", "seq"]
        )


def downgrade() -> None:
    with op.batch_alter_table("evidence", schema=None) as batch_op:
        batch_op.drop_constraint("uq_evidence_agent_epoch_seq", type_="unique")
        batch_op.create_unique_constraint("uq_evidence_agent_seq", ["agent_id", "seq"])
        batch_op.drop_column("chain_epoch")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("chain_epoch")
