-- The instructor directory, classrooms and their staff, and the help queue.
-- Timestamps are milliseconds since the Unix epoch (BIGINT) so that the same
-- queries run on PostgreSQL and SQLite.

CREATE TABLE instructors (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    is_active   BIGINT NOT NULL DEFAULT 1,
    created_at  BIGINT NOT NULL
);

CREATE TABLE classrooms (
    id          TEXT PRIMARY KEY,
    seats       BIGINT NOT NULL CHECK (seats > 0),
    created_at  BIGINT NOT NULL
);

CREATE TABLE classroom_staff (
    classroom_id  TEXT NOT NULL REFERENCES classrooms (id) ON DELETE CASCADE,
    instructor_id TEXT NOT NULL REFERENCES instructors (id) ON DELETE CASCADE,
    PRIMARY KEY (classroom_id, instructor_id)
);

CREATE TABLE help_requests (
    request_id   TEXT PRIMARY KEY,
    classroom_id TEXT NOT NULL REFERENCES classrooms (id) ON DELETE CASCADE,
    seat         BIGINT NOT NULL,
    student      TEXT NOT NULL,
    message      TEXT,
    status       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    claimed_by   TEXT REFERENCES instructors (id),
    claimed_at   BIGINT,
    resolved_by  TEXT REFERENCES instructors (id),
    resolved_at  BIGINT
);

CREATE INDEX help_requests_queue ON help_requests (classroom_id, status, created_at);
