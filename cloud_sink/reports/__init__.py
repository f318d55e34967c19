"""Reports: pure shaping of store rows into tables (shape), CSV/JSON writers (output), PNG charts (charts)."""
