-- 0002: account hierarchy (fleets, families), spending limits with usage
-- counters, scope of use and geo-fences, stations, tiers, points lots with
-- expiry, and the record of who changed which control.
--
-- Lock order, extended: a movement on a sub-account locks its parent first,
-- then the sub-account. parent_id < id always holds (a parent exists before
-- its children), so "parent first" is "ascending account id" and agrees with
-- every other function: no two transactions can wait on each other in a cycle.

-- Business time zone: days and months of the limits, hours of the scopes.
CREATE TABLE fc.config (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO fc.config VALUES
    ('business_time_zone', 'Asia/Shanghai'),
    ('points_validity_months', '24'),
    ('tier_window_months', '12');

CREATE FUNCTION fc.business_tz() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT value FROM fc.config WHERE key = 'business_time_zone' $$;

-- Fleets and families: a top-level account with sub-accounts one level deep.
-- Funding modes: 0 own (top-level), 1 ALLOCATED (own balance, funded by the
-- parent), 2 SHARED (spends the parent's balance within its own limits).
ALTER TABLE fc.accounts
    ADD COLUMN parent_id         bigint REFERENCES fc.accounts (id),
    ADD COLUMN funding_mode      smallint NOT NULL DEFAULT 0 CHECK (funding_mode IN (0, 1, 2)),
    ADD COLUMN label             text     NOT NULL DEFAULT '',
    ADD COLUMN limit_txn_fen     bigint CHECK (limit_txn_fen > 0),
    ADD COLUMN limit_daily_fen   bigint CHECK (limit_daily_fen > 0),
    ADD COLUMN limit_monthly_fen bigint CHECK (limit_monthly_fen > 0),
    ADD CONSTRAINT sub_accounts_have_a_mode CHECK ((parent_id IS NULL) = (funding_mode = 0)),
    ADD CONSTRAINT parent_locks_first CHECK (parent_id IS NULL OR parent_id < id),
    -- A SHARED sub-account's money lives on its parent.
    ADD CONSTRAINT shared_holds_no_money
        CHECK (funding_mode <> 2 OR (balance_fen = 0 AND held_fen = 0));
CREATE INDEX accounts_children ON fc.accounts (parent_id) WHERE parent_id IS NOT NULL;

-- Scope of use, kept in columns the authorize path reads directly. NULL means
-- no restriction of that kind. Hours are pairs of minutes after local
-- midnight: {start1, end1, start2, end2, ...}.
ALTER TABLE fc.cards
    ADD COLUMN limit_txn_fen     bigint CHECK (limit_txn_fen > 0),
    ADD COLUMN limit_daily_fen   bigint CHECK (limit_daily_fen > 0),
    ADD COLUMN limit_monthly_fen bigint CHECK (limit_monthly_fen > 0),
    ADD COLUMN scope_stations    text[],
    ADD COLUMN scope_products    smallint[],
    ADD COLUMN scope_fences      jsonb,
    ADD COLUMN scope_hours       integer[];

CREATE TABLE fc.stations (
    station_id text PRIMARY KEY,
    name       text             NOT NULL,
    latitude   double precision NOT NULL CHECK (latitude BETWEEN -90 AND 90),
    longitude  double precision NOT NULL CHECK (longitude BETWEEN -180 AND 180)
);

-- Temporary limit raises (假期临时提额): the caps in force inside a window.
CREATE TABLE fc.limit_raises (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid               uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    card_id           bigint REFERENCES fc.cards (id),
    account_id        bigint REFERENCES fc.accounts (id),
    limit_txn_fen     bigint CHECK (limit_txn_fen > 0),
    limit_daily_fen   bigint CHECK (limit_daily_fen > 0),
    limit_monthly_fen bigint CHECK (limit_monthly_fen > 0),
    starts_at         timestamptz NOT NULL,
    ends_at           timestamptz NOT NULL,
    CONSTRAINT one_target CHECK ((card_id IS NULL) <> (account_id IS NULL)),
    CONSTRAINT window_forward CHECK (ends_at > starts_at)
);
CREATE INDEX limit_raises_card ON fc.limit_raises (card_id, ends_at) WHERE card_id IS NOT NULL;
CREATE INDEX limit_raises_account ON fc.limit_raises (account_id, ends_at)
    WHERE account_id IS NOT NULL;

-- Who changed which control, when, to what.
CREATE TABLE fc.control_changes (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor_account_id bigint      NOT NULL REFERENCES fc.accounts (id),
    kind             text        NOT NULL CHECK (kind IN ('limits', 'raise', 'scope')),
    card_id          bigint REFERENCES fc.cards (id),
    account_id       bigint      NOT NULL REFERENCES fc.accounts (id),
    details          jsonb       NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX control_changes_account ON fc.control_changes (account_id, id DESC);
CREATE TRIGGER control_changes_append_only BEFORE UPDATE OR DELETE ON fc.control_changes
    FOR EACH ROW EXECUTE FUNCTION fc.refuse_change();

-- Holds remember who spent (the card's account) besides whose money is
-- reserved (account_id: the parent for SHARED sub-accounts), and the local
-- day whose usage counters they charged.
ALTER TABLE fc.holds
    ADD COLUMN spender_account_id bigint REFERENCES fc.accounts (id),
    ADD COLUMN usage_day date;
UPDATE fc.holds SET spender_account_id = account_id,
                    usage_day = (created_at AT TIME ZONE fc.business_tz())::date;
ALTER TABLE fc.holds ALTER COLUMN spender_account_id SET NOT NULL,
                     ALTER COLUMN usage_day SET NOT NULL;
CREATE INDEX holds_by_spender ON fc.holds (spender_account_id, id DESC);

-- Spending per local day, per card and per account (the spender, and the
-- spender's parent). A hold charges its amount while AUTHORIZED, its settled
-- amount once CONFIRMED, nothing once released. Months are sums of days.
-- Kinds: 1 card, 2 account.
CREATE TABLE fc.usage (
    scope_kind smallint NOT NULL CHECK (scope_kind IN (1, 2)),
    scope_id   bigint   NOT NULL,
    day        date     NOT NULL,
    amount_fen bigint   NOT NULL CHECK (amount_fen >= 0),
    PRIMARY KEY (scope_kind, scope_id, day)
);

-- Member tiers: thresholds on the rolling confirmed spend, and the points
-- multiplier of each (in per mille: 1000 = x1.0).
CREATE TABLE fc.tier_rules (
    tier             smallint PRIMARY KEY CHECK (tier BETWEEN 1 AND 4),
    min_spend_fen    bigint   NOT NULL CHECK (min_spend_fen >= 0),
    multiplier_permille integer NOT NULL CHECK (multiplier_permille BETWEEN 0 AND 100000)
);
INSERT INTO fc.tier_rules VALUES
    (1, 0, 1000),            -- 普通 regular
    (2, 500000, 1200),       -- 银牌 silver: 5 000 yuan a year
    (3, 2000000, 1500),      -- 金牌 gold: 20 000 yuan
    (4, 5000000, 2000);      -- 钻石 diamond: 50 000 yuan

CREATE TABLE fc.monthly_spend (
    account_id bigint NOT NULL REFERENCES fc.accounts (id),
    month      date   NOT NULL,
    spend_fen  bigint NOT NULL CHECK (spend_fen >= 0),
    PRIMARY KEY (account_id, month)
);

CREATE TABLE fc.tier_changes (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint      NOT NULL REFERENCES fc.accounts (id),
    from_tier  smallint    NOT NULL,
    to_tier    smallint    NOT NULL,
    spend_fen  bigint      NOT NULL,
    created_at timestamptz NOT NULL
);

-- Points lots: every earning is a lot that expires; spending takes the oldest
-- first. An account's points balance is the sum of its lots' remainders.
CREATE TABLE fc.points_lots (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint      NOT NULL REFERENCES fc.accounts (id),
    points     bigint      NOT NULL CHECK (points > 0),
    remaining  bigint      NOT NULL CHECK (remaining BETWEEN 0 AND points),
    earned_at  timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX points_lots_open ON fc.points_lots (account_id, expires_at, id) WHERE remaining > 0;
CREATE INDEX points_lots_expiring ON fc.points_lots (expires_at) WHERE remaining > 0;

INSERT INTO fc.accounts (kind, system_code, created_at) VALUES (100, 'POINTS_EXPIRED', now());

-- Journal kinds, extended: 5 allocation (parent to sub-account money),
-- 6 points transfer (member to main account), 7 points expired.
ALTER TABLE fc.journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE fc.journal ADD CONSTRAINT journal_kind_check CHECK (kind BETWEEN 1 AND 7);

-- Points earned before lots existed become one lot each, valid from now.
INSERT INTO fc.points_lots (account_id, points, remaining, earned_at, expires_at)
SELECT id, points_balance, points_balance, now(), now() + interval '24 months'
  FROM fc.accounts WHERE kind <> 100 AND points_balance > 0;

------------------------------------------------------------------------------
-- Pure helpers: geo-fences, hours, limits.
------------------------------------------------------------------------------

-- Great-circle distance in metres (haversine; the earth as a sphere is
-- accurate to ~0.5 %, far inside any fence a fleet manager draws).
CREATE FUNCTION fc.distance_m(lat1 double precision, lon1 double precision,
                              lat2 double precision, lon2 double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 2 * 6371008.8 * asin(sqrt(
        power(sin(radians(lat2 - lat1) / 2), 2)
        + cos(radians(lat1)) * cos(radians(lat2)) * power(sin(radians(lon2 - lon1) / 2), 2)))
$$;

-- Ray casting on the plane of latitude/longitude: fine for city- and
-- province-sized fences that do not cross the antimeridian.
CREATE FUNCTION fc.in_polygon(p_vertices jsonb, lat double precision, lon double precision)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    n      integer := jsonb_array_length(p_vertices);
    inside boolean := false;
    i      integer;
    j      integer := n - 1;
    yi double precision; xi double precision; yj double precision; xj double precision;
BEGIN
    FOR i IN 0 .. n - 1 LOOP
        yi := (p_vertices -> i ->> 0)::double precision;
        xi := (p_vertices -> i ->> 1)::double precision;
        yj := (p_vertices -> j ->> 0)::double precision;
        xj := (p_vertices -> j ->> 1)::double precision;
        IF ((yi > lat) <> (yj > lat)) AND (lon < (xj - xi) * (lat - yi) / (yj - yi) + xi) THEN
            inside := NOT inside;
        END IF;
        j := i;
    END LOOP;
    RETURN inside;
END $$;

-- Fences are a jsonb array of {"circle": [lat, lon, radius_m]} or
-- {"polygon": [[lat, lon], ...]}; a station inside any one is inside.
CREATE FUNCTION fc.in_fences(p_fences jsonb, lat double precision, lon double precision)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    f jsonb;
BEGIN
    FOR f IN SELECT * FROM jsonb_array_elements(p_fences) LOOP
        IF f ? 'circle' THEN
            IF fc.distance_m(lat, lon, (f -> 'circle' ->> 0)::double precision,
                             (f -> 'circle' ->> 1)::double precision)
               <= (f -> 'circle' ->> 2)::double precision THEN
                RETURN true;
            END IF;
        ELSIF fc.in_polygon(f -> 'polygon', lat, lon) THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END $$;

-- Hours are pairs {start, end} of minutes after local midnight; end < start
-- wraps past midnight.
CREATE FUNCTION fc.in_hours(p_hours integer[], p_minute integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM generate_subscripts(p_hours, 1) AS i
         WHERE i % 2 = 1
           AND CASE WHEN p_hours[i] <= p_hours[i + 1]
                    THEN p_minute >= p_hours[i] AND p_minute < p_hours[i + 1]
                    ELSE p_minute >= p_hours[i] OR p_minute < p_hours[i + 1] END)
$$;

-- Why a card may not buy here and now, or NULL if it may.
CREATE FUNCTION fc.scope_refusal(c fc.cards, p_station_id text, p_product smallint,
                                 p_local timestamp)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_lat double precision;
    v_lon double precision;
BEGIN
    IF c.scope_stations IS NOT NULL AND NOT (p_station_id = ANY (c.scope_stations)) THEN
        RETURN 'STATION_NOT_ALLOWED';
    END IF;
    IF c.scope_products IS NOT NULL AND NOT (p_product = ANY (c.scope_products)) THEN
        RETURN 'PRODUCT_NOT_ALLOWED';
    END IF;
    IF c.scope_fences IS NOT NULL THEN
        SELECT latitude, longitude INTO v_lat, v_lon FROM fc.stations WHERE station_id = p_station_id;
        -- A station we cannot place cannot be shown to be inside the fence.
        IF NOT FOUND OR NOT fc.in_fences(c.scope_fences, v_lat, v_lon) THEN
            RETURN 'OUTSIDE_GEOFENCE';
        END IF;
    END IF;
    IF c.scope_hours IS NOT NULL
       AND NOT fc.in_hours(c.scope_hours,
                           (extract(hour FROM p_local) * 60 + extract(minute FROM p_local))::integer) THEN
        RETURN 'OUTSIDE_HOURS';
    END IF;
    RETURN NULL;
END $$;

-- The caps in force at p_now: a raise whose window covers p_now replaces the
-- standing caps. If windows overlap the largest caps win, each kind on its own
-- (no cap, NULL, is the largest), until the last of them ends.
CREATE TYPE fc.caps AS (txn bigint, daily bigint, monthly bigint, raise_ends timestamptz);

CREATE FUNCTION fc.largest_cap(p_caps bigint[]) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN array_position(p_caps, NULL) IS NULL
                THEN (SELECT max(x) FROM unnest(p_caps) x) END
$$;

CREATE FUNCTION fc.card_caps(c fc.cards, p_now timestamptz) RETURNS fc.caps
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT ROW(fc.largest_cap(array_agg(r.limit_txn_fen)),
                    fc.largest_cap(array_agg(r.limit_daily_fen)),
                    fc.largest_cap(array_agg(r.limit_monthly_fen)), max(r.ends_at))::fc.caps
           FROM fc.limit_raises r
          WHERE r.card_id = c.id AND r.starts_at <= p_now AND r.ends_at > p_now
         HAVING count(*) > 0),
        ROW(c.limit_txn_fen, c.limit_daily_fen, c.limit_monthly_fen, NULL)::fc.caps)
$$;

CREATE FUNCTION fc.account_caps(a fc.accounts, p_now timestamptz) RETURNS fc.caps
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT ROW(fc.largest_cap(array_agg(r.limit_txn_fen)),
                    fc.largest_cap(array_agg(r.limit_daily_fen)),
                    fc.largest_cap(array_agg(r.limit_monthly_fen)), max(r.ends_at))::fc.caps
           FROM fc.limit_raises r
          WHERE r.account_id = a.id AND r.starts_at <= p_now AND r.ends_at > p_now
         HAVING count(*) > 0),
        ROW(a.limit_txn_fen, a.limit_daily_fen, a.limit_monthly_fen, NULL)::fc.caps)
$$;

CREATE FUNCTION fc.used_on(p_kind smallint, p_id bigint, p_day date) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT amount_fen FROM fc.usage
                      WHERE scope_kind = p_kind AND scope_id = p_id AND day = p_day), 0)
$$;

CREATE FUNCTION fc.used_in_month(p_kind smallint, p_id bigint, p_day date) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(amount_fen), 0) FROM fc.usage
     WHERE scope_kind = p_kind AND scope_id = p_id
       AND day >= date_trunc('month', p_day)::date AND day <= p_day
