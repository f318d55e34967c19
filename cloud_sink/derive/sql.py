"""The derivation, as set-based SQL both backends run (SQLite >= 3.24 and PostgreSQL >= 9.5).

On ingest the batch's `stage` table holds only the touches this transaction newly stored
(repeats are removed before anything counts), so:
- work history is folded in: MIN entry, MAX exit, MAX entry (`last_in_ms`: with the last exit it
  gives the day's last passage, which "on site now" reads) and taps added to the day's row. All
  are by the touch's own time, never arrival: a late entry folded after its exit lands in place.
  Each touch is
  new exactly once, so replaying, reordering or re-batching gives the same rows, and a batch
  writes only today's rows instead of re-reading every touch of each day it names;
- the training and vending tables (COUNT DISTINCT persons cannot be folded) are recomputed from
  the stored touches for the keys the new touches name.
Each work-history row keeps the cut its touches were cut with (the largest, should a rule
change fall inside one work day). Training courses are keyed by center (site) + course id.
Re-deriving some sites (`SITES`: after a registry change) empties and recomputes exactly the
rows of the sites listed in the temp table `resite`.
A full rederive empties the derived tables and recomputes every row from all stored touches
(`FULL`); the property tests hold both paths to the same rows. Flagged touches (clock out of
range) never count.
"""

# --- work history: gate, allowed, known technician -------------------------------------------
# (dir is NULL for a gate touch that is no passage: rows.gate_dir)
_WH_WHERE = ("role='gate' AND decision='allow' AND flag IS NULL AND tid IS NOT NULL"
             " AND dir IS NOT NULL")
_WH = f"""
INSERT INTO work_history (tid, site, work_day, first_in_ms, last_out_ms, taps, cut_hour, last_in_ms)
SELECT tid, site, work_day, MIN(CASE WHEN dir='in' THEN ts_ms END),
       MAX(CASE WHEN dir='out' THEN ts_ms END), COUNT(*), MAX(cut_hour),
       MAX(CASE WHEN dir='in' THEN ts_ms END)
FROM {{source}} WHERE {_WH_WHERE}{{scope}}
GROUP BY site, work_day, tid
ON CONFLICT (site, work_day, tid) DO UPDATE SET {{merge}}
"""
# full recomputation: the row is replaced
_WH_REPLACE = ("first_in_ms=excluded.first_in_ms, last_out_ms=excluded.last_out_ms,"
               " taps=excluded.taps, cut_hour=excluded.cut_hour, last_in_ms=excluded.last_in_ms")
# folding new touches in; a NULL on either side (no entry, no exit yet) keeps the other side
_WH_FOLD = """first_in_ms=CASE WHEN work_history.first_in_ms IS NULL
        OR excluded.first_in_ms < work_history.first_in_ms
        THEN excluded.first_in_ms ELSE work_history.first_in_ms END,
    last_out_ms=CASE WHEN work_history.last_out_ms IS NULL
        OR excluded.last_out_ms > work_history.last_out_ms
        THEN excluded.last_out_ms ELSE work_history.last_out_ms END,
    last_in_ms=CASE WHEN work_history.last_in_ms IS NULL
        OR excluded.last_in_ms > work_history.last_in_ms
        THEN excluded.last_in_ms ELSE work_history.last_in_ms END,
    taps=work_history.taps + excluded.taps,
    cut_hour=CASE WHEN work_history.cut_hour IS NULL OR excluded.cut_hour > work_history.cut_hour
        THEN excluded.cut_hour ELSE work_history.cut_hour END"""

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
_TC_SCOPE = (f" AND (site, course) IN (SELECT site, course FROM stage WHERE {_TR_WHERE}"
             f" AND course IS NOT NULL)")
_TC = f"""
INSERT INTO training_course (site, course, persons, touches)
SELECT site, course, COUNT(DISTINCT person), COUNT(*)
FROM touches WHERE {_TR_WHERE} AND course IS NOT NULL{{scope}}
GROUP BY site, course
ON CONFLICT (site, course) DO UPDATE SET persons=excluded.persons, touches=excluded.touches
"""

# --- vending ledger: per machine, site, main contractor and month ----------------------------
_VL_WHERE = ("role='vending' AND flag IS NULL"
             " AND result IN ('dispensed', 'failed', 'indeterminate')")
_VL_SCOPE = f" AND (device, month) IN (SELECT device, month FROM stage WHERE {_VL_WHERE})"
# Who pays: the machine's own `[vending] contractor` when its touch names one, else the main
# contractor of the site's registry row in force on the touch's work day (the first row before
# any is in force, as registry.rule_on), else '' (reported as "unknown"). A registry change of a
# site's main contractor re-derives that site (store import_sites).
_PAYER = """COALESCE(contractor,
    (SELECT s.main_contractor FROM sites s WHERE s.site = touches.site
     AND s.valid_from <= touches.work_day ORDER BY s.valid_from DESC LIMIT 1),
    (SELECT s.main_contractor FROM sites s WHERE s.site = touches.site
     ORDER BY s.valid_from LIMIT 1), '')"""
_VL = f"""
INSERT INTO vending_ledger (device, site, contractor, month, dispensed, failed, indeterminate)
SELECT device, site, {_PAYER}, month,
       COUNT(CASE WHEN result='dispensed' THEN 1 END),
       COUNT(CASE WHEN result='failed' THEN 1 END),
       COUNT(CASE WHEN result='indeterminate' THEN 1 END)
FROM touches WHERE {_VL_WHERE}{{scope}}
GROUP BY device, site, 3, month
ON CONFLICT (device, site, contractor, month) DO UPDATE SET dispensed=excluded.dispensed,
    failed=excluded.failed, indeterminate=excluded.indeterminate
"""

_RECOMPUTED = ((_TM, _TM_SCOPE), (_TC, _TC_SCOPE), (_VL, _VL_SCOPE))

# every derived table with its columns in one order on both backends (a migration may have
# added a column at the end on one and rebuilt the table on the other)
DERIVED_COLUMNS = {
    "work_history": "tid, site, work_day, first_in_ms, last_out_ms, taps, cut_hour, last_in_ms",
    "training_monthly": "site, month, persons, touches",
    "training_course": "site, course, persons, touches",
    "vending_ledger": "device, site, contractor, month, dispensed, failed, indeterminate",
}
DERIVED_TABLES = tuple(DERIVED_COLUMNS)

# `stage` holds only the batch's newly stored touches: run after they are inserted.
INCREMENTAL = (_WH.format(source="stage", merge=_WH_FOLD, scope=""),
               *(sql.format(scope=scope) for sql, scope in _RECOMPUTED))
# Over every stored touch: run after emptying DERIVED_TABLES.
FULL = (_WH.format(source="touches", merge=_WH_REPLACE, scope=""),
        *(sql.format(scope="") for sql, _ in _RECOMPUTED))
# The rows of the sites in the temp table `resite`, from their stored touches.
_IN_RESITE = " AND site IN (SELECT site FROM resite)"
SITES = (*(f"DELETE FROM {t} WHERE site IN (SELECT site FROM resite)" for t in DERIVED_TABLES),
         _WH.format(source="touches", merge=_WH_REPLACE, scope=_IN_RESITE),
         *(sql.format(scope=_IN_RESITE) for sql, _ in _RECOMPUTED))
