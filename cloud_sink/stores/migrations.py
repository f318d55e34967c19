"""Versioned schema migrations, one list per dialect; a store applies the ones it lacks at start.

Append only: a released migration is never edited, a change is a new entry. SQLite records
the version in PRAGMA user_version, PostgreSQL in the schema_migrations table.
"""

_SQLITE_1 = """
CREATE TABLE touches (
    device TEXT NOT NULL, seq INTEGER NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL,
    ts_ms INTEGER NOT NULL, tq TEXT NOT NULL, card BLOB NOT NULL, card_tech TEXT NOT NULL,
    tid TEXT, decision TEXT NOT NULL, reason TEXT NOT NULL, lv INTEGER NOT NULL,
    cv INTEGER NOT NULL, facts TEXT NOT NULL, dir TEXT, work_day TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE INDEX touches_by_person ON touches (tid, site, work_day);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY, received_ms INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE work_history (
    tid TEXT NOT NULL, site TEXT NOT NULL, work_day TEXT NOT NULL,
    first_in_ms INTEGER, last_out_ms INTEGER, taps INTEGER NOT NULL,
    PRIMARY KEY (tid, site, work_day)
) WITHOUT ROWID
"""

# 2: flags, role facts as columns, training and vending tables, courses, device registry
_SQLITE_2 = """
ALTER TABLE touches ADD COLUMN flag TEXT;
ALTER TABLE touches ADD COLUMN month TEXT;
ALTER TABLE touches ADD COLUMN person TEXT;
ALTER TABLE touches ADD COLUMN course TEXT;
ALTER TABLE touches ADD COLUMN contractor TEXT;
ALTER TABLE touches ADD COLUMN slot TEXT;
ALTER TABLE touches ADD COLUMN result TEXT;
UPDATE touches SET month = substr(work_day, 1, 7),
    person = COALESCE(tid, CASE WHEN length(card) > 0 THEN 'card:' || lower(hex(card)) END),
    course = CASE WHEN role='training' THEN CAST(json_extract(facts, '$.course') AS TEXT) END,
    contractor = CASE WHEN role='vending' THEN CAST(json_extract(facts, '$.contractor') AS TEXT) END,
    slot = CASE WHEN role='vending' THEN CAST(json_extract(facts, '$.slot') AS TEXT) END,
    result = CASE WHEN role='vending' THEN CAST(json_extract(facts, '$.result') AS TEXT) END;
CREATE INDEX work_history_by_site ON work_history (site, work_day);
CREATE INDEX touches_training ON touches (site, month) WHERE role='training';
CREATE INDEX touches_course ON touches (course) WHERE course IS NOT NULL;
CREATE INDEX touches_vending ON touches (device, month) WHERE role='vending';
CREATE INDEX touches_flagged ON touches (received_ms) WHERE flag IS NOT NULL;
CREATE TABLE training_monthly (
    site TEXT NOT NULL, month TEXT NOT NULL, persons INTEGER NOT NULL, touches INTEGER NOT NULL,
    PRIMARY KEY (site, month)
) WITHOUT ROWID;
CREATE TABLE training_course (
    course TEXT NOT NULL PRIMARY KEY, persons INTEGER NOT NULL, touches INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE courses (
    course TEXT NOT NULL PRIMARY KEY, name TEXT NOT NULL, starts TEXT NOT NULL,
    ends TEXT NOT NULL, enrolled INTEGER NOT NULL, center TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE vending_ledger (
    device TEXT NOT NULL, site TEXT NOT NULL, contractor TEXT NOT NULL, month TEXT NOT NULL,
    dispensed INTEGER NOT NULL, failed INTEGER NOT NULL, indeterminate INTEGER NOT NULL,
    PRIMARY KEY (device, site, contractor, month)
) WITHOUT ROWID;
CREATE TABLE devices (
    device TEXT NOT NULL PRIMARY KEY, site TEXT NOT NULL, role TEXT NOT NULL
) WITHOUT ROWID
"""

# 3: gaps in devices' seqs, kept by the end-to-end acknowledgement ledger (cloud_sink.acks; a
# sink before this migration made the same table itself, hence IF NOT EXISTS); the index the
# work-history recomputation reads becomes covering (every column it reads), so it never
# visits the table: 2.4x faster ingest when technicians have many taps a day
_SQLITE_3 = """
CREATE TABLE IF NOT EXISTS seq_gaps (
    device TEXT NOT NULL, site TEXT NOT NULL,
    first_missing INTEGER NOT NULL, last_missing INTEGER NOT NULL,
    seen_ms INTEGER NOT NULL, closed_ms INTEGER,
    PRIMARY KEY (device, first_missing, last_missing, seen_ms)
);
CREATE INDEX touches_work_history ON touches (tid, site, work_day, role, decision, flag, dir,
    ts_ms);
DROP INDEX touches_by_person
"""