$$;

-- Which cap, if any, `p_amount` more would break. Holds charge the day they
-- were made; a month is the sum of its days so far.
CREATE FUNCTION fc.cap_refusal(p_caps fc.caps, p_kind smallint, p_id bigint, p_day date,
                               p_amount bigint)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_caps.txn IS NOT NULL AND p_amount > p_caps.txn THEN
        RETURN 'LIMIT_PER_TRANSACTION';
    END IF;
    IF p_caps.daily IS NOT NULL AND fc.used_on(p_kind, p_id, p_day) + p_amount > p_caps.daily THEN
        RETURN 'LIMIT_DAILY';
    END IF;
    IF p_caps.monthly IS NOT NULL
       AND fc.used_in_month(p_kind, p_id, p_day) + p_amount > p_caps.monthly THEN
        RETURN 'LIMIT_MONTHLY';
    END IF;
    RETURN NULL;
END $$;

-- Adds delta (may be negative) to the usage of a card, its account and that
-- account's parent on one day. Callers hold the chain's locks.
CREATE FUNCTION fc.charge_usage(p_card_id bigint, p_spender_id bigint, p_parent_id bigint,
                                p_day date, p_delta bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_rows integer;
BEGIN
    IF p_delta > 0 THEN
        INSERT INTO fc.usage (scope_kind, scope_id, day, amount_fen)
        SELECT kind, id, p_day, p_delta
          FROM (VALUES (1::smallint, p_card_id), (2::smallint, p_spender_id),
                       (2::smallint, p_parent_id)) scopes (kind, id)
         WHERE id IS NOT NULL
        ON CONFLICT (scope_kind, scope_id, day)
        DO UPDATE SET amount_fen = fc.usage.amount_fen + excluded.amount_fen;
    ELSIF p_delta < 0 THEN
        -- Giving back what a hold charged: the counters exist (the CHECK on a
        -- speculative INSERT would refuse a negative row before any conflict).
        UPDATE fc.usage SET amount_fen = amount_fen + p_delta
         WHERE day = p_day
           AND ((scope_kind = 1 AND scope_id = p_card_id)
             OR (scope_kind = 2 AND scope_id IN (p_spender_id, p_parent_id)));
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        IF v_rows <> (CASE WHEN p_parent_id IS NULL THEN 2 ELSE 3 END) THEN
            RAISE EXCEPTION 'usage counters missing for card % on %', p_card_id, p_day;
        END IF;
    END IF;
END $$;

-- Takes the advisory locks of an account and its parent, parent first (the
-- documented order), and returns the parent's id or NULL.
CREATE FUNCTION fc.lock_chain(p_account_id bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_parent bigint;
BEGIN
    SELECT parent_id INTO v_parent FROM fc.accounts WHERE id = p_account_id;
    IF v_parent IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(v_parent);
    END IF;
    PERFORM pg_advisory_xact_lock(p_account_id);
    RETURN v_parent;
END $$;

------------------------------------------------------------------------------
-- Tiers and points lots.
------------------------------------------------------------------------------

-- Points for a settled amount: one per whole yuan, times the tier multiplier.
CREATE OR REPLACE FUNCTION fc.points_for(p_amount_fen bigint, p_tier smallint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (p_amount_fen / 100) * multiplier_permille / 1000
      FROM fc.tier_rules WHERE tier = p_tier
$$;

-- Re-evaluates an account's tier from its confirmed spend over the rolling
-- window ending with p_now's month; records a change. Caller holds the lock.
CREATE FUNCTION fc.evaluate_tier(p_account_id bigint, p_now timestamptz) RETURNS smallint
LANGUAGE plpgsql AS $$
DECLARE
    v_month  date := date_trunc('month', p_now AT TIME ZONE fc.business_tz())::date;
    v_window integer := (SELECT value::integer FROM fc.config WHERE key = 'tier_window_months');
    v_spend  bigint;
    v_old    smallint;
    v_new    smallint;
BEGIN
    SELECT coalesce(sum(spend_fen), 0) INTO v_spend FROM fc.monthly_spend
     WHERE account_id = p_account_id
       AND month > (v_month - make_interval(months => v_window))::date AND month <= v_month;
    SELECT tier INTO v_new FROM fc.tier_rules WHERE min_spend_fen <= v_spend
     ORDER BY min_spend_fen DESC LIMIT 1;
    SELECT tier INTO v_old FROM fc.accounts WHERE id = p_account_id;
    IF v_new IS DISTINCT FROM v_old THEN
        UPDATE fc.accounts SET tier = v_new WHERE id = p_account_id;
        INSERT INTO fc.tier_changes (account_id, from_tier, to_tier, spend_fen, created_at)
        VALUES (p_account_id, v_old, v_new, v_spend, p_now);
    END IF;
    RETURN v_new;
END $$;

-- Daily job: tiers fall when old months leave the window even if the account
-- buys nothing. Returns the number of accounts whose tier changed.
CREATE FUNCTION fc.evaluate_tiers(p_now timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_account bigint;
    v_before  bigint := (SELECT count(*) FROM fc.tier_changes);
BEGIN
    FOR v_account IN SELECT id FROM fc.accounts WHERE kind <> 100 AND tier > 1 ORDER BY id LOOP
        PERFORM fc.lock_chain(v_account);
        PERFORM fc.evaluate_tier(v_account, p_now);
    END LOOP;
    RETURN (SELECT count(*) FROM fc.tier_changes) - v_before;
END $$;

-- Takes p_points from an account's open lots, oldest first; returns the
-- consumed (expires_at, points) pairs so a transfer can keep their expiry.
CREATE FUNCTION fc.take_points(p_account_id bigint, p_points bigint)
RETURNS TABLE (expires_at timestamptz, points bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_lot  fc.points_lots;
    v_left bigint := p_points;
    v_take bigint;
BEGIN
    FOR v_lot IN SELECT * FROM fc.points_lots l
                  WHERE l.account_id = p_account_id AND l.remaining > 0
                  ORDER BY l.expires_at, l.id LOOP
        EXIT WHEN v_left = 0;
        v_take := least(v_left, v_lot.remaining);
        UPDATE fc.points_lots SET remaining = remaining - v_take WHERE id = v_lot.id;
        v_left := v_left - v_take;
        expires_at := v_lot.expires_at;
        points := v_take;
        RETURN NEXT;
    END LOOP;
    IF v_left <> 0 THEN
        RAISE EXCEPTION 'points lots of account % short by %', p_account_id, v_left;
    END IF;
END $$;

-- Job: lots past their expiry lapse. Idempotent: a lapsed lot has nothing
-- left to lapse. Returns the number of lots that lapsed.
CREATE FUNCTION fc.expire_points(p_now timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_account bigint;
    v_points  bigint;
    v_lots    integer;
    v_total   integer := 0;
BEGIN
    FOR v_account IN
        SELECT DISTINCT account_id FROM (
            SELECT account_id FROM fc.points_lots
             WHERE remaining > 0 AND expires_at <= p_now ORDER BY expires_at LIMIT p_limit) due
        ORDER BY account_id
    LOOP
        PERFORM fc.lock_chain(v_account);
        SELECT count(*), coalesce(sum(remaining), 0) INTO v_lots, v_points FROM fc.points_lots
         WHERE account_id = v_account AND remaining > 0 AND expires_at <= p_now;
        UPDATE fc.points_lots SET remaining = 0
         WHERE account_id = v_account AND remaining > 0 AND expires_at <= p_now;
        IF v_points > 0 THEN
            INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,
                                    description, created_at)
            VALUES (7, 2, v_account, fc.system_account('POINTS_EXPIRED'), v_points,
                    'points expired', p_now);
            UPDATE fc.accounts SET points_balance = points_balance - v_points WHERE id = v_account;
        END IF;
        v_total := v_total + v_lots;
    END LOOP;
    RETURN v_total;
END $$;

------------------------------------------------------------------------------
-- Controls: who may change what, and the changes.
------------------------------------------------------------------------------

-- An account's limits and scope are set by its parent; a top-level account
-- sets its own. A sub-account never sets its own: it cannot raise its caps.
CREATE FUNCTION fc.require_controller(p_actor_uid uuid, p_target fc.accounts) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_actor bigint;
BEGIN
    SELECT id INTO v_actor FROM fc.accounts WHERE uid = p_actor_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'actor_account_id';
    END IF;
    IF p_target.parent_id IS DISTINCT FROM v_actor
       AND NOT (p_target.parent_id IS NULL AND p_target.id = v_actor) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'NOT_THE_CONTROLLING_ACCOUNT',
            DETAIL = 'actor_account_id';
    END IF;
    RETURN v_actor;
END $$;

-- Resolves a card-or-account target to (card row or NULL, account row).
CREATE FUNCTION fc.resolve_target(p_card_uid uuid, p_account_uid uuid,
                                  OUT o_card fc.cards, OUT o_account fc.accounts)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_card_uid IS NOT NULL THEN
        SELECT * INTO o_card FROM fc.cards WHERE uid = p_card_uid;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'CARD_NOT_FOUND', DETAIL = 'card_id';
        END IF;
        SELECT * INTO o_account FROM fc.accounts WHERE id = o_card.account_id;
    ELSE
        SELECT * INTO o_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> 100;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
                DETAIL = 'account_id';
        END IF;
    END IF;
END $$;

CREATE FUNCTION fc.set_limits(
    p_caller text, p_request_id text, p_request_hash bytea, p_actor_uid uuid,
    p_card_uid uuid, p_account_uid uuid, p_txn bigint, p_daily bigint, p_monthly bigint,
    p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_target   record;
    v_actor    bigint;
    v_limits   jsonb := jsonb_build_object('per_transaction_fen', p_txn, 'daily_fen', p_daily,
                                           'monthly_fen', p_monthly);
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    v_target := fc.resolve_target(p_card_uid, p_account_uid);
    v_actor := fc.require_controller(p_actor_uid, v_target.o_account);
    PERFORM fc.lock_chain((v_target.o_account).id);
    IF p_card_uid IS NOT NULL THEN
        UPDATE fc.cards SET limit_txn_fen = nullif(p_txn, 0), limit_daily_fen = nullif(p_daily, 0),
                            limit_monthly_fen = nullif(p_monthly, 0)
         WHERE id = (v_target.o_card).id;
    ELSE
        UPDATE fc.accounts SET limit_txn_fen = nullif(p_txn, 0),
                               limit_daily_fen = nullif(p_daily, 0),
                               limit_monthly_fen = nullif(p_monthly, 0)
         WHERE id = (v_target.o_account).id;
    END IF;
    INSERT INTO fc.control_changes (actor_account_id, kind, card_id, account_id, details, created_at)
    VALUES (v_actor, 'limits', (v_target.o_card).id, (v_target.o_account).id, v_limits, p_now);
    RETURN fc.remember(p_caller, p_request_id, 'set_limits', p_request_hash,
                       jsonb_build_object('limits', v_limits), p_now);
END $$;

CREATE FUNCTION fc.grant_raise(
    p_caller text, p_request_id text, p_request_hash bytea, p_actor_uid uuid,
    p_card_uid uuid, p_account_uid uuid, p_txn bigint, p_daily bigint, p_monthly bigint,
    p_starts timestamptz, p_ends timestamptz, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_target   record;
    v_actor    bigint;
    v_raise    uuid;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    v_target := fc.resolve_target(p_card_uid, p_account_uid);
    v_actor := fc.require_controller(p_actor_uid, v_target.o_account);
    PERFORM fc.lock_chain((v_target.o_account).id);
    INSERT INTO fc.limit_raises (card_id, account_id, limit_txn_fen, limit_daily_fen,
                                 limit_monthly_fen, starts_at, ends_at)
    VALUES ((v_target.o_card).id,
            CASE WHEN p_card_uid IS NULL THEN (v_target.o_account).id END,
            nullif(p_txn, 0), nullif(p_daily, 0), nullif(p_monthly, 0), p_starts, p_ends)
    RETURNING uid INTO v_raise;
    INSERT INTO fc.control_changes (actor_account_id, kind, card_id, account_id, details, created_at)
    VALUES (v_actor, 'raise', (v_target.o_card).id, (v_target.o_account).id,
            jsonb_build_object('per_transaction_fen', p_txn, 'daily_fen', p_daily,
                               'monthly_fen', p_monthly, 'start_us', fc.ts(p_starts),
                               'end_us', fc.ts(p_ends)), p_now);
    RETURN fc.remember(p_caller, p_request_id, 'grant_raise', p_request_hash,
                       jsonb_build_object('raise_id', v_raise), p_now);
END $$;

CREATE FUNCTION fc.set_scope(
    p_caller text, p_request_id text, p_request_hash bytea, p_actor_uid uuid, p_card_uid uuid,
    p_stations text[], p_products smallint[], p_fences jsonb, p_hours integer[],
    p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_target   record;
    v_actor    bigint;
    v_scope    jsonb := jsonb_build_object('station_ids', p_stations, 'products', p_products,
                                          'fences', p_fences, 'hours', p_hours);
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    v_target := fc.resolve_target(p_card_uid, NULL);
    v_actor := fc.require_controller(p_actor_uid, v_target.o_account);
    PERFORM fc.lock_chain((v_target.o_account).id);
    UPDATE fc.cards SET scope_stations = p_stations, scope_products = p_products,
                        scope_fences = p_fences, scope_hours = p_hours
     WHERE id = (v_target.o_card).id;
    INSERT INTO fc.control_changes (actor_account_id, kind, card_id, account_id, details, created_at)
    VALUES (v_actor, 'scope', (v_target.o_card).id, (v_target.o_account).id, v_scope, p_now);
    RETURN fc.remember(p_caller, p_request_id, 'set_scope', p_request_hash,
                       jsonb_build_object('scope', v_scope), p_now);
END $$;

------------------------------------------------------------------------------
-- Batch top-up (批量充值) and points pooling (积分合并).
------------------------------------------------------------------------------
CREATE FUNCTION fc.batch_top_up(
    p_caller text, p_request_id text, p_request_hash bytea, p_parent_uid uuid,
    p_lines jsonb, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_parent   fc.accounts;
    v_total    bigint;
    v_bad      text;
    v_line     record;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_parent FROM fc.accounts WHERE uid = p_parent_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'parent_account_id';
    END IF;
    CREATE TEMP TABLE IF NOT EXISTS pg_temp.top_up_lines (
        account_id bigint, funding_mode smallint, parent_id bigint, uid uuid, amount bigint)
        ON COMMIT DROP;
    INSERT INTO pg_temp.top_up_lines
    SELECT a.id, a.funding_mode, a.parent_id, l.uid, l.amount
      FROM jsonb_to_recordset(p_lines) AS l(uid uuid, amount bigint)
      LEFT JOIN fc.accounts a ON a.uid = l.uid AND a.kind <> 100;
    SELECT uid::text INTO v_bad FROM pg_temp.top_up_lines WHERE account_id IS NULL LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'lines.account_id';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_temp.top_up_lines
                WHERE parent_id IS DISTINCT FROM v_parent.id OR funding_mode <> 1) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'NOT_AN_ALLOCATED_SUB_ACCOUNT',
            DETAIL = 'lines.account_id';
    END IF;
    -- Parent first, then its sub-accounts in ascending id: the lock order.
    PERFORM pg_advisory_xact_lock(v_parent.id);
    PERFORM pg_advisory_xact_lock(account_id)
       FROM (SELECT account_id FROM pg_temp.top_up_lines ORDER BY account_id) ordered;
    SELECT * INTO v_parent FROM fc.accounts WHERE id = v_parent.id;
    SELECT sum(amount) INTO v_total FROM pg_temp.top_up_lines;
    IF v_parent.status <> 1 THEN
        v_response := jsonb_build_object('decision', 'DECLINED', 'decline_reason', 'ACCOUNT_FROZEN',
                                         'total_fen', v_total, 'parent_balance_fen', v_parent.balance_fen);
    ELSIF v_parent.balance_fen - v_parent.held_fen < v_total THEN
        v_response := jsonb_build_object('decision', 'DECLINED',
                                         'decline_reason', 'INSUFFICIENT_FUNDS',
                                         'total_fen', v_total, 'parent_balance_fen', v_parent.balance_fen);
    ELSE
        FOR v_line IN SELECT * FROM pg_temp.top_up_lines ORDER BY account_id LOOP
            INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,
                                    description, created_at)
            VALUES (5, 1, v_parent.id, v_line.account_id, v_line.amount, 'batch top-up', p_now);
            UPDATE fc.accounts SET balance_fen = balance_fen + v_line.amount
             WHERE id = v_line.account_id;
        END LOOP;
        UPDATE fc.accounts SET balance_fen = balance_fen - v_total WHERE id = v_parent.id
        RETURNING * INTO v_parent;
        v_response := jsonb_build_object('decision', 'APPROVED', 'total_fen', v_total,
                                         'parent_balance_fen', v_parent.balance_fen);
    END IF;
    DROP TABLE pg_temp.top_up_lines;
    RETURN fc.remember(p_caller, p_request_id, 'batch_top_up', p_request_hash, v_response, p_now);
END $$;

CREATE FUNCTION fc.transfer_points(
    p_caller text, p_request_id text, p_request_hash bytea, p_from_uid uuid, p_to_uid uuid,
    p_points bigint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_from     fc.accounts;
    v_to       fc.accounts;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_from FROM fc.accounts WHERE uid = p_from_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'from_account_id';
    END IF;
    SELECT * INTO v_to FROM fc.accounts WHERE uid = p_to_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'to_account_id';
    END IF;
    IF v_from.parent_id IS DISTINCT FROM v_to.id THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'NOT_THE_PARENT_ACCOUNT',
            DETAIL = 'to_account_id';
    END IF;
    PERFORM fc.lock_chain(v_from.id);
    SELECT * INTO v_from FROM fc.accounts WHERE id = v_from.id;
    IF v_from.points_balance < p_points THEN
        v_response := jsonb_build_object('decision', 'DECLINED',
            'decline_reason', 'INSUFFICIENT_POINTS', 'from_points_balance', v_from.points_balance,
            'to_points_balance', (SELECT points_balance FROM fc.accounts WHERE id = v_to.id));
    ELSE
        -- The points keep their expiry dates on the main account.
        INSERT INTO fc.points_lots (account_id, points, remaining, earned_at, expires_at)
        SELECT v_to.id, t.points, t.points, p_now, t.expires_at
          FROM fc.take_points(v_from.id, p_points) t;
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,
                                description, created_at)
        VALUES (6, 2, v_from.id, v_to.id, p_points, 'points pooled', p_now);
        UPDATE fc.accounts SET points_balance = points_balance - p_points WHERE id = v_from.id
        RETURNING * INTO v_from;
        UPDATE fc.accounts SET points_balance = points_balance + p_points WHERE id = v_to.id
        RETURNING * INTO v_to;
        v_response := jsonb_build_object('decision', 'APPROVED',
            'from_points_balance', v_from.points_balance, 'to_points_balance', v_to.points_balance);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'transfer_points', p_request_hash, v_response, p_now);
END $$;

------------------------------------------------------------------------------
-- Reads of the controls.
------------------------------------------------------------------------------
CREATE FUNCTION fc.get_limits(p_card_uid uuid, p_account_uid uuid, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_target record;
    v_kind   smallint;
    v_id     bigint;
    v_caps   fc.caps;
    v_day    date := (p_now AT TIME ZONE fc.business_tz())::date;
BEGIN
    v_target := fc.resolve_target(p_card_uid, p_account_uid);
    IF p_card_uid IS NOT NULL THEN
        v_kind := 1;
        v_id := (v_target.o_card).id;
        v_caps := fc.card_caps(v_target.o_card, p_now);
        RETURN jsonb_build_object(
            'limits', jsonb_build_object(
                'per_transaction_fen', coalesce((v_target.o_card).limit_txn_fen, 0),
                'daily_fen', coalesce((v_target.o_card).limit_daily_fen, 0),
                'monthly_fen', coalesce((v_target.o_card).limit_monthly_fen, 0)),
            'effective', jsonb_build_object('per_transaction_fen', coalesce(v_caps.txn, 0),
                'daily_fen', coalesce(v_caps.daily, 0), 'monthly_fen', coalesce(v_caps.monthly, 0)),
            'used_today_fen', fc.used_on(v_kind, v_id, v_day),
            'used_this_month_fen', fc.used_in_month(v_kind, v_id, v_day),
            'raise_end_us', fc.ts(v_caps.raise_ends));
    END IF;
    v_kind := 2;
    v_id := (v_target.o_account).id;
    v_caps := fc.account_caps(v_target.o_account, p_now);
    RETURN jsonb_build_object(
        'limits', jsonb_build_object(
            'per_transaction_fen', coalesce((v_target.o_account).limit_txn_fen, 0),
            'daily_fen', coalesce((v_target.o_account).limit_daily_fen, 0),
            'monthly_fen', coalesce((v_target.o_account).limit_monthly_fen, 0)),
        'effective', jsonb_build_object('per_transaction_fen', coalesce(v_caps.txn, 0),
            'daily_fen', coalesce(v_caps.daily, 0), 'monthly_fen', coalesce(v_caps.monthly, 0)),
        'used_today_fen', fc.used_on(v_kind, v_id, v_day),
        'used_this_month_fen', fc.used_in_month(v_kind, v_id, v_day),
        'raise_end_us', fc.ts(v_caps.raise_ends));
END $$;

------------------------------------------------------------------------------
-- The money movements, now aware of the hierarchy, limits, scope, tiers and
-- points lots. They replace the versions of 0001.
------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION fc.release_expired_locked(p_account_id bigint, p_now timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_hold     record;
    v_count    integer := 0;
    v_released bigint := 0;
BEGIN
    FOR v_hold IN
        UPDATE fc.holds h SET state = 4, closed_at = p_now
          FROM fc.accounts s
         WHERE h.account_id = p_account_id AND h.state = 1 AND h.expires_at <= p_now
           AND s.id = h.spender_account_id
        RETURNING h.card_id, h.spender_account_id, s.parent_id, h.usage_day, h.amount_fen
    LOOP
        PERFORM fc.charge_usage(v_hold.card_id, v_hold.spender_account_id, v_hold.parent_id,
                                v_hold.usage_day, -v_hold.amount_fen);
        v_count := v_count + 1;
        v_released := v_released + v_hold.amount_fen;
    END LOOP;
    IF v_released > 0 THEN
        UPDATE fc.accounts SET held_fen = held_fen - v_released WHERE id = p_account_id;
    END IF;
    RETURN v_count;
END $$;

CREATE OR REPLACE FUNCTION fc.expire_holds(p_now timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_account_id bigint;
    v_count      integer := 0;
BEGIN
    -- Ascending account id, each with its parent first: the lock order.
    FOR v_account_id IN
        SELECT DISTINCT account_id FROM (
            SELECT account_id FROM fc.holds
             WHERE state = 1 AND expires_at <= p_now
             ORDER BY expires_at LIMIT p_limit) due
        ORDER BY account_id
    LOOP
        PERFORM fc.lock_chain(v_account_id);
        v_count := v_count + fc.release_expired_locked(v_account_id, p_now);
    END LOOP;
    RETURN v_count;
END $$;

-- Which cap of the card, its account or that account's parent (in that
-- order) `p_amount` more would break, or NULL.
CREATE FUNCTION fc.caps_refusal(c fc.cards, s fc.accounts, p fc.accounts, p_day date,
                                p_amount bigint, p_now timestamptz)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        fc.cap_refusal(fc.card_caps(c, p_now), 1::smallint, c.id, p_day, p_amount),
        fc.cap_refusal(fc.account_caps(s, p_now), 2::smallint, s.id, p_day, p_amount),
        CASE WHEN p.id IS NOT NULL
             THEN fc.cap_refusal(fc.account_caps(p, p_now), 2::smallint, p.id, p_day, p_amount) END)
$$;

-- Terminal requests now carry the terminal's transaction counter (checked
-- after the replay and before anything else: a replay answers, a reused
-- counter is refused).
-- p_pin_ok is the server's verdict on the request's PIN block (NULL: none
-- sent); fc.pin_refusal (0003) turns it into a decline for PIN cards.
DROP FUNCTION fc.authorize(text, text, bytea, bytea, bigint, text, text, integer, smallint,
                           timestamptz, interval);
CREATE FUNCTION fc.authorize(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_pan_index bytea, p_amount_fen bigint,
    p_station_id text, p_terminal_id text, p_nozzle integer, p_product smallint,
    p_now timestamptz, p_ttl interval, p_counter bigint, p_pin_ok boolean)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_card     fc.cards;
    v_spender  fc.accounts;   -- the card's account
    v_parent   fc.accounts;   -- its parent, for sub-accounts
    v_funder   fc.accounts;   -- whose money is reserved
    v_hold     fc.holds;
    v_reason   text;
    v_local    timestamp := p_now AT TIME ZONE fc.business_tz();
    v_day      date := (p_now AT TIME ZONE fc.business_tz())::date;
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_terminal_id, p_counter);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;

    SELECT * INTO v_card FROM fc.cards WHERE pan_index = p_pan_index;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'CARD_NOT_FOUND', DETAIL = 'card_number';
    END IF;

    -- Serialise every reservation on this account tree (parent first). Held
    -- until commit, which is the end of this one statement.
    PERFORM fc.lock_chain(v_card.account_id);
    SELECT * INTO v_spender FROM fc.accounts WHERE id = v_card.account_id;
    IF v_spender.parent_id IS NOT NULL THEN
        SELECT * INTO v_parent FROM fc.accounts WHERE id = v_spender.parent_id;
    END IF;
    IF v_spender.funding_mode = 2 THEN
        v_funder := v_parent;
    ELSE
        v_funder := v_spender;
    END IF;

    IF v_card.status = 2 THEN
        v_reason := 'CARD_BLOCKED';
    ELSIF v_card.status = 3 THEN
        v_reason := 'CARD_CLOSED';
    ELSIF v_spender.status <> 1 OR v_parent.status <> 1 THEN
        v_reason := 'ACCOUNT_FROZEN';
    END IF;
    IF v_reason IS NULL AND v_card.has_pin THEN
        v_reason := fc.pin_refusal(v_card.id, p_pin_ok, p_now);
    END IF;
    IF v_reason IS NULL THEN
        v_reason := coalesce(
            fc.scope_refusal(v_card, p_station_id, p_product, v_local),
            fc.caps_refusal(v_card, v_spender, v_parent, v_day, p_amount_fen, p_now));
        -- Holds past their expiry still use their room until the sweeper gets
        -- to them; as for the money below, release this account's now, then
        -- look again. (Nested IFs: SQL's AND does not promise to skip the call.)
        IF v_reason LIKE 'LIMIT_%' THEN
            IF fc.release_expired_locked(v_funder.id, p_now) > 0 THEN
                SELECT * INTO v_funder FROM fc.accounts WHERE id = v_funder.id;
                v_reason := fc.caps_refusal(v_card, v_spender, v_parent, v_day, p_amount_fen,
                                            p_now);
            END IF;
        END IF;
        IF v_reason IS NULL AND v_funder.balance_fen - v_funder.held_fen < p_amount_fen THEN
            -- Holds past their expiry still count until the sweeper gets to
            -- them; release this account's now, then look again.
            IF fc.release_expired_locked(v_funder.id, p_now) > 0 THEN
                SELECT * INTO v_funder FROM fc.accounts WHERE id = v_funder.id;
            END IF;
            IF v_funder.balance_fen - v_funder.held_fen < p_amount_fen THEN
                v_reason := 'INSUFFICIENT_FUNDS';
            END IF;
        END IF;
    END IF;

    IF v_reason IS NOT NULL THEN
        v_response := jsonb_build_object(
            'decision', 'DECLINED', 'decline_reason', v_reason,
            'available_fen', v_funder.balance_fen - v_funder.held_fen);
    ELSE
        INSERT INTO fc.holds (account_id, card_id, spender_account_id, usage_day, state,
                              amount_fen, station_id, terminal_id, nozzle, product,
                              created_at, expires_at)
        VALUES (v_funder.id, v_card.id, v_spender.id, v_day, 1, p_amount_fen, p_station_id,
                p_terminal_id, p_nozzle, p_product, p_now, p_now + p_ttl)
        RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen + p_amount_fen WHERE id = v_funder.id;
        PERFORM fc.charge_usage(v_card.id, v_spender.id, v_parent.id, v_day, p_amount_fen);
        v_response := jsonb_build_object(
            'decision', 'APPROVED',
            'hold', fc.hold_json(v_hold),
            'available_fen', v_funder.balance_fen - v_funder.held_fen - p_amount_fen);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'authorize', p_request_hash, v_response, p_now);
END $$;

-- p_terminal: the calling terminal, which may only settle its own holds
-- (NULL for callers that are not terminals).
DROP FUNCTION fc.confirm(text, text, bytea, uuid, bigint, bigint, bigint, timestamptz);
CREATE FUNCTION fc.confirm(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_hold_uid uuid, p_final_fen bigint, p_volume_ml bigint, p_unit_price_fen bigint,
    p_now timestamptz, p_terminal text, p_counter bigint)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response  jsonb;
    v_spender_id bigint;
    v_parent_id bigint;
    v_hold      fc.holds;
    v_funder    fc.accounts;
    v_spender   fc.accounts;
    v_points    bigint := 0;
    v_late      boolean;
    v_exception uuid;
    v_month     date;
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_terminal, p_counter);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;

    SELECT spender_account_id INTO v_spender_id FROM fc.holds WHERE uid = p_hold_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'HOLD_NOT_FOUND', DETAIL = 'hold_id';
    END IF;
    v_parent_id := fc.lock_chain(v_spender_id);
    -- A concurrent duplicate of this very request may have settled the hold
    -- while we waited for the lock: answer as it did, not HOLD_ALREADY_CONFIRMED.
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    -- Re-read under the lock: the sweeper or a racing confirm may have moved it.
    SELECT * INTO v_hold FROM fc.holds WHERE uid = p_hold_uid;
    SELECT * INTO v_funder FROM fc.accounts WHERE id = v_hold.account_id;
    IF p_terminal IS NOT NULL AND v_hold.terminal_id <> p_terminal THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'NOT_YOUR_HOLD', DETAIL = 'hold_id';
    END IF;

    IF v_hold.state = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED', DETAIL = 'hold_id';
    ELSIF v_hold.state = 3 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_CANCELLED', DETAIL = 'hold_id';
    END IF;
    IF p_final_fen > v_hold.amount_fen THEN
        RAISE EXCEPTION USING ERRCODE = 'FCIA0', MESSAGE = 'FINAL_AMOUNT_EXCEEDS_HOLD',
            DETAIL = 'final_amount_fen';
    END IF;

    IF p_final_fen = 0 THEN
        -- Nothing delivered: behaves as cancel. An expired hold stays expired.
        IF v_hold.state = 1 THEN
            UPDATE fc.holds SET state = 3, closed_at = p_now WHERE id = v_hold.id
            RETURNING * INTO v_hold;
            UPDATE fc.accounts SET held_fen = held_fen - v_hold.amount_fen WHERE id = v_funder.id
            RETURNING * INTO v_funder;
            PERFORM fc.charge_usage(v_hold.card_id, v_spender_id, v_parent_id, v_hold.usage_day,
                                    -v_hold.amount_fen);
        END IF;
        v_response := jsonb_build_object('decision', 'APPROVED', 'hold', fc.hold_json(v_hold),
                                         'points_earned', 0, 'balance_fen', v_funder.balance_fen);
        RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
    END IF;

    v_late := v_hold.state = 4 OR v_hold.expires_at <= p_now;
    IF v_hold.state = 4 AND v_funder.balance_fen - v_funder.held_fen < p_final_fen THEN
        -- Expired, released, and the money has been spent since: the fuel is
        -- gone but cannot be paid from the card. Record it for reconciliation.
        INSERT INTO fc.settlement_exceptions (hold_id, account_id, amount_fen, reason, created_at)
        VALUES (v_hold.id, v_funder.id, p_final_fen, 'HOLD_EXPIRED_INSUFFICIENT_FUNDS', p_now)
        ON CONFLICT (hold_id) DO NOTHING;
        SELECT uid INTO v_exception FROM fc.settlement_exceptions WHERE hold_id = v_hold.id;
        v_response := jsonb_build_object(
            'decision', 'DECLINED', 'decline_reason', 'HOLD_EXPIRED',
            'hold', fc.hold_json(v_hold), 'points_earned', 0,
            'balance_fen', v_funder.balance_fen, 'settlement_exception_id', v_exception);
        RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
    END IF;

    SELECT * INTO v_spender FROM fc.accounts WHERE id = v_spender_id;
    v_points := fc.points_for(p_final_fen, v_spender.tier);
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id, created_at)
    VALUES (2, 1, v_funder.id, fc.system_account('FUEL_SALES'), p_final_fen, v_hold.id, p_now);
    IF v_points > 0 THEN
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id, created_at)
        VALUES (3, 2, fc.system_account('POINTS_ISSUED'), v_spender_id, v_points, v_hold.id, p_now);
        INSERT INTO fc.points_lots (account_id, points, remaining, earned_at, expires_at)
        VALUES (v_spender_id, v_points, v_points, p_now,
                p_now + make_interval(months => (SELECT value::integer FROM fc.config
                                                  WHERE key = 'points_validity_months')));
        UPDATE fc.accounts SET points_balance = points_balance + v_points WHERE id = v_spender_id;
    END IF;
    UPDATE fc.accounts
       SET balance_fen = balance_fen - p_final_fen,
           -- an expired hold no longer counts in held_fen
           held_fen = held_fen - CASE WHEN v_hold.state = 1 THEN v_hold.amount_fen ELSE 0 END
     WHERE id = v_funder.id
    RETURNING * INTO v_funder;
    -- Usage: an open hold charged its amount and now charges what was sold;
    -- an expired one had been released and charges the sale afresh.
    PERFORM fc.charge_usage(v_hold.card_id, v_spender_id, v_parent_id, v_hold.usage_day,
                            p_final_fen - CASE WHEN v_hold.state = 1 THEN v_hold.amount_fen ELSE 0 END);
    v_month := date_trunc('month', p_now AT TIME ZONE fc.business_tz())::date;
    INSERT INTO fc.monthly_spend (account_id, month, spend_fen) VALUES (v_spender_id, v_month, p_final_fen)
    ON CONFLICT (account_id, month) DO UPDATE SET spend_fen = fc.monthly_spend.spend_fen + excluded.spend_fen;
    PERFORM fc.evaluate_tier(v_spender_id, p_now);
    IF v_hold.state = 4 THEN
        -- A sale once declined for want of money, settled after all: the
        -- exception recorded for it is closed.
        UPDATE fc.settlement_exceptions SET resolved_at = p_now
         WHERE hold_id = v_hold.id AND resolved_at IS NULL;
    END IF;
    UPDATE fc.holds
       SET state = 2, settled_fen = p_final_fen, closed_at = coalesce(closed_at, p_now),
           volume_ml = p_volume_ml, unit_price_fen = p_unit_price_fen,
           points_earned = v_points, confirmed_late = v_late
     WHERE id = v_hold.id
    RETURNING * INTO v_hold;

    v_response := jsonb_build_object('decision', 'APPROVED', 'hold', fc.hold_json(v_hold),
                                     'points_earned', v_points, 'balance_fen', v_funder.balance_fen);
    RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
END $$;

DROP FUNCTION fc.cancel(text, text, bytea, uuid, timestamptz);
CREATE FUNCTION fc.cancel(
    p_caller text, p_request_id text, p_request_hash bytea, p_hold_uid uuid, p_now timestamptz,
    p_terminal text, p_counter bigint)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response   jsonb;
    v_spender_id bigint;
    v_parent_id  bigint;
    v_hold       fc.holds;
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_terminal, p_counter);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT spender_account_id INTO v_spender_id FROM fc.holds WHERE uid = p_hold_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'HOLD_NOT_FOUND', DETAIL = 'hold_id';
    END IF;
    v_parent_id := fc.lock_chain(v_spender_id);
    SELECT * INTO v_hold FROM fc.holds WHERE uid = p_hold_uid;
    IF p_terminal IS NOT NULL AND v_hold.terminal_id <> p_terminal THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'NOT_YOUR_HOLD', DETAIL = 'hold_id';
    END IF;
    IF v_hold.state = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED', DETAIL = 'hold_id';
    END IF;
    IF v_hold.state = 1 THEN
        UPDATE fc.holds SET state = 3, closed_at = p_now WHERE id = v_hold.id RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen - v_hold.amount_fen WHERE id = v_hold.account_id;
        PERFORM fc.charge_usage(v_hold.card_id, v_spender_id, v_parent_id, v_hold.usage_day,
                                -v_hold.amount_fen);
    END IF;
    -- Already cancelled or expired: the money is free; nothing to do.
    v_response := jsonb_build_object('hold', fc.hold_json(v_hold));
    RETURN fc.remember(p_caller, p_request_id, 'cancel', p_request_hash, v_response, p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.redeem_points(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_account_uid uuid, p_points bigint, p_description text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_account  fc.accounts;
    v_entry    fc.journal;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    PERFORM fc.lock_chain(v_account.id);
    SELECT * INTO v_account FROM fc.accounts WHERE id = v_account.id;

    IF v_account.status <> 1 THEN
        v_response := jsonb_build_object('decision', 'DECLINED', 'decline_reason', 'ACCOUNT_FROZEN',
                                         'points_balance', v_account.points_balance);
    ELSIF v_account.points_balance < p_points THEN
        v_response := jsonb_build_object('decision', 'DECLINED', 'decline_reason', 'INSUFFICIENT_POINTS',
                                         'points_balance', v_account.points_balance);
    ELSE
        PERFORM fc.take_points(v_account.id, p_points);   -- oldest lots first
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, description, created_at)
        VALUES (4, 2, v_account.id, fc.system_account('POINTS_REDEEMED'), p_points, p_description, p_now)
        RETURNING * INTO v_entry;
        UPDATE fc.accounts SET points_balance = points_balance - p_points WHERE id = v_account.id
        RETURNING * INTO v_account;
        v_response := jsonb_build_object('decision', 'APPROVED',
            'entry', jsonb_build_object('entry_id', v_entry.id::text, 'kind', 4,
                                        'points', -p_points, 'description', p_description,
                                        'create_us', fc.ts(p_now)),
            'points_balance', v_account.points_balance);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'redeem_points', p_request_hash, v_response, p_now);
END $$;

-- Recharge: SHARED sub-accounts hold no money; sub-accounts lock their parent first.
CREATE OR REPLACE FUNCTION fc.recharge(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_account_uid uuid, p_channel smallint, p_channel_txn_id text, p_amount_fen bigint,
    p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_account  fc.accounts;
    v_recharge fc.recharges;
    v_clearing text;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    IF v_account.funding_mode = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'ACCOUNT_USES_PARENT_BALANCE',
            DETAIL = 'account_id';
    END IF;

    -- The channel may notify the same payment again under a new request_id.
    SELECT * INTO v_recharge FROM fc.recharges
     WHERE channel = p_channel AND channel_txn_id = p_channel_txn_id;
    IF FOUND THEN
        IF v_recharge.account_id <> v_account.id OR v_recharge.amount_fen <> p_amount_fen THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'CHANNEL_TXN_REUSED',
                DETAIL = 'channel_txn_id';
        END IF;
        -- The original answer: the balance just after this recharge was credited.
        v_response := jsonb_build_object('decision', 'APPROVED',
            'recharge', fc.recharge_json(v_recharge), 'balance_fen', v_recharge.balance_after_fen);
        -- This request_id is now spent on this answer, like any other.
        RETURN fc.remember(p_caller, p_request_id, 'recharge', p_request_hash, v_response, p_now)
               || '{"replayed": true}';
    END IF;

    PERFORM fc.lock_chain(v_account.id);
    SELECT * INTO v_account FROM fc.accounts WHERE id = v_account.id;
    IF v_account.balance_fen > v_account.max_balance_fen - p_amount_fen THEN
        v_response := jsonb_build_object('decision', 'DECLINED',
            'decline_reason', 'BALANCE_LIMIT_EXCEEDED', 'balance_fen', v_account.balance_fen);
        RETURN fc.remember(p_caller, p_request_id, 'recharge', p_request_hash, v_response, p_now);
    END IF;

    v_clearing := 'CHANNEL_CLEARING_' || (ARRAY['BANK_CARD', 'WECHAT_PAY', 'ALIPAY', 'ECNY', 'COUNTER'])[p_channel];
    INSERT INTO fc.recharges (account_id, channel, channel_txn_id, amount_fen, balance_after_fen,
                              created_at)
    VALUES (v_account.id, p_channel, p_channel_txn_id, p_amount_fen,
            v_account.balance_fen + p_amount_fen, p_now)
    RETURNING * INTO v_recharge;
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, recharge_id, created_at)
    VALUES (1, 1, fc.system_account(v_clearing), v_account.id, p_amount_fen, v_recharge.id, p_now);
    UPDATE fc.accounts SET balance_fen = balance_fen + p_amount_fen WHERE id = v_account.id
    RETURNING * INTO v_account;

    v_response := jsonb_build_object('decision', 'APPROVED',
        'recharge', fc.recharge_json(v_recharge), 'balance_fen', v_account.balance_fen);
    RETURN fc.remember(p_caller, p_request_id, 'recharge', p_request_hash, v_response, p_now);
END $$;

-- Accounts now open under a parent, with a funding mode and a label.
DROP FUNCTION fc.open_account(text, text, bytea, smallint, text, text, text, timestamptz);
CREATE FUNCTION fc.open_account(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_kind smallint, p_name text, p_phone text, p_id_number text,
    p_parent_uid uuid, p_funding_mode smallint, p_label text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_parent   fc.accounts;
    v_account  fc.accounts;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    IF p_parent_uid IS NOT NULL THEN
        SELECT * INTO v_parent FROM fc.accounts WHERE uid = p_parent_uid AND kind <> 100;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
                DETAIL = 'parent_account_id';
        END IF;
        IF v_parent.parent_id IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'PARENT_NOT_TOP_LEVEL',
                DETAIL = 'parent_account_id';
        END IF;
    END IF;
    INSERT INTO fc.accounts (kind, parent_id, funding_mode, label, created_at)
    VALUES (coalesce(nullif(p_kind, 0), v_parent.kind), v_parent.id, p_funding_mode, p_label, p_now)
    RETURNING * INTO v_account;
    INSERT INTO fc.account_holders (account_id, name, phone, id_number)
    VALUES (v_account.id, p_name, p_phone, p_id_number);
    -- The stored response keeps only the account id: personal data is not
    -- copied into the idempotency table; the server re-reads it on replay.
    RETURN fc.remember(p_caller, p_request_id, 'open_account', p_request_hash,
                       jsonb_build_object('account_id', v_account.uid), p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.account_json(a fc.accounts) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'account_id', a.uid, 'type', a.kind, 'status', a.status, 'tier', a.tier,
        'balance_fen', a.balance_fen, 'held_fen', a.held_fen,
        'points_balance', a.points_balance, 'create_us', fc.ts(a.created_at),
        'holder_name', h.name, 'holder_phone', h.phone, 'holder_id_number', h.id_number,
        'parent_account_id', (SELECT uid FROM fc.accounts p WHERE p.id = a.parent_id),
        'funding_mode', a.funding_mode, 'label', a.label)
    FROM fc.account_holders h WHERE h.account_id = a.id
$$;
