-- Labels (a small string map, as JSON text) and whether a cancel was requested.
ALTER TABLE streams ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE streams ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