# 4: work history is folded in from each batch's new touches (derive.sql), so nothing reads
# touches by technician any more: the covering index goes (one random-key B-tree less per
# write). work_history is keyed by site and day first, so a day's upserts land on a few
# adjacent pages instead of one page per technician; that key also serves the site-month
# reports, so work_history_by_site goes with the old table.
_SQLITE_4 = """
DROP INDEX touches_work_history;
CREATE TABLE work_history_4 (
    tid TEXT NOT NULL, site TEXT NOT NULL, work_day TEXT NOT NULL,
    first_in_ms INTEGER, last_out_ms INTEGER, taps INTEGER NOT NULL,
    PRIMARY KEY (site, work_day, tid)
) WITHOUT ROWID;
INSERT INTO work_history_4 SELECT tid, site, work_day, first_in_ms, last_out_ms, taps
    FROM work_history;
DROP TABLE work_history;
ALTER TABLE work_history_4 RENAME TO work_history
"""

# 5: a dead letter of a device's own touch names its device and seq, which then count as
# accounted for in the end-to-end acknowledgement (cloud_sink.deadletters.dead_letter_key); older
# dead letters keep NULL there, as before
_SQLITE_5 = """
ALTER TABLE dead_letters ADD COLUMN device TEXT;
ALTER TABLE dead_letters ADD COLUMN seq INTEGER;
CREATE INDEX dead_letters_by_device ON dead_letters (device, seq) WHERE seq IS NOT NULL
"""

# 6: the site registry (cloud_sink.registry): sites and their rules by valid_from, each
# technician's employer and name, each site's contractor chain, sites seen but not registered,
# and a version every registry change bumps (a writer reloads the rules when it moved). Each
# touch and work-history row records the cut it was made with (NULL: made before this
# migration; `ccus sink rederive` fills it in). Training courses are keyed by center + course
# id: training_course is recomputed here from the stored touches, courses get (center, course).
_SQLITE_6 = """
ALTER TABLE touches ADD COLUMN cut_hour INTEGER;
ALTER TABLE work_history ADD COLUMN cut_hour INTEGER;
CREATE TABLE sites (
    site TEXT NOT NULL, valid_from TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    prefecture TEXT NOT NULL, main_contractor TEXT NOT NULL, day_cut_hour INTEGER NOT NULL,
    fold_persons INTEGER,
    PRIMARY KEY (site, valid_from)
) WITHOUT ROWID;
CREATE TABLE technicians (
    tid TEXT NOT NULL PRIMARY KEY, employer TEXT NOT NULL, name TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE site_chain (
    site TEXT NOT NULL, contractor TEXT NOT NULL, parent TEXT NOT NULL, name TEXT NOT NULL,
    PRIMARY KEY (site, contractor)
) WITHOUT ROWID;
CREATE TABLE sites_unregistered (
    site TEXT NOT NULL PRIMARY KEY, first_seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE registry_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT INTO registry_version VALUES (1, 0);
CREATE TABLE training_course_6 (
    site TEXT NOT NULL, course TEXT NOT NULL, persons INTEGER NOT NULL, touches INTEGER NOT NULL,
    PRIMARY KEY (site, course)
) WITHOUT ROWID;
INSERT INTO training_course_6 SELECT site, course, COUNT(DISTINCT person), COUNT(*) FROM touches
    WHERE role='training' AND decision='allow' AND flag IS NULL AND course IS NOT NULL
    GROUP BY site, course;
DROP TABLE training_course;
ALTER TABLE training_course_6 RENAME TO training_course;
CREATE TABLE courses_6 (
    center TEXT NOT NULL, course TEXT NOT NULL, name TEXT NOT NULL, starts TEXT NOT NULL,
    ends TEXT NOT NULL, enrolled INTEGER NOT NULL,
    PRIMARY KEY (center, course)
) WITHOUT ROWID;
INSERT INTO courses_6 SELECT center, course, name, starts, ends, enrolled FROM courses;
DROP TABLE courses;
ALTER TABLE courses_6 RENAME TO courses
"""

