"""Derived tables: the pure row mapping (rows) and the shared set-based derivation SQL (sql)."""
