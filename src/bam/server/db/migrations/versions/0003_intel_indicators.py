"""Threat intelligence: SHA-256 file hashes named by loaded STIX 2.1 indicators.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "intel_indicators",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("stix_id", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("valid_until", sa.Float(), nullable=True),
        sa.Column("loaded_at", sa.Float(), nullable=False),
        sa.Column("loaded_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "stix_id", "sha256", name="uq_intel_source_indicator_hash"),
    )
    with op.batch_alter_table("intel_indicators", schema=None) as batch_op:
        batch_op.create_index("ix_intel_indicators_sha256", ["sha256"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("intel_indicators", schema=None) as batch_op:
        batch_op.drop_index("ix_intel_indicators_sha256")
    op.drop_table("intel_indicators")