# 7: each work-history row keeps its last entry (`last_in_ms`, MAX of the entries by the
# touch's own time); with the last exit it gives the day's last passage, which "on site now"
# reads (SqlStore.on_site). Filled here from the stored touches in one grouped pass, as the
# derivation (derive.sql) computes it.
_LAST_IN = """
UPDATE work_history SET last_in_ms = s.m FROM (
    SELECT site, work_day, tid, MAX(ts_ms) AS m FROM touches
    WHERE role='gate' AND decision='allow' AND flag IS NULL AND tid IS NOT NULL AND dir='in'
    GROUP BY site, work_day, tid) AS s
WHERE work_history.site = s.site AND work_history.work_day = s.work_day
    AND work_history.tid = s.tid
"""
_SQLITE_7 = "ALTER TABLE work_history ADD COLUMN last_in_ms INTEGER;" + _LAST_IN

SQLITE = [_SQLITE_1, _SQLITE_2, _SQLITE_3, _SQLITE_4, _SQLITE_5, _SQLITE_6, _SQLITE_7]

_POSTGRES_1 = """
CREATE TABLE touches (
    device TEXT NOT NULL, seq BIGINT NOT NULL, site TEXT NOT NULL, role TEXT NOT NULL,
    ts_ms BIGINT NOT NULL, tq TEXT NOT NULL, card BYTEA NOT NULL, card_tech TEXT NOT NULL,
    tid TEXT, decision TEXT NOT NULL, reason TEXT NOT NULL, lv BIGINT NOT NULL,
    cv BIGINT NOT NULL, facts TEXT NOT NULL, dir TEXT, work_day TEXT NOT NULL,
    received_ms BIGINT NOT NULL, flag TEXT, month TEXT NOT NULL, person TEXT, course TEXT,
    contractor TEXT, slot TEXT, result TEXT,
    PRIMARY KEY (device, seq)
);
CREATE INDEX touches_by_person ON touches (tid, site, work_day);
CREATE INDEX touches_training ON touches (site, month) WHERE role='training';
CREATE INDEX touches_course ON touches (course) WHERE course IS NOT NULL;
CREATE INDEX touches_vending ON touches (device, month) WHERE role='vending';
CREATE INDEX touches_flagged ON touches (received_ms) WHERE flag IS NOT NULL;
CREATE TABLE dead_letters (
    id BIGSERIAL PRIMARY KEY, received_ms BIGINT NOT NULL, topic TEXT NOT NULL,
    payload BYTEA NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE work_history (
    tid TEXT NOT NULL, site TEXT NOT NULL, work_day TEXT NOT NULL,
    first_in_ms BIGINT, last_out_ms BIGINT, taps BIGINT NOT NULL,
    PRIMARY KEY (tid, site, work_day)
);
CREATE INDEX work_history_by_site ON work_history (site, work_day);
CREATE TABLE training_monthly (
    site TEXT NOT NULL, month TEXT NOT NULL, persons BIGINT NOT NULL, touches BIGINT NOT NULL,
    PRIMARY KEY (site, month)
);
CREATE TABLE training_course (
    course TEXT NOT NULL PRIMARY KEY, persons BIGINT NOT NULL, touches BIGINT NOT NULL
);
CREATE TABLE courses (
    course TEXT NOT NULL PRIMARY KEY, name TEXT NOT NULL, starts TEXT NOT NULL,
    ends TEXT NOT NULL, enrolled BIGINT NOT NULL, center TEXT NOT NULL
);
CREATE TABLE vending_ledger (
    device TEXT NOT NULL, site TEXT NOT NULL, contractor TEXT NOT NULL, month TEXT NOT NULL,
    dispensed BIGINT NOT NULL, failed BIGINT NOT NULL, indeterminate BIGINT NOT NULL,
    PRIMARY KEY (device, site, contractor, month)
);
CREATE TABLE devices (
    device TEXT NOT NULL PRIMARY KEY, site TEXT NOT NULL, role TEXT NOT NULL
)
"""

# 2: as SQLite 3: seq_gaps for the acknowledgement ledger, the covering work-history index
_POSTGRES_2 = """
CREATE TABLE IF NOT EXISTS seq_gaps (
    device TEXT NOT NULL, site TEXT NOT NULL,
    first_missing BIGINT NOT NULL, last_missing BIGINT NOT NULL,
    seen_ms BIGINT NOT NULL, closed_ms BIGINT,
    PRIMARY KEY (device, first_missing, last_missing, seen_ms)
);
CREATE INDEX touches_work_history ON touches (tid, site, work_day, role, decision, flag, dir,
    ts_ms);
DROP INDEX touches_by_person
"""

