-- The baseline schema: tables, sequences, constraints, indexes, privileges and reference data,
-- as the released migrations 0001-0017 left them (squashed; a database already at 0017 is
-- recognised by `fuelcard migrate` and continues from here without re-running anything).
--
-- Numbered migrations hold schema only. Every stored function and trigger lives in
-- sql/functions/<area>.sql, applied after the migrations and re-applied when it changes.
-- The one index built on a function (idempotency_keys_retention) lives beside that function.

-- The card number segments' roles (分段存储): each segment schema is owned by its own NOLOGIN
-- role. Roles are cluster-wide, so they are made only if missing; this needs a superuser, or a
-- role with CREATEROLE that is a member of the four roles.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['fc_pan_seg1', 'fc_pan_seg2', 'fc_pan_seg3', 'fc_pan_vault'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END $$;

-- schema: fc
CREATE SCHEMA fc;

-- schema: fc_pan_seg1
CREATE SCHEMA fc_pan_seg1;


ALTER SCHEMA fc_pan_seg1 OWNER TO fc_pan_seg1;

-- schema: fc_pan_seg2
CREATE SCHEMA fc_pan_seg2;


ALTER SCHEMA fc_pan_seg2 OWNER TO fc_pan_seg2;

-- schema: fc_pan_seg3
CREATE SCHEMA fc_pan_seg3;


ALTER SCHEMA fc_pan_seg3 OWNER TO fc_pan_seg3;

-- schema: fc_pan_vault
CREATE SCHEMA fc_pan_vault;


ALTER SCHEMA fc_pan_vault OWNER TO fc_pan_vault;

-- type: fc.caps
CREATE TYPE fc.caps AS (
	txn bigint,
	daily bigint,
	monthly bigint,
	raise_ends timestamp with time zone
);

SET default_tablespace = '';

SET default_table_access_method = heap;

-- table: fc.accounts
-- Account kinds: 1 personal, 2 corporate, 3 family (AccountType in the proto),
-- 100 system account (the other side of every customer movement).
-- Fleets and families: a top-level account with sub-accounts one level deep.
-- Funding modes: 0 own (top-level), 1 ALLOCATED (own balance, funded by the
-- parent), 2 SHARED (spends the parent's balance within its own limits).
-- The latest ends_at of any limit raise granted to this account or to one of
-- its cards (an upper bound: a raise deleted or shortened leaves it); NULL:
-- none ever. No raise is in force at p_now unless raises_end_at > p_now.
CREATE TABLE fc.accounts (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    kind smallint NOT NULL,
    status smallint DEFAULT 1 NOT NULL,
    system_code text,
    tier smallint DEFAULT 1 NOT NULL,
    balance_fen bigint DEFAULT 0 NOT NULL,
    held_fen bigint DEFAULT 0 NOT NULL,
    points_balance bigint DEFAULT 0 NOT NULL,
    max_balance_fen bigint DEFAULT '9223372036854775807'::bigint NOT NULL,
    created_at timestamp with time zone NOT NULL,
    parent_id bigint,
    funding_mode smallint DEFAULT 0 NOT NULL,
    label text DEFAULT ''::text NOT NULL,
    limit_txn_fen bigint,
    limit_daily_fen bigint,
    limit_monthly_fen bigint,
    raises_end_at timestamp with time zone,
    CONSTRAINT accounts_funding_mode_check CHECK ((funding_mode = ANY (ARRAY[0, 1, 2]))),
    CONSTRAINT accounts_kind_check CHECK ((kind = ANY (ARRAY[1, 2, 3, 100]))),
    CONSTRAINT accounts_limit_daily_fen_check CHECK ((limit_daily_fen > 0)),
    CONSTRAINT accounts_limit_monthly_fen_check CHECK ((limit_monthly_fen > 0)),
    CONSTRAINT accounts_limit_txn_fen_check CHECK ((limit_txn_fen > 0)),
    CONSTRAINT accounts_max_balance_fen_check CHECK ((max_balance_fen > 0)),
    CONSTRAINT accounts_status_check CHECK ((status = ANY (ARRAY[1, 2]))),
    CONSTRAINT accounts_tier_check CHECK (((tier >= 1) AND (tier <= 4))),
    CONSTRAINT held_within_balance CHECK (((held_fen >= 0) AND (balance_fen >= held_fen))),
    CONSTRAINT parent_locks_first CHECK (((parent_id IS NULL) OR (parent_id < id))),
    CONSTRAINT points_not_negative CHECK ((points_balance >= 0)),
    CONSTRAINT shared_holds_no_money CHECK (((funding_mode <> 2) OR ((balance_fen = 0) AND (held_fen = 0)))),
    CONSTRAINT sub_accounts_have_a_mode CHECK (((parent_id IS NULL) = (funding_mode = 0))),
    CONSTRAINT system_accounts_have_code CHECK (((kind = 100) = (system_code IS NOT NULL))),
    CONSTRAINT system_balances_not_stored CHECK (((kind <> 100) OR ((balance_fen = 0) AND (held_fen = 0) AND (points_balance = 0))))
);

-- table: fc.reconciliation_breaks
CREATE TABLE fc.reconciliation_breaks (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    run_id bigint NOT NULL,
    channel smallint NOT NULL,
    business_date date NOT NULL,
    kind smallint NOT NULL,
    record_kind smallint NOT NULL,
    channel_txn_id text NOT NULL,
    ours_txn_uid uuid,
    ours_original text,
    ours_amount_fen bigint,
    ours_status smallint,
    ours_at timestamp with time zone,
    ours_business_date date,
    theirs_original text,
    theirs_amount_fen bigint,
    theirs_fee_fen bigint,
    theirs_status smallint,
    theirs_at timestamp with time zone,
    created_at timestamp with time zone NOT NULL,
    resolved_at timestamp with time zone,
    resolution text,
    resolved_by text,
    CONSTRAINT reconciliation_breaks_kind_check CHECK (((kind >= 1) AND (kind <= 4))),
    CONSTRAINT reconciliation_breaks_record_kind_check CHECK ((record_kind = ANY (ARRAY[1, 2]))),
    CONSTRAINT resolved_with_a_note CHECK (((resolved_at IS NULL) = (resolution IS NULL)))
);

-- table: fc.cards
-- Scope of use, kept in columns the authorize path reads directly. NULL means
-- no restriction of that kind. Hours are pairs of minutes after local
-- midnight: {start1, end1, start2, end2, ...}.
CREATE TABLE fc.cards (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    account_id bigint NOT NULL,
    pan_index bytea NOT NULL,
    masked text NOT NULL,
    status smallint DEFAULT 1 NOT NULL,
    created_at timestamp with time zone NOT NULL,
    limit_txn_fen bigint,
    limit_daily_fen bigint,
    limit_monthly_fen bigint,
    scope_stations text[],
    scope_products smallint[],
    scope_fences jsonb,
    scope_hours integer[],
    has_pin boolean DEFAULT false NOT NULL,
    CONSTRAINT cards_limit_daily_fen_check CHECK ((limit_daily_fen > 0)),
    CONSTRAINT cards_limit_monthly_fen_check CHECK ((limit_monthly_fen > 0)),
    CONSTRAINT cards_limit_txn_fen_check CHECK ((limit_txn_fen > 0)),
    CONSTRAINT cards_status_check CHECK ((status = ANY (ARRAY[1, 2, 3])))
);

-- table: fc.channel_exceptions
-- A refund the account could not cover in full: the channel paid the payer
-- back, the money was no longer on the account. One per refund. (Apart from
-- fc.settlement_exceptions, whose rows are late pump sales: hold_id NOT NULL.)
CREATE TABLE fc.channel_exceptions (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    refund_id bigint NOT NULL,
    account_id bigint NOT NULL,
    channel smallint NOT NULL,
    amount_fen bigint NOT NULL,
    reason text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    resolved_at timestamp with time zone,
    resolution text,
    resolved_by text,
    CONSTRAINT channel_exception_resolved_with_a_note CHECK ((((resolved_at IS NULL) = (resolution IS NULL)) AND ((resolved_at IS NULL) = (resolved_by IS NULL)))),
    CONSTRAINT channel_exceptions_amount_fen_check CHECK ((amount_fen > 0)),
    CONSTRAINT channel_exceptions_channel_check CHECK (((channel >= 1) AND (channel <= 5)))
);

-- table: fc.outbox
-- Written by every money movement and read only by the sequencer.
CREATE TABLE fc.outbox (
    id bigint NOT NULL,
    xid xid8 DEFAULT pg_current_xact_id() NOT NULL,
    kind smallint NOT NULL,
    ref_id bigint, -- id of the row in its table (NULL for stations)
    state smallint, -- holds: the state changed to
    at timestamp with time zone, -- business time of the change, when the row has one
    snap jsonb -- accounts, cards, stations: the changeable fields
)
WITH (autovacuum_vacuum_scale_factor='0.0', autovacuum_vacuum_threshold='5000');

-- table: fc.holds
-- Hold states: 1 AUTHORIZED, 2 CONFIRMED, 3 CANCELLED, 4 EXPIRED.
-- Holds remember who spent (the card's account) besides whose money is
-- reserved (account_id: the parent for SHARED sub-accounts), and the local
-- day whose usage counters they charged.
-- What the risk engine said about the hold, and its review.
-- review_state: NULL never suspended, 1 pending, 2 approved, 3 rejected.
CREATE TABLE fc.holds (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    account_id bigint NOT NULL,
    card_id bigint NOT NULL,
    state smallint NOT NULL,
    amount_fen bigint NOT NULL,
    settled_fen bigint DEFAULT 0 NOT NULL,
    station_id text NOT NULL,
    terminal_id text NOT NULL,
    nozzle integer NOT NULL,
    product smallint NOT NULL,
    created_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    closed_at timestamp with time zone,
    volume_ml bigint DEFAULT 0 NOT NULL,
    unit_price_fen bigint DEFAULT 0 NOT NULL,
    points_earned bigint DEFAULT 0 NOT NULL,
    confirmed_late boolean DEFAULT false NOT NULL,
    spender_account_id bigint NOT NULL,
    usage_day date NOT NULL,
    risk_score integer DEFAULT 0 NOT NULL,
    risk_rules text[] DEFAULT '{}'::text[] NOT NULL,
    review_state smallint,
    reviewed_by text,
    reviewed_at timestamp with time zone,
    review_note text,
    CONSTRAINT confirmed_settles_something CHECK (((state <> 2) OR (settled_fen > 0))),
    CONSTRAINT holds_amount_fen_check CHECK ((amount_fen > 0)),
    CONSTRAINT holds_review_state_check CHECK (((review_state >= 1) AND (review_state <= 3))),
    CONSTRAINT holds_state_check CHECK (((state >= 1) AND (state <= 6))),
    CONSTRAINT open_iff_active CHECK (((state = ANY (ARRAY[1, 5])) = (closed_at IS NULL))),
    CONSTRAINT settled_only_when_confirmed CHECK ((((settled_fen >= 0) AND (settled_fen <= amount_fen)) AND ((state = 2) OR (settled_fen = 0))))
);

-- table: fc.recharges
-- Channels: 1 bank card, 2 WeChat Pay, 3 Alipay, 4 e-CNY, 5 counter.
CREATE TABLE fc.recharges (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    account_id bigint NOT NULL,
    channel smallint NOT NULL,
    channel_txn_id text NOT NULL,
    amount_fen bigint NOT NULL,
    balance_after_fen bigint NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT recharges_amount_fen_check CHECK ((amount_fen > 0)),
    CONSTRAINT recharges_channel_check CHECK (((channel >= 1) AND (channel <= 5)))
);

-- table: fc.refunds
CREATE TABLE fc.refunds (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    recharge_id bigint NOT NULL,
    account_id bigint NOT NULL,
    channel smallint NOT NULL,
    channel_refund_id text NOT NULL,
    amount_fen bigint NOT NULL,
    debited_fen bigint NOT NULL,
    balance_after_fen bigint NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT refunds_amount_fen_check CHECK ((amount_fen > 0)),
    CONSTRAINT refunds_channel_check CHECK (((channel >= 1) AND (channel <= 5))),
    CONSTRAINT refunds_check CHECK (((debited_fen >= 0) AND (debited_fen <= amount_fen)))
);

-- table: fc.account_holders
-- Personal data lives apart from the money so that it can be protected (and
-- audited) on its own.
CREATE TABLE fc.account_holders (
    account_id bigint NOT NULL,
    name text NOT NULL,
    phone text DEFAULT ''::text NOT NULL,
    id_number text DEFAULT ''::text NOT NULL
);

-- sequence: fc.accounts_id_seq
ALTER TABLE fc.accounts ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.accounts_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.audit_log
-- One row per audited RPC. No card number, phone or ID number ever goes in:
-- the target is an internal uuid, the actor the caller's certificate identity,
-- the outcome a status code name and an UPPER_SNAKE reason.
CREATE TABLE fc.audit_log (
    id bigint NOT NULL,
    created_at timestamp with time zone NOT NULL,
    actor text NOT NULL,
    method text NOT NULL,
    target uuid,
    outcome text NOT NULL,
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL,
    CONSTRAINT audit_log_hash_check CHECK ((octet_length(hash) = 32)),
    CONSTRAINT audit_log_id_check CHECK ((id >= 1)),
    CONSTRAINT audit_log_prev_hash_check CHECK ((octet_length(prev_hash) = 32))
);

-- table: fc.card_pins
-- PINs: only a salted slow hash (scrypt, with a pepper from the root key) is
-- stored, never the PIN; the check itself runs in the server, which passes
-- authorize its verdict. Too many wrong PINs in a row lock the card.
CREATE TABLE fc.card_pins (
    card_id bigint NOT NULL,
    pin_hash text NOT NULL,
    failed_attempts smallint DEFAULT 0 NOT NULL,
    locked_at timestamp with time zone,
    changed_at timestamp with time zone NOT NULL,
    CONSTRAINT card_pins_failed_attempts_check CHECK ((failed_attempts >= 0))
);

-- sequence: fc.cards_id_seq
ALTER TABLE fc.cards ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.cards_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- sequence: fc.channel_exceptions_id_seq
ALTER TABLE fc.channel_exceptions ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.channel_exceptions_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.channel_keys
-- Payment channels' SM2 public keys, for their signed notifications.
CREATE TABLE fc.channel_keys (
    channel smallint NOT NULL,
    public_key_hex text NOT NULL,
    registered_at timestamp with time zone NOT NULL,
    CONSTRAINT channel_keys_channel_check CHECK (((channel >= 1) AND (channel <= 5))),
    CONSTRAINT channel_keys_public_key_hex_check CHECK ((public_key_hex ~ '^[0-9a-f]{128}$'::text))
);

-- table: fc.config
CREATE TABLE fc.config (
    key text NOT NULL,
    value text NOT NULL
);

-- table: fc.control_changes
-- Who changed which control, when, to what.
CREATE TABLE fc.control_changes (
    id bigint NOT NULL,
    actor_account_id bigint NOT NULL,
    kind text NOT NULL,
    card_id bigint,
    account_id bigint NOT NULL,
    details jsonb NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT control_changes_kind_check CHECK ((kind = ANY (ARRAY['limits'::text, 'raise'::text, 'scope'::text])))
);

-- sequence: fc.control_changes_id_seq
ALTER TABLE fc.control_changes ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.control_changes_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.event_backfill
-- The backfill.

-- One row per source (its outbox kind): rows with id <= through_id predate
-- the stream; done_id is how far the backfill has written. Stations (5) have
-- no id: through_id 1 means "to do", done_id 1 "done".
CREATE TABLE fc.event_backfill (
    source smallint NOT NULL,
    through_id bigint NOT NULL,
    done_id bigint DEFAULT 0 NOT NULL,
    CONSTRAINT event_backfill_source_check CHECK ((source = ANY (ARRAY[1, 3, 4, 5, 6])))
);

-- table: fc.event_head
CREATE TABLE fc.event_head (
    one boolean DEFAULT true NOT NULL,
    last_position bigint DEFAULT 0 NOT NULL,
    pruned_through bigint DEFAULT 0 NOT NULL,
    CONSTRAINT event_head_one_check CHECK (one)
);

-- table: fc.events
CREATE TABLE fc.events (
    "position" bigint NOT NULL,
    xid xid8 NOT NULL,
    kind smallint NOT NULL,
    occurred_at timestamp with time zone NOT NULL,
    sequenced_at timestamp with time zone NOT NULL,
    payload jsonb NOT NULL
);

-- sequence: fc.holds_id_seq
ALTER TABLE fc.holds ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.holds_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.idempotency_keys
-- Idempotency (AIP-155): the first response to (caller, request_id) is kept
-- with a fingerprint of the request it answered.
CREATE TABLE fc.idempotency_keys (
    caller text NOT NULL,
    request_id text NOT NULL,
    operation text NOT NULL,
    request_hash bytea NOT NULL,
    response jsonb NOT NULL,
    created_at timestamp with time zone NOT NULL
);

-- table: fc.journal
-- The journal. Each row is one balanced transfer: `amount` leaves the debit
-- account and reaches the credit account, so every entry balances by
-- construction and the sum of all balances is zero. A movement with several
-- legs (a sale that also earns points) is several rows in one transaction.
-- An account's balance is sum(credits) - sum(debits) of its rows.
--
-- Assets: 1 money (fen), 2 points.
-- Kinds:  1 recharge, 2 purchase, 3 points earned, 4 points redeemed.
--
-- No foreign keys here on purpose: a FOR KEY SHARE lock on the FUEL_SALES row
-- from every concurrent confirm would turn that row into a multixact hot spot.
-- `fuelcard verify` checks the references instead.
-- Journal kinds, extended: 5 allocation (parent to sub-account money),
-- 6 points transfer (member to main account), 7 points expired.
CREATE TABLE fc.journal (
    id bigint NOT NULL,
    kind smallint NOT NULL,
    asset smallint NOT NULL,
    debit_account_id bigint NOT NULL,
    credit_account_id bigint NOT NULL,
    amount bigint NOT NULL,
    hold_id bigint,
    recharge_id bigint,
    description text DEFAULT ''::text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT journal_amount_check CHECK ((amount > 0)),
    CONSTRAINT journal_asset_check CHECK ((asset = ANY (ARRAY[1, 2]))),
    CONSTRAINT journal_kind_check CHECK (((kind >= 1) AND (kind <= 8))),
    CONSTRAINT two_sided CHECK ((debit_account_id <> credit_account_id))
);

-- sequence: fc.journal_id_seq
ALTER TABLE fc.journal ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.journal_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.limit_raises
-- Temporary limit raises (假期临时提额): the caps in force inside a window.
CREATE TABLE fc.limit_raises (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    card_id bigint,
    account_id bigint,
    limit_txn_fen bigint,
    limit_daily_fen bigint,
    limit_monthly_fen bigint,
    starts_at timestamp with time zone NOT NULL,
    ends_at timestamp with time zone NOT NULL,
    CONSTRAINT limit_raises_limit_daily_fen_check CHECK ((limit_daily_fen > 0)),
    CONSTRAINT limit_raises_limit_monthly_fen_check CHECK ((limit_monthly_fen > 0)),
    CONSTRAINT limit_raises_limit_txn_fen_check CHECK ((limit_txn_fen > 0)),
    CONSTRAINT one_target CHECK (((card_id IS NULL) <> (account_id IS NULL))),
    CONSTRAINT window_forward CHECK ((ends_at > starts_at))
);

-- sequence: fc.limit_raises_id_seq
ALTER TABLE fc.limit_raises ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.limit_raises_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.monthly_spend
CREATE TABLE fc.monthly_spend (
    account_id bigint NOT NULL,
    month date NOT NULL,
    spend_fen bigint NOT NULL,
    prior_fen bigint,
    prior_window integer,
    CONSTRAINT monthly_spend_prior_fen_check CHECK ((prior_fen >= 0)),
    CONSTRAINT monthly_spend_spend_fen_check CHECK ((spend_fen >= 0)),
    CONSTRAINT prior_with_window CHECK (((prior_fen IS NULL) = (prior_window IS NULL)))
);

-- sequence: fc.outbox_id_seq
ALTER TABLE fc.outbox ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.outbox_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.points_lots
-- Points lots: every earning is a lot that expires; spending takes the oldest
-- first. An account's points balance is the sum of its lots' remainders.
CREATE TABLE fc.points_lots (
    id bigint NOT NULL,
    account_id bigint NOT NULL,
    points bigint NOT NULL,
    remaining bigint NOT NULL,
    earned_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    CONSTRAINT points_lots_check CHECK (((remaining >= 0) AND (remaining <= points))),
    CONSTRAINT points_lots_points_check CHECK ((points > 0))
);

-- sequence: fc.points_lots_id_seq
ALTER TABLE fc.points_lots ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.points_lots_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- sequence: fc.recharges_id_seq
ALTER TABLE fc.recharges ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.recharges_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- sequence: fc.reconciliation_breaks_id_seq
ALTER TABLE fc.reconciliation_breaks ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.reconciliation_breaks_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.reconciliation_runs
-- Reconciliation (对账): one run per channel file; the breaks it found.
--   break kind: 1 missing ours, 2 missing theirs, 3 amount mismatch,
--               4 status mismatch
CREATE TABLE fc.reconciliation_runs (
    id bigint NOT NULL,
    channel smallint NOT NULL,
    business_date date NOT NULL,
    file_name text NOT NULL,
    file_sha256 bytea NOT NULL,
    theirs bigint NOT NULL,
    ours bigint NOT NULL,
    matched bigint NOT NULL,
    missing_ours bigint NOT NULL,
    missing_theirs bigint NOT NULL,
    amount_mismatch bigint NOT NULL,
    status_mismatch bigint NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT reconciliation_runs_channel_check CHECK (((channel >= 1) AND (channel <= 5)))
);

-- sequence: fc.reconciliation_runs_id_seq
ALTER TABLE fc.reconciliation_runs ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.reconciliation_runs_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- sequence: fc.refunds_id_seq
ALTER TABLE fc.refunds ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.refunds_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.risk_active
-- The rule set in force (none: no row, nothing is scored but the card state
-- is kept, so a set activated later sees the cards' history).
CREATE TABLE fc.risk_active (
    singleton boolean DEFAULT true NOT NULL,
    rule_set_id integer NOT NULL,
    activated_at timestamp with time zone NOT NULL,
    activated_by text NOT NULL,
    CONSTRAINT risk_active_singleton_check CHECK (singleton)
);

-- table: fc.risk_card_state
-- Per card: what the rules need to know about its past, bounded.
CREATE TABLE fc.risk_card_state (
    card_id bigint NOT NULL,
    n_auths integer DEFAULT 0 NOT NULL, -- holds made (approved or suspended)
    last_at timestamp with time zone,
    last_station text,
    last_lat double precision,
    last_lon double precision,
    auth_times timestamp with time zone[] DEFAULT '{}'::timestamp with time zone[] NOT NULL, -- oldest first, the last 64
    day_list date[] DEFAULT '{}'::date[] NOT NULL, -- newest first, last 7 local days
    day_fens bigint[] DEFAULT '{}'::bigint[] NOT NULL, -- authorized amount on each
    terminals text[] DEFAULT '{}'::text[] NOT NULL, -- most recent first, at most 32
    decline_times timestamp with time zone[] DEFAULT '{}'::timestamp with time zone[] NOT NULL -- oldest first, the last 16
);

-- table: fc.risk_rule_changes
-- Who changed the rules, when, and what changed (rule ids added, removed,
-- changed against the set in force before). The RPC itself is also in the
-- hash-chained audit log.
CREATE TABLE fc.risk_rule_changes (
    id bigint NOT NULL,
    action text NOT NULL,
    rule_set_id integer,
    previous_id integer,
    actor text NOT NULL,
    details jsonb NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT risk_rule_changes_action_check CHECK ((action = ANY (ARRAY['load'::text, 'activate'::text, 'deactivate'::text])))
);

-- sequence: fc.risk_rule_changes_id_seq
ALTER TABLE fc.risk_rule_changes ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.risk_rule_changes_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.risk_rule_sets
-- Rule sets.

-- Rule kinds (fuelcard_server/risk/model.py is the reference):
--   1 amount            amount >= threshold
--   2 daily_amount      card's authorized amount this local day, with this one, >= threshold
--   3 weekly_amount     ... over the last 7 local days (today and the 6 before)
--   4 velocity          card's authorizations in the last window_s, with this one, >= threshold
--   5 min_interval      less than window_s since the card's last authorization
--   6 impossible_travel distance from the last authorization's station >= threshold metres
--                       and faster than speed_kmh to cover it
--   7 new_terminal      terminal not among the card's recent ones, card used >= threshold times
--   8 watchlist         station in stations or terminal in terminals
--   9 decline_streak    card's declines in the last window_s >= threshold
--  10 night_amount      amount >= threshold and local time in [minute_from, minute_to)
--  11 points_redemption points redeemed by the card's account in the last window_s >= threshold
--  99 fault            test only (risk_fault_injection setting): divides by zero
-- Actions: 0 score only, 2 review, 3 decline.
CREATE TABLE fc.risk_rule_sets (
    id integer NOT NULL, -- the version
    name text NOT NULL,
    document jsonb NOT NULL,
    digest text NOT NULL,
    fallback smallint NOT NULL,
    review_score integer NOT NULL,
    decline_score integer NOT NULL,
    windows integer[] NOT NULL,
    has_points boolean NOT NULL,
    created_at timestamp with time zone NOT NULL,
    created_by text NOT NULL,
    CONSTRAINT risk_rule_sets_decline_score_check CHECK ((decline_score > 0)),
    CONSTRAINT risk_rule_sets_fallback_check CHECK ((fallback = ANY (ARRAY[2, 3]))),
    CONSTRAINT risk_rule_sets_review_score_check CHECK ((review_score > 0))
);

-- sequence: fc.risk_rule_sets_id_seq
ALTER TABLE fc.risk_rule_sets ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.risk_rule_sets_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.risk_rules
CREATE TABLE fc.risk_rules (
    rule_set_id integer NOT NULL,
    ord integer NOT NULL,
    rule_id text NOT NULL,
    kind smallint NOT NULL,
    action smallint NOT NULL,
    score integer NOT NULL,
    tiers smallint[], -- NULL: every tier
    account_kinds smallint[], -- NULL: every account type
    threshold bigint DEFAULT 0 NOT NULL,
    window_s integer DEFAULT 0 NOT NULL,
    widx integer DEFAULT 0 NOT NULL,
    speed_kmh double precision DEFAULT 0 NOT NULL,
    minute_from integer DEFAULT 0 NOT NULL,
    minute_to integer DEFAULT 0 NOT NULL,
    stations text[] DEFAULT '{}'::text[] NOT NULL,
    terminals text[] DEFAULT '{}'::text[] NOT NULL,
    CONSTRAINT risk_rules_action_check CHECK ((action = ANY (ARRAY[0, 2, 3]))),
    CONSTRAINT risk_rules_kind_check CHECK ((((kind >= 1) AND (kind <= 11)) OR (kind = 99))),
    CONSTRAINT risk_rules_score_check CHECK ((score >= 0))
);

-- table: fc.settlement_exceptions
-- A confirm that arrived after its hold expired, when the money was gone:
-- the fuel was delivered but not paid from the card. One per hold.
CREATE TABLE fc.settlement_exceptions (
    id bigint NOT NULL,
    uid uuid DEFAULT gen_random_uuid() NOT NULL,
    hold_id bigint NOT NULL,
    account_id bigint NOT NULL,
    amount_fen bigint NOT NULL,
    reason text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    resolved_at timestamp with time zone,
    CONSTRAINT settlement_exceptions_amount_fen_check CHECK ((amount_fen > 0))
);

-- sequence: fc.settlement_exceptions_id_seq
ALTER TABLE fc.settlement_exceptions ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.settlement_exceptions_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.settlement_records
-- The neutral settlement record (中立的清结算协议): settlement.proto's
-- SettlementRecord, one row per channel transaction, written by triggers in
-- the transaction that moves the money.
--   kind:   1 payment (a recharge), 2 refund
--   status: 1 success, 2 failed, 3 processing
CREATE TABLE fc.settlement_records (
    id bigint NOT NULL,
    channel smallint NOT NULL,
    kind smallint NOT NULL,
    channel_txn_id text NOT NULL,
    txn_uid uuid NOT NULL, -- recharges.uid or refunds.uid
    original_channel_txn_id text DEFAULT ''::text NOT NULL,
    amount_fen bigint NOT NULL,
    fee_fen bigint DEFAULT 0 NOT NULL,
    status smallint NOT NULL,
    occurred_at timestamp with time zone NOT NULL,
    business_date date NOT NULL,
    CONSTRAINT settlement_records_amount_fen_check CHECK ((amount_fen > 0)),
    CONSTRAINT settlement_records_channel_check CHECK (((channel >= 1) AND (channel <= 5))),
    CONSTRAINT settlement_records_kind_check CHECK ((kind = ANY (ARRAY[1, 2]))),
    CONSTRAINT settlement_records_status_check CHECK ((status = ANY (ARRAY[1, 2, 3])))
);

-- sequence: fc.settlement_records_id_seq
ALTER TABLE fc.settlement_records ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.settlement_records_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.stations
CREATE TABLE fc.stations (
    station_id text NOT NULL,
    name text NOT NULL,
    latitude double precision NOT NULL,
    longitude double precision NOT NULL,
    CONSTRAINT stations_latitude_check CHECK (((latitude >= ('-90'::integer)::double precision) AND (latitude <= (90)::double precision))),
    CONSTRAINT stations_longitude_check CHECK (((longitude >= ('-180'::integer)::double precision) AND (longitude <= (180)::double precision)))
);

-- table: fc.step_up_challenges
CREATE TABLE fc.step_up_challenges (
    uid uuid NOT NULL,
    caller text NOT NULL,
    request_id text NOT NULL,
    kind smallint NOT NULL,
    subject uuid NOT NULL,
    amount_fen bigint NOT NULL,
    code_hash bytea NOT NULL,
    created_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    attempts smallint DEFAULT 0 NOT NULL,
    max_attempts smallint NOT NULL,
    consumed_at timestamp with time zone,
    consumed_request_id text,
    sent_at timestamp with time zone,
    sending_since timestamp with time zone,
    CONSTRAINT step_up_attempts_bounded CHECK (((attempts >= 0) AND (attempts <= max_attempts))),
    CONSTRAINT step_up_challenges_amount_fen_check CHECK ((amount_fen >= 0)),
    CONSTRAINT step_up_challenges_code_hash_check CHECK ((octet_length(code_hash) = 32)),
    CONSTRAINT step_up_challenges_kind_check CHECK (((kind >= 1) AND (kind <= 5))),
    CONSTRAINT step_up_challenges_max_attempts_check CHECK ((max_attempts >= 1)),
    CONSTRAINT step_up_consumed_whole CHECK (((consumed_at IS NULL) = (consumed_request_id IS NULL))),
    CONSTRAINT step_up_sent_or_sending CHECK (((sent_at IS NULL) OR (sending_since IS NULL)))
);

-- table: fc.terminal_keys
-- Working keys (三级密钥体制, the middle tier): per terminal and version, sealed
-- (SM4-GCM) under a key derived from the root key, with the window and the
-- terminal bound to the seal. The root key itself is never in the database.
CREATE TABLE fc.terminal_keys (
    terminal_id text NOT NULL,
    version integer NOT NULL,
    valid_from timestamp with time zone NOT NULL,
    valid_until timestamp with time zone NOT NULL,
    root_key_id text NOT NULL,
    sealed bytea NOT NULL,
    CONSTRAINT terminal_keys_check CHECK ((valid_until > valid_from))
);

-- table: fc.terminals
CREATE TABLE fc.terminals (
    terminal_id text NOT NULL,
    last_counter bigint NOT NULL,
    CONSTRAINT terminals_last_counter_check CHECK ((last_counter >= 0))
);

-- table: fc.tier_changes
CREATE TABLE fc.tier_changes (
    id bigint NOT NULL,
    account_id bigint NOT NULL,
    from_tier smallint NOT NULL,
    to_tier smallint NOT NULL,
    spend_fen bigint NOT NULL,
    created_at timestamp with time zone NOT NULL
);

-- sequence: fc.tier_changes_id_seq
ALTER TABLE fc.tier_changes ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME fc.tier_changes_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- table: fc.tier_rules
-- Member tiers: thresholds on the rolling confirmed spend, and the points
-- multiplier of each (in per mille: 1000 = x1.0).
CREATE TABLE fc.tier_rules (
    tier smallint NOT NULL,
    min_spend_fen bigint NOT NULL,
    multiplier_permille integer NOT NULL,
    CONSTRAINT tier_rules_min_spend_fen_check CHECK ((min_spend_fen >= 0)),
    CONSTRAINT tier_rules_multiplier_permille_check CHECK (((multiplier_permille >= 0) AND (multiplier_permille <= 100000))),
    CONSTRAINT tier_rules_tier_check CHECK (((tier >= 1) AND (tier <= 4)))
);

-- table: fc.usage
-- Spending per local day, per card and per account (the spender, and the
-- spender's parent). A hold charges its amount while AUTHORIZED, its settled
-- amount once CONFIRMED, nothing once released. Months are sums of days.
-- Kinds: 1 card, 2 account.
CREATE TABLE fc.usage (
    scope_kind smallint NOT NULL,
    scope_id bigint NOT NULL,
    day date NOT NULL,
    amount_fen bigint NOT NULL,
    CONSTRAINT usage_amount_fen_check CHECK ((amount_fen >= 0)),
    CONSTRAINT usage_scope_kind_check CHECK ((scope_kind = ANY (ARRAY[1, 2])))
);

-- table: fc_pan_seg1.sealed
CREATE TABLE fc_pan_seg1.sealed (
    card_id bigint NOT NULL,
    root_key_id text NOT NULL,
    sealed bytea NOT NULL
);


ALTER TABLE fc_pan_seg1.sealed OWNER TO fc_pan_seg1;

-- table: fc_pan_seg2.sealed
CREATE TABLE fc_pan_seg2.sealed (
    card_id bigint NOT NULL,
    root_key_id text NOT NULL,
    sealed bytea NOT NULL
);


ALTER TABLE fc_pan_seg2.sealed OWNER TO fc_pan_seg2;

-- table: fc_pan_seg3.sealed
CREATE TABLE fc_pan_seg3.sealed (
    card_id bigint NOT NULL,
    root_key_id text NOT NULL,
    sealed bytea NOT NULL
);


ALTER TABLE fc_pan_seg3.sealed OWNER TO fc_pan_seg3;

-- table: fc_pan_vault.sealed
CREATE TABLE fc_pan_vault.sealed (
    card_id bigint NOT NULL,
    root_key_id text NOT NULL,
    sealed bytea NOT NULL
);


ALTER TABLE fc_pan_vault.sealed OWNER TO fc_pan_vault;

-- constraint: fc.account_holders account_holders_pkey
ALTER TABLE ONLY fc.account_holders
    ADD CONSTRAINT account_holders_pkey PRIMARY KEY (account_id);

-- constraint: fc.accounts accounts_pkey
ALTER TABLE ONLY fc.accounts
    ADD CONSTRAINT accounts_pkey PRIMARY KEY (id);

-- constraint: fc.accounts accounts_system_code_key
ALTER TABLE ONLY fc.accounts
    ADD CONSTRAINT accounts_system_code_key UNIQUE (system_code);

-- constraint: fc.accounts accounts_uid_key
ALTER TABLE ONLY fc.accounts
    ADD CONSTRAINT accounts_uid_key UNIQUE (uid);

-- constraint: fc.audit_log audit_log_pkey
ALTER TABLE ONLY fc.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (id);

-- constraint: fc.card_pins card_pins_pkey
ALTER TABLE ONLY fc.card_pins
    ADD CONSTRAINT card_pins_pkey PRIMARY KEY (card_id);

-- constraint: fc.cards cards_pan_index_key
ALTER TABLE ONLY fc.cards
    ADD CONSTRAINT cards_pan_index_key UNIQUE (pan_index);

-- constraint: fc.cards cards_pkey
ALTER TABLE ONLY fc.cards
    ADD CONSTRAINT cards_pkey PRIMARY KEY (id);

-- constraint: fc.cards cards_uid_key
ALTER TABLE ONLY fc.cards
    ADD CONSTRAINT cards_uid_key UNIQUE (uid);

-- constraint: fc.channel_exceptions channel_exceptions_pkey
ALTER TABLE ONLY fc.channel_exceptions
    ADD CONSTRAINT channel_exceptions_pkey PRIMARY KEY (id);

-- constraint: fc.channel_exceptions channel_exceptions_refund_id_key
ALTER TABLE ONLY fc.channel_exceptions
    ADD CONSTRAINT channel_exceptions_refund_id_key UNIQUE (refund_id);

-- constraint: fc.channel_exceptions channel_exceptions_uid_key
ALTER TABLE ONLY fc.channel_exceptions
    ADD CONSTRAINT channel_exceptions_uid_key UNIQUE (uid);

-- constraint: fc.channel_keys channel_keys_pkey
ALTER TABLE ONLY fc.channel_keys
    ADD CONSTRAINT channel_keys_pkey PRIMARY KEY (channel);

-- constraint: fc.config config_pkey
ALTER TABLE ONLY fc.config
    ADD CONSTRAINT config_pkey PRIMARY KEY (key);

-- constraint: fc.control_changes control_changes_pkey
ALTER TABLE ONLY fc.control_changes
    ADD CONSTRAINT control_changes_pkey PRIMARY KEY (id);

-- constraint: fc.event_backfill event_backfill_pkey
ALTER TABLE ONLY fc.event_backfill
    ADD CONSTRAINT event_backfill_pkey PRIMARY KEY (source);

-- constraint: fc.event_head event_head_pkey
ALTER TABLE ONLY fc.event_head
    ADD CONSTRAINT event_head_pkey PRIMARY KEY (one);

-- constraint: fc.events events_pkey
ALTER TABLE ONLY fc.events
    ADD CONSTRAINT events_pkey PRIMARY KEY ("position");

-- constraint: fc.holds holds_pkey
ALTER TABLE ONLY fc.holds
    ADD CONSTRAINT holds_pkey PRIMARY KEY (id);

-- constraint: fc.holds holds_uid_key
ALTER TABLE ONLY fc.holds
    ADD CONSTRAINT holds_uid_key UNIQUE (uid);

-- constraint: fc.idempotency_keys idempotency_keys_pkey
ALTER TABLE ONLY fc.idempotency_keys
    ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (caller, request_id);

-- constraint: fc.journal journal_pkey
ALTER TABLE ONLY fc.journal
    ADD CONSTRAINT journal_pkey PRIMARY KEY (id);

-- constraint: fc.limit_raises limit_raises_pkey
ALTER TABLE ONLY fc.limit_raises
    ADD CONSTRAINT limit_raises_pkey PRIMARY KEY (id);

-- constraint: fc.limit_raises limit_raises_uid_key
ALTER TABLE ONLY fc.limit_raises
    ADD CONSTRAINT limit_raises_uid_key UNIQUE (uid);

-- constraint: fc.monthly_spend monthly_spend_pkey
ALTER TABLE ONLY fc.monthly_spend
    ADD CONSTRAINT monthly_spend_pkey PRIMARY KEY (account_id, month);

-- constraint: fc.recharges one_recharge_per_channel_txn
ALTER TABLE ONLY fc.recharges
    ADD CONSTRAINT one_recharge_per_channel_txn UNIQUE (channel, channel_txn_id);

-- constraint: fc.refunds one_refund_per_channel_refund
ALTER TABLE ONLY fc.refunds
    ADD CONSTRAINT one_refund_per_channel_refund UNIQUE (channel, channel_refund_id);

-- constraint: fc.settlement_records one_settlement_record_per_channel_txn
ALTER TABLE ONLY fc.settlement_records
    ADD CONSTRAINT one_settlement_record_per_channel_txn UNIQUE (channel, kind, channel_txn_id);

-- constraint: fc.outbox outbox_pkey
ALTER TABLE ONLY fc.outbox
    ADD CONSTRAINT outbox_pkey PRIMARY KEY (id);

-- constraint: fc.points_lots points_lots_pkey
ALTER TABLE ONLY fc.points_lots
    ADD CONSTRAINT points_lots_pkey PRIMARY KEY (id);

-- constraint: fc.recharges recharges_pkey
ALTER TABLE ONLY fc.recharges
    ADD CONSTRAINT recharges_pkey PRIMARY KEY (id);

-- constraint: fc.recharges recharges_uid_key
ALTER TABLE ONLY fc.recharges
    ADD CONSTRAINT recharges_uid_key UNIQUE (uid);

-- constraint: fc.reconciliation_breaks reconciliation_breaks_pkey
ALTER TABLE ONLY fc.reconciliation_breaks
    ADD CONSTRAINT reconciliation_breaks_pkey PRIMARY KEY (id);

-- constraint: fc.reconciliation_breaks reconciliation_breaks_uid_key
ALTER TABLE ONLY fc.reconciliation_breaks
    ADD CONSTRAINT reconciliation_breaks_uid_key UNIQUE (uid);

-- constraint: fc.reconciliation_runs reconciliation_runs_pkey
ALTER TABLE ONLY fc.reconciliation_runs
    ADD CONSTRAINT reconciliation_runs_pkey PRIMARY KEY (id);

-- constraint: fc.refunds refunds_pkey
ALTER TABLE ONLY fc.refunds
    ADD CONSTRAINT refunds_pkey PRIMARY KEY (id);

-- constraint: fc.refunds refunds_uid_key
ALTER TABLE ONLY fc.refunds
    ADD CONSTRAINT refunds_uid_key UNIQUE (uid);

-- constraint: fc.risk_active risk_active_pkey
ALTER TABLE ONLY fc.risk_active
    ADD CONSTRAINT risk_active_pkey PRIMARY KEY (singleton);

-- constraint: fc.risk_card_state risk_card_state_pkey
ALTER TABLE ONLY fc.risk_card_state
    ADD CONSTRAINT risk_card_state_pkey PRIMARY KEY (card_id);

-- constraint: fc.risk_rule_changes risk_rule_changes_pkey
ALTER TABLE ONLY fc.risk_rule_changes
    ADD CONSTRAINT risk_rule_changes_pkey PRIMARY KEY (id);

-- constraint: fc.risk_rule_sets risk_rule_sets_pkey
ALTER TABLE ONLY fc.risk_rule_sets
    ADD CONSTRAINT risk_rule_sets_pkey PRIMARY KEY (id);

-- constraint: fc.risk_rules risk_rules_pkey
ALTER TABLE ONLY fc.risk_rules
    ADD CONSTRAINT risk_rules_pkey PRIMARY KEY (rule_set_id, ord);

-- constraint: fc.risk_rules risk_rules_rule_set_id_rule_id_key
ALTER TABLE ONLY fc.risk_rules
    ADD CONSTRAINT risk_rules_rule_set_id_rule_id_key UNIQUE (rule_set_id, rule_id);

-- constraint: fc.settlement_exceptions settlement_exceptions_hold_id_key
ALTER TABLE ONLY fc.settlement_exceptions
    ADD CONSTRAINT settlement_exceptions_hold_id_key UNIQUE (hold_id);

-- constraint: fc.settlement_exceptions settlement_exceptions_pkey
ALTER TABLE ONLY fc.settlement_exceptions
    ADD CONSTRAINT settlement_exceptions_pkey PRIMARY KEY (id);

-- constraint: fc.settlement_exceptions settlement_exceptions_uid_key
ALTER TABLE ONLY fc.settlement_exceptions
    ADD CONSTRAINT settlement_exceptions_uid_key UNIQUE (uid);

-- constraint: fc.settlement_records settlement_records_pkey
ALTER TABLE ONLY fc.settlement_records
    ADD CONSTRAINT settlement_records_pkey PRIMARY KEY (id);

-- constraint: fc.stations stations_pkey
ALTER TABLE ONLY fc.stations
    ADD CONSTRAINT stations_pkey PRIMARY KEY (station_id);

-- constraint: fc.step_up_challenges step_up_challenges_pkey
ALTER TABLE ONLY fc.step_up_challenges
    ADD CONSTRAINT step_up_challenges_pkey PRIMARY KEY (uid);

-- constraint: fc.step_up_challenges step_up_one_per_request
ALTER TABLE ONLY fc.step_up_challenges
    ADD CONSTRAINT step_up_one_per_request UNIQUE (caller, request_id);

-- constraint: fc.terminal_keys terminal_keys_pkey
ALTER TABLE ONLY fc.terminal_keys
    ADD CONSTRAINT terminal_keys_pkey PRIMARY KEY (terminal_id, version);

-- constraint: fc.terminals terminals_pkey
ALTER TABLE ONLY fc.terminals
    ADD CONSTRAINT terminals_pkey PRIMARY KEY (terminal_id);

-- constraint: fc.tier_changes tier_changes_pkey
ALTER TABLE ONLY fc.tier_changes
    ADD CONSTRAINT tier_changes_pkey PRIMARY KEY (id);

-- constraint: fc.tier_rules tier_rules_pkey
ALTER TABLE ONLY fc.tier_rules
    ADD CONSTRAINT tier_rules_pkey PRIMARY KEY (tier);

-- constraint: fc.usage usage_pkey
ALTER TABLE ONLY fc.usage
    ADD CONSTRAINT usage_pkey PRIMARY KEY (scope_kind, scope_id, day);

-- constraint: fc_pan_seg1.sealed sealed_pkey
ALTER TABLE ONLY fc_pan_seg1.sealed
    ADD CONSTRAINT sealed_pkey PRIMARY KEY (card_id);

-- constraint: fc_pan_seg2.sealed sealed_pkey
ALTER TABLE ONLY fc_pan_seg2.sealed
    ADD CONSTRAINT sealed_pkey PRIMARY KEY (card_id);

-- constraint: fc_pan_seg3.sealed sealed_pkey
ALTER TABLE ONLY fc_pan_seg3.sealed
    ADD CONSTRAINT sealed_pkey PRIMARY KEY (card_id);

-- constraint: fc_pan_vault.sealed sealed_pkey
ALTER TABLE ONLY fc_pan_vault.sealed
    ADD CONSTRAINT sealed_pkey PRIMARY KEY (card_id);

-- index: fc.accounts_children
CREATE INDEX accounts_children ON fc.accounts USING btree (parent_id) WHERE (parent_id IS NOT NULL);

-- index: fc.cards_account
CREATE INDEX cards_account ON fc.cards USING btree (account_id);

-- index: fc.channel_exceptions_open
CREATE INDEX channel_exceptions_open ON fc.channel_exceptions USING btree (id DESC) WHERE (resolved_at IS NULL);

-- index: fc.control_changes_account
CREATE INDEX control_changes_account ON fc.control_changes USING btree (account_id, id DESC);

-- index: fc.events_sequenced
CREATE INDEX events_sequenced ON fc.events USING btree (sequenced_at);

-- index: fc.holds_by_account
CREATE INDEX holds_by_account ON fc.holds USING btree (account_id, id DESC);

-- index: fc.holds_by_spender
CREATE INDEX holds_by_spender ON fc.holds USING btree (spender_account_id, id DESC);

-- index: fc.holds_expiring
CREATE INDEX holds_expiring ON fc.holds USING btree (expires_at) WHERE (state = ANY (ARRAY[1, 5]));

-- index: fc.holds_suspended
CREATE INDEX holds_suspended ON fc.holds USING btree (id) WHERE (state = 5);

-- index: fc.journal_by_credit
CREATE INDEX journal_by_credit ON fc.journal USING btree (credit_account_id, id DESC);

-- index: fc.journal_by_debit
CREATE INDEX journal_by_debit ON fc.journal USING btree (debit_account_id, id DESC);

-- index: fc.journal_redemptions
-- Redemptions by account and time, for the points_redemption rule.
CREATE INDEX journal_redemptions ON fc.journal USING btree (debit_account_id, created_at) WHERE (kind = 4);

-- index: fc.limit_raises_account
CREATE INDEX limit_raises_account ON fc.limit_raises USING btree (account_id, ends_at) WHERE (account_id IS NOT NULL);

-- index: fc.limit_raises_card
CREATE INDEX limit_raises_card ON fc.limit_raises USING btree (card_id, ends_at) WHERE (card_id IS NOT NULL);

-- index: fc.points_lots_expiring
CREATE INDEX points_lots_expiring ON fc.points_lots USING btree (expires_at) WHERE (remaining > 0);

-- index: fc.points_lots_open
CREATE INDEX points_lots_open ON fc.points_lots USING btree (account_id, expires_at, id) WHERE (remaining > 0);

-- index: fc.reconciliation_breaks_by_day
CREATE INDEX reconciliation_breaks_by_day ON fc.reconciliation_breaks USING btree (channel, business_date);

-- index: fc.reconciliation_breaks_by_txn
CREATE INDEX reconciliation_breaks_by_txn ON fc.reconciliation_breaks USING btree (channel, record_kind, channel_txn_id) WHERE (resolved_at IS NULL);

-- index: fc.reconciliation_breaks_open
CREATE INDEX reconciliation_breaks_open ON fc.reconciliation_breaks USING btree (id DESC) WHERE (resolved_at IS NULL);

-- index: fc.refunds_by_recharge
CREATE INDEX refunds_by_recharge ON fc.refunds USING btree (recharge_id);

-- index: fc.settlement_records_by_day
CREATE INDEX settlement_records_by_day ON fc.settlement_records USING btree (channel, business_date);

-- index: fc.step_up_challenges_age
-- Step-up challenges
CREATE INDEX step_up_challenges_age ON fc.step_up_challenges USING btree (created_at);

-- index: fc.step_up_challenges_subject
CREATE INDEX step_up_challenges_subject ON fc.step_up_challenges USING btree (subject, created_at);

-- foreign key: fc.account_holders account_holders_account_id_fkey
ALTER TABLE ONLY fc.account_holders
    ADD CONSTRAINT account_holders_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.accounts accounts_parent_id_fkey
ALTER TABLE ONLY fc.accounts
    ADD CONSTRAINT accounts_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES fc.accounts(id);

-- foreign key: fc.card_pins card_pins_card_id_fkey
ALTER TABLE ONLY fc.card_pins
    ADD CONSTRAINT card_pins_card_id_fkey FOREIGN KEY (card_id) REFERENCES fc.cards(id);

-- foreign key: fc.cards cards_account_id_fkey
ALTER TABLE ONLY fc.cards
    ADD CONSTRAINT cards_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.channel_exceptions channel_exceptions_account_id_fkey
ALTER TABLE ONLY fc.channel_exceptions
    ADD CONSTRAINT channel_exceptions_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.channel_exceptions channel_exceptions_refund_id_fkey
ALTER TABLE ONLY fc.channel_exceptions
    ADD CONSTRAINT channel_exceptions_refund_id_fkey FOREIGN KEY (refund_id) REFERENCES fc.refunds(id);

-- foreign key: fc.control_changes control_changes_account_id_fkey
ALTER TABLE ONLY fc.control_changes
    ADD CONSTRAINT control_changes_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.control_changes control_changes_actor_account_id_fkey
ALTER TABLE ONLY fc.control_changes
    ADD CONSTRAINT control_changes_actor_account_id_fkey FOREIGN KEY (actor_account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.control_changes control_changes_card_id_fkey
ALTER TABLE ONLY fc.control_changes
    ADD CONSTRAINT control_changes_card_id_fkey FOREIGN KEY (card_id) REFERENCES fc.cards(id);

-- foreign key: fc.holds holds_account_id_fkey
ALTER TABLE ONLY fc.holds
    ADD CONSTRAINT holds_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.holds holds_card_id_fkey
ALTER TABLE ONLY fc.holds
    ADD CONSTRAINT holds_card_id_fkey FOREIGN KEY (card_id) REFERENCES fc.cards(id);

-- foreign key: fc.holds holds_spender_account_id_fkey
ALTER TABLE ONLY fc.holds
    ADD CONSTRAINT holds_spender_account_id_fkey FOREIGN KEY (spender_account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.limit_raises limit_raises_account_id_fkey
ALTER TABLE ONLY fc.limit_raises
    ADD CONSTRAINT limit_raises_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.limit_raises limit_raises_card_id_fkey
ALTER TABLE ONLY fc.limit_raises
    ADD CONSTRAINT limit_raises_card_id_fkey FOREIGN KEY (card_id) REFERENCES fc.cards(id);

-- foreign key: fc.monthly_spend monthly_spend_account_id_fkey
ALTER TABLE ONLY fc.monthly_spend
    ADD CONSTRAINT monthly_spend_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.points_lots points_lots_account_id_fkey
ALTER TABLE ONLY fc.points_lots
    ADD CONSTRAINT points_lots_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.recharges recharges_account_id_fkey
ALTER TABLE ONLY fc.recharges
    ADD CONSTRAINT recharges_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.reconciliation_breaks reconciliation_breaks_run_id_fkey
ALTER TABLE ONLY fc.reconciliation_breaks
    ADD CONSTRAINT reconciliation_breaks_run_id_fkey FOREIGN KEY (run_id) REFERENCES fc.reconciliation_runs(id);

-- foreign key: fc.refunds refunds_account_id_fkey
ALTER TABLE ONLY fc.refunds
    ADD CONSTRAINT refunds_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.refunds refunds_recharge_id_fkey
ALTER TABLE ONLY fc.refunds
    ADD CONSTRAINT refunds_recharge_id_fkey FOREIGN KEY (recharge_id) REFERENCES fc.recharges(id);

-- foreign key: fc.risk_active risk_active_rule_set_id_fkey
ALTER TABLE ONLY fc.risk_active
    ADD CONSTRAINT risk_active_rule_set_id_fkey FOREIGN KEY (rule_set_id) REFERENCES fc.risk_rule_sets(id);

-- foreign key: fc.risk_card_state risk_card_state_card_id_fkey
ALTER TABLE ONLY fc.risk_card_state
    ADD CONSTRAINT risk_card_state_card_id_fkey FOREIGN KEY (card_id) REFERENCES fc.cards(id);

-- foreign key: fc.risk_rule_changes risk_rule_changes_previous_id_fkey
ALTER TABLE ONLY fc.risk_rule_changes
    ADD CONSTRAINT risk_rule_changes_previous_id_fkey FOREIGN KEY (previous_id) REFERENCES fc.risk_rule_sets(id);

-- foreign key: fc.risk_rule_changes risk_rule_changes_rule_set_id_fkey
ALTER TABLE ONLY fc.risk_rule_changes
    ADD CONSTRAINT risk_rule_changes_rule_set_id_fkey FOREIGN KEY (rule_set_id) REFERENCES fc.risk_rule_sets(id);

-- foreign key: fc.risk_rules risk_rules_rule_set_id_fkey
ALTER TABLE ONLY fc.risk_rules
    ADD CONSTRAINT risk_rules_rule_set_id_fkey FOREIGN KEY (rule_set_id) REFERENCES fc.risk_rule_sets(id);

-- foreign key: fc.settlement_exceptions settlement_exceptions_account_id_fkey
ALTER TABLE ONLY fc.settlement_exceptions
    ADD CONSTRAINT settlement_exceptions_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- foreign key: fc.settlement_exceptions settlement_exceptions_hold_id_fkey
ALTER TABLE ONLY fc.settlement_exceptions
    ADD CONSTRAINT settlement_exceptions_hold_id_fkey FOREIGN KEY (hold_id) REFERENCES fc.holds(id);

-- foreign key: fc.tier_changes tier_changes_account_id_fkey
ALTER TABLE ONLY fc.tier_changes
    ADD CONSTRAINT tier_changes_account_id_fkey FOREIGN KEY (account_id) REFERENCES fc.accounts(id);

-- privileges: SCHEMA fc_pan_seg1
GRANT USAGE ON SCHEMA fc_pan_seg1 TO CURRENT_USER;

-- privileges: SCHEMA fc_pan_seg2
GRANT USAGE ON SCHEMA fc_pan_seg2 TO CURRENT_USER;

-- privileges: SCHEMA fc_pan_seg3
GRANT USAGE ON SCHEMA fc_pan_seg3 TO CURRENT_USER;

-- privileges: SCHEMA fc_pan_vault
GRANT USAGE ON SCHEMA fc_pan_vault TO CURRENT_USER;

------------------------------------------------------------------------------
-- Reference data
------------------------------------------------------------------------------

-- The system accounts every movement balances against.
INSERT INTO fc.accounts (kind, system_code, created_at) VALUES
    (100, 'FUEL_SALES', now()),               -- revenue from confirmed sales
    (100, 'CHANNEL_CLEARING_BANK_CARD', now()),
    (100, 'CHANNEL_CLEARING_WECHAT_PAY', now()),
    (100, 'CHANNEL_CLEARING_ALIPAY', now()),
    (100, 'CHANNEL_CLEARING_ECNY', now()),
    (100, 'CHANNEL_CLEARING_COUNTER', now()),
    (100, 'POINTS_ISSUED', now()),            -- source of earned points
    (100, 'POINTS_REDEEMED', now()),
    (100, 'POINTS_EXPIRED', now());

INSERT INTO fc.config VALUES
    ('business_time_zone', 'Asia/Shanghai'),
    ('points_validity_months', '24'),
    ('tier_window_months', '12'),
    ('pin_max_attempts', '3');

INSERT INTO fc.tier_rules VALUES
    (1, 0, 1000),            -- 普通 regular
    (2, 500000, 1200),       -- 银牌 silver: 5 000 yuan a year
    (3, 2000000, 1500),      -- 金牌 gold: 20 000 yuan
    (4, 5000000, 2000);

INSERT INTO fc.event_head DEFAULT VALUES;

-- Nothing on a new database predates the event stream: every source's backfill is done.
INSERT INTO fc.event_backfill (source, through_id) VALUES (1, 0), (3, 0), (4, 0), (5, 0), (6, 0);
