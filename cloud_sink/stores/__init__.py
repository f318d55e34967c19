"""Store backends behind cloud_sink.store.Store: SQLite (embedded default) and PostgreSQL."""