# 3: as SQLite 4: no covering index, work history keyed by site and day first
_POSTGRES_3 = """
DROP INDEX touches_work_history;
ALTER TABLE work_history DROP CONSTRAINT work_history_pkey;
ALTER TABLE work_history ADD PRIMARY KEY (site, work_day, tid);
DROP INDEX work_history_by_site
"""

# 4: as SQLite 5: dead letters name the device and seq they account for
_POSTGRES_4 = """
ALTER TABLE dead_letters ADD COLUMN device TEXT;
ALTER TABLE dead_letters ADD COLUMN seq BIGINT;
CREATE INDEX dead_letters_by_device ON dead_letters (device, seq) WHERE seq IS NOT NULL
"""

# 5: as SQLite 6: the site registry, the cut on each row, courses by center + course id
_POSTGRES_5 = """
ALTER TABLE touches ADD COLUMN cut_hour INTEGER;
ALTER TABLE work_history ADD COLUMN cut_hour INTEGER;
CREATE TABLE sites (
    site TEXT NOT NULL, valid_from TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    prefecture TEXT NOT NULL, main_contractor TEXT NOT NULL, day_cut_hour INTEGER NOT NULL,
    fold_persons INTEGER,
    PRIMARY KEY (site, valid_from)
);
CREATE TABLE technicians (
    tid TEXT NOT NULL PRIMARY KEY, employer TEXT NOT NULL, name TEXT NOT NULL
);
CREATE TABLE site_chain (
    site TEXT NOT NULL, contractor TEXT NOT NULL, parent TEXT NOT NULL, name TEXT NOT NULL,
    PRIMARY KEY (site, contractor)
);
CREATE TABLE sites_unregistered (
    site TEXT NOT NULL PRIMARY KEY, first_seen_ms BIGINT NOT NULL
);
CREATE TABLE registry_version (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
INSERT INTO registry_version VALUES (1, 0);
DELETE FROM training_course;
ALTER TABLE training_course ADD COLUMN site TEXT NOT NULL DEFAULT '';
ALTER TABLE training_course DROP CONSTRAINT training_course_pkey;
ALTER TABLE training_course ADD PRIMARY KEY (site, course);
INSERT INTO training_course (site, course, persons, touches) SELECT site, course,
    COUNT(DISTINCT person), COUNT(*) FROM touches
    WHERE role='training' AND decision='allow' AND flag IS NULL AND course IS NOT NULL
    GROUP BY site, course;
ALTER TABLE courses DROP CONSTRAINT courses_pkey;
ALTER TABLE courses ADD PRIMARY KEY (center, course)
"""

# 6: as SQLite 7: the last entry of each work-history row
_POSTGRES_6 = "ALTER TABLE work_history ADD COLUMN last_in_ms BIGINT;" + _LAST_IN

