"""Database: the schema (:mod:`.models`), engine set-up (:mod:`.engine`) and Alembic migrations."""
