-- Labels (a small string map, as JSON text) and whether a cancel was requested.
ALTER TABLE streams
    ADD COLUMN labels TEXT NOT NULL DEFAULT '{}',
    ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT false;