# 7 (PostgreSQL only): touches partitioned by month (native LIST partitioning on `month`, one
# partition touches_YYYY_MM a month), so an old month can be detached and archived whole.
#
# Exactly once by (device, seq) stays: a partitioned table's unique keys must contain the
# partition key, and `month` is derived (work day of ts_ms cut with the site's rules), so it is
# NOT identical on every resend: a repeat with another clock reading, or one cut after a
# registry change, may fall in another month, where a key (device, seq, month) would let it in
# a second time. The identity moves to `touch_keys` (device, seq), unpartitioned: a batch
# inserts its keys there first (ON CONFLICT DO NOTHING RETURNING, in key order, so concurrent
# sinks wait on each other's uncommitted keys as before), and only touches whose key it
# inserted go into `touches`. A key stays when its month is archived, so a late resend of an
# archived touch still counts as repeated, and the acknowledgement ledger reads the keys.
#
# ccus_touch_partition(month) makes a month's partition (and the next month's, ahead of it)
# when the first touch of it arrives; ccus_archive_touches('YYYY-MM') detaches every month
# before it and renames each to archived_touches_YYYY_MM, listed in touch_archive (a full
# rederive refuses while any is: it would drop the archived months' derived rows; docs/sink.md,
# "Partitions").
_POSTGRES_7 = """
CREATE TABLE touch_keys (
    device TEXT NOT NULL, seq BIGINT NOT NULL,
    PRIMARY KEY (device, seq)
);
INSERT INTO touch_keys (device, seq) SELECT device, seq FROM touches;
CREATE TABLE touch_archive (
    tbl TEXT NOT NULL PRIMARY KEY, month TEXT NOT NULL, archived_ms BIGINT NOT NULL
);
ALTER TABLE touches RENAME TO touches_5;
ALTER INDEX touches_pkey RENAME TO touches_5_pkey;
DROP INDEX touches_training;
DROP INDEX touches_course;
DROP INDEX touches_vending;
DROP INDEX touches_flagged;
CREATE TABLE touches (LIKE touches_5 INCLUDING DEFAULTS) PARTITION BY LIST (month);
ALTER TABLE touches ADD PRIMARY KEY (device, seq, month);
CREATE INDEX touches_training ON touches (site, month) WHERE role='training';
CREATE INDEX touches_course ON touches (course) WHERE course IS NOT NULL;
CREATE INDEX touches_vending ON touches (device, month) WHERE role='vending';
CREATE INDEX touches_flagged ON touches (received_ms) WHERE flag IS NOT NULL;
CREATE FUNCTION ccus_touch_partition_name(m TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN m ~ '^[0-9]{4}-[0-9]{2}$' THEN 'touches_' || translate(m, '-', '_')
        ELSE 'touches_x' || left(md5(m), 12) END
$$;
CREATE FUNCTION ccus_touch_partition(m TEXT) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    _month TEXT;
BEGIN
    -- one maker at a time: two sinks seeing a new month create it once
    PERFORM pg_advisory_xact_lock(x'6363757300000004'::bigint);
    FOREACH _month IN ARRAY ARRAY[m, CASE WHEN m ~ '^[0-9]{4}-(0[1-9]|1[0-2])$' THEN
            to_char(to_date(m || '-01', 'YYYY-MM-DD') + interval '1 month', 'YYYY-MM') END]
    LOOP
        CONTINUE WHEN _month IS NULL OR EXISTS (SELECT 1 FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'touches'::regclass AND c.relname = ccus_touch_partition_name(_month));
        EXECUTE format('CREATE TABLE %I PARTITION OF touches FOR VALUES IN (%L)',
                       ccus_touch_partition_name(_month), _month);
    END LOOP;
END $$;
CREATE FUNCTION ccus_archive_touches(before TEXT) RETURNS SETOF TEXT LANGUAGE plpgsql AS $$
DECLARE
    _part RECORD;
    _name TEXT;
    _n INTEGER;
BEGIN
    IF before !~ '^[0-9]{4}-(0[1-9]|1[0-2])$' THEN
        RAISE EXCEPTION 'archive: the month must be YYYY-MM, not %', before;
    END IF;
    PERFORM pg_advisory_xact_lock(x'6363757300000004'::bigint);
    FOR _part IN SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'touches'::regclass ORDER BY c.relname
    LOOP
        CONTINUE WHEN substring(_part.bound from $q$'([^']*)'$q$) >= before;
        EXECUTE format('ALTER TABLE touches DETACH PARTITION %I', _part.relname);
        _name := 'archived_' || _part.relname;
        _n := 1;
        WHILE to_regclass(_name) IS NOT NULL LOOP
            _n := _n + 1;
            _name := 'archived_' || _part.relname || '_' || _n;
        END LOOP;
        EXECUTE format('ALTER TABLE %I RENAME TO %I', _part.relname, _name);
        INSERT INTO touch_archive VALUES (_name, substring(_part.bound from $q$'([^']*)'$q$),
            (extract(epoch from clock_timestamp()) * 1000)::bigint);
        RETURN NEXT _name;
    END LOOP;
END $$;
SELECT ccus_touch_partition(month) FROM (SELECT DISTINCT month FROM touches_5) m;
SELECT ccus_touch_partition(to_char(now() AT TIME ZONE 'Asia/Tokyo', 'YYYY-MM'));
INSERT INTO touches SELECT * FROM touches_5;
DROP TABLE touches_5
"""

POSTGRES = [_POSTGRES_1, _POSTGRES_2, _POSTGRES_3, _POSTGRES_4, _POSTGRES_5, _POSTGRES_6,
            _POSTGRES_7]


def statements(script: str) -> list[str]:
    """A migration script as single statements: split at ';' outside $$-quoted function
    bodies (a body keeps its own ';')."""
    out, cur = [], ""
    for i, part in enumerate(script.split("$$")):
        if i % 2:
            cur += f"$${part}$$"
            continue
        head, *rest = part.split(";")
        cur += head
        for piece in rest:
            out.append(cur)
            cur = piece
    out.append(cur)
    return [s.strip() for s in out if s.strip()]
