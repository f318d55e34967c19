"""The derivation, as set-based SQL both backends run (SQLite >= 3.24 and PostgreSQL >= 9.5).

Every derived row is a recomputation from the stored touches of its key, never an increment,
so running it again, in any order, after any replay, gives the same rows. Incremental ingest
scopes each statement to the keys present in the batch's `stage` table; a full rederive
runs the same statements unscoped. Flagged touches (clock out of range) never count.
"""

# --- work history: gate, allowed, known technician -------------------------------------------
_WH_WHERE = "role='gate' AND decision='allow' AND flag IS NULL AND tid IS NOT NULL"
_WH_SCOPE = (f" AND (tid, site, work_day) IN (SELECT tid, site, work_day FROM stage"
             f" WHERE {_WH_WHERE})")
_WH = f"""
INSERT INTO work_history (tid, site, work_day, first_in_ms, last_out_ms, taps)
SELECT tid, site, work_day, MIN(CASE WHEN dir='in' THEN ts_ms END),
       MAX(CASE WHEN dir='out' THEN ts_ms END), COUNT(*)
FROM touches WHERE {_WH_WHERE}{{scope}}
GROUP BY tid, site, work_day
ON CONFLICT (tid, site, work_day) DO UPDATE SET first_in_ms=excluded.first_in_ms,
    last_out_ms=excluded.last_out_ms, taps=excluded.taps
"""

# --- training: per center and month; per course ------------------------------------------------
_TR_WHERE = "role='training' AND decision='allow' AND flag IS NULL"
_TM_SCOPE = f" AND (site, month) IN (SELECT site, month FROM stage WHERE {_TR_WHERE})"
_TM = f"""
INSERT INTO training_monthly (site, month, persons, touches)
SELECT site, month, COUNT(DISTINCT person), COUNT(*)
FROM touches WHERE {_TR_WHERE}{{scope}}
GROUP BY site, month
ON CONFLICT (site, month) DO UPDATE SET persons=excluded.persons, touches=excluded.touches
"""
_TC_SCOPE = (f" AND course IN (SELECT course FROM stage WHERE {_TR_WHERE}"
             f" AND course IS NOT NULL)")
_TC = f"""
INSERT INTO training_course (course, persons, touches)
SELECT course, COUNT(DISTINCT person), COUNT(*)
FROM touches WHERE {_TR_WHERE} AND course IS NOT NULL{{scope}}
GROUP BY course
ON CONFLICT (course) DO UPDATE SET persons=excluded.persons, touches=excluded.touches
"""

# --- vending ledger: per machine, site, main contractor and month ----------------------------
_VL_WHERE = ("role='vending' AND flag IS NULL"
             " AND result IN ('dispensed', 'failed', 'indeterminate')")
_VL_SCOPE = f" AND (device, month) IN (SELECT device, month FROM stage WHERE {_VL_WHERE})"
_VL = f"""
INSERT INTO vending_ledger (device, site, contractor, month, dispensed, failed, indeterminate)
SELECT device, site, COALESCE(contractor, ''), month,
       COUNT(CASE WHEN result='dispensed' THEN 1 END),
       COUNT(CASE WHEN result='failed' THEN 1 END),
       COUNT(CASE WHEN result='indeterminate' THEN 1 END)
FROM touches WHERE {_VL_WHERE}{{scope}}
GROUP BY device, site, COALESCE(contractor, ''), month
ON CONFLICT (device, site, contractor, month) DO UPDATE SET dispensed=excluded.dispensed,
    failed=excluded.failed, indeterminate=excluded.indeterminate
"""

_ALL = ((_WH, _WH_SCOPE), (_TM, _TM_SCOPE), (_TC, _TC_SCOPE), (_VL, _VL_SCOPE))

DERIVED_TABLES = ("work_history", "training_monthly", "training_course", "vending_ledger")

# Scoped to the batch in `stage`: run after the batch's touches are inserted.
INCREMENTAL = tuple(sql.format(scope=scope) for sql, scope in _ALL)
# Over every stored touch: run after emptying DERIVED_TABLES.
FULL = tuple(sql.format(scope="") for sql, _ in _ALL)
