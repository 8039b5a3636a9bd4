-- Issue 19: the operator console (clients/fuelcard_console) - its users and their sessions.
-- Written by the HTTP edge (fuelcard-api serve), like fc.principals and fc.api_sessions; the
-- serving role (fuelcard_app) only reads them.

-- table: fc.console_users
-- A person who logs in to the console, with one role (fuelcard_console.auth.Role; a user
-- with two jobs has two logins, so every action names one role). account_id: for a fleet
-- manager or a family's main-card holder, the account they have authority over (it and its
-- sub-accounts, as a JSON API principal); NULL for the back-office roles.
-- password_hash: "scrypt$<log2 n>$<r>$<p>$<salt hex>$<hash hex>" (as fc.principals).
-- totp_secret: the RFC 6238 secret (base32) the step-up checks codes against; shown once
-- when the user is made, never logged, never put in a page. totp_last_step: the last
-- 30-second step a code was accepted for, so that one code cannot be used twice.
-- failed_logins / locked_until: consecutive wrong passwords, and the lock they earn.
CREATE TABLE fc.console_users (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid uuid DEFAULT gen_random_uuid() NOT NULL UNIQUE,
    login text NOT NULL UNIQUE,
    role text NOT NULL,
    account_id bigint REFERENCES fc.accounts (id),
    password_hash text NOT NULL,
    totp_secret text NOT NULL,
    totp_last_step bigint NOT NULL DEFAULT 0,
    failed_logins integer NOT NULL DEFAULT 0,
    locked_until timestamp with time zone,
    created_at timestamp with time zone NOT NULL,
    disabled_at timestamp with time zone,
    CONSTRAINT console_users_login_check CHECK (login ~ '^[A-Za-z0-9._@-]{3,64}$'),
    CONSTRAINT console_users_role_check CHECK (role = ANY (ARRAY[
        'fleet_manager', 'holder', 'reviewer', 'finance', 'risk_officer', 'sre'])),
    -- the account goes with the roles that act for an account, and only with them
    CONSTRAINT console_users_account_check CHECK (
        (role IN ('fleet_manager', 'holder')) = (account_id IS NOT NULL)),
    CONSTRAINT console_users_failed_logins_check CHECK (failed_logins >= 0)
);
CREATE INDEX console_users_account ON fc.console_users (account_id) WHERE account_id IS NOT NULL;

-- table: fc.console_sessions
-- A console session: the SHA-256 of its cookie (the cookie itself is stored nowhere), whose
-- it is, the CSRF token its forms carry, when it was last used (idle expiry), when it ends
-- whatever happens (absolute expiry), and until when a TOTP step-up holds.
CREATE TABLE fc.console_sessions (
    token_hash bytea PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES fc.console_users (id) ON DELETE CASCADE,
    csrf_token text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    last_seen_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    stepped_up_until timestamp with time zone,
    CONSTRAINT console_sessions_token_hash_check CHECK (octet_length(token_hash) = 32)
);
CREATE INDEX console_sessions_user ON fc.console_sessions (user_id);
CREATE INDEX console_sessions_expiry ON fc.console_sessions (expires_at);
