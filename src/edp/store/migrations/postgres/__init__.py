"""PostgreSQL migrations (``NNNN_name.sql``)."""
