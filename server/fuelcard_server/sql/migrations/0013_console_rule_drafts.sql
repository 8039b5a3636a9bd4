-- Issue 19: the risk officer's console. Written by the HTTP edge (like fc.console_users); the serving
-- role (fuelcard_app) only reads it.

-- A rule set the officer pasted or uploaded, kept as written, to be compared with the set in
-- force and backtested before it goes live. LoadRuleSet puts a set in force the moment it is
-- stored, so the console keeps the draft here until the officer activates it (with a TOTP
-- step-up); the draft's id is the idempotency key of that one LoadRuleSet, and loaded_version
-- records the version it became. Validated on the way in by the server's own rule model
-- (fuelcard_server.risk.model), so a draft that is here would load.
CREATE TABLE fc.console_rule_drafts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document text NOT NULL CHECK (length(document) <= 1048576),
    format text NOT NULL CHECK (format IN ('toml', 'json')),
    name text NOT NULL,
    digest text NOT NULL,
    rule_count integer NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL,
    loaded_version integer REFERENCES fc.risk_rule_sets (id)
);

-- The backtest page replays the last N days of holds (at most M of them): without an index on
-- created_at that is a scan of every hold ever made. A BRIN index fits a column that grows with
-- the table's physical order (holds are appended in time order), costs the pump path almost
-- nothing per insert, and stays a few pages for a year of sales.
CREATE INDEX holds_created_brin ON fc.holds USING brin (created_at);
