-- 0006: the real-time risk engine (issue #6).
--
-- Rules are data: a rule set is a versioned row of fc.risk_rule_sets with its
-- rules in fc.risk_rules (one row per rule, its parameters in typed columns),
-- and fc.risk_active names the one in force. Loading a new set or activating
-- an old one is one transaction: every authorization sees either the old set
-- or the new one, and no server restarts.
--
-- Every authorization is scored inside fc.authorize, under the account's
-- advisory lock (which serialises every card of the account): the features of
-- the card are computed once from its small state row (fc.risk_card_state),
-- then all active rules are evaluated by one SELECT, and the state row is
-- updated in the same transaction as the reservation. So counters are
-- consistent across server processes, and a burst of concurrent
-- authorizations cannot slip past a velocity or interval rule.
--
-- Decisions: APPROVE (as before), DECLINE (decline_reason RISK_DECLINED,
-- nothing reserved) or REVIEW: the hold is made in state 5 SUSPENDED - the
-- money is reserved and counts in held_fen and the usage counters, the pump
-- must not deliver - until a reviewer approves it (-> 1 AUTHORIZED, with a
-- fresh expiry) or rejects it (-> 6 REJECTED, money released), the POS
-- cancels it (-> 3), or it expires like any hold (-> 4). A hold that expired
-- while suspended can never be confirmed late: it was never approved.
--
-- Engine fault: the evaluation runs in an EXCEPTION block; any error inside
-- applies the rule set's fallback (decline or review), never an approval, and
-- the answer says so (risk.fallback) so the server counts it.

------------------------------------------------------------------------------
-- Hold states 5 SUSPENDED and 6 REJECTED.
------------------------------------------------------------------------------
ALTER TABLE fc.holds DROP CONSTRAINT holds_state_check;
ALTER TABLE fc.holds ADD CONSTRAINT holds_state_check CHECK (state BETWEEN 1 AND 6);
ALTER TABLE fc.holds DROP CONSTRAINT open_iff_authorized;
ALTER TABLE fc.holds ADD CONSTRAINT open_iff_active CHECK ((state IN (1, 5)) = (closed_at IS NULL));
-- What the risk engine said about the hold, and its review.
-- review_state: NULL never suspended, 1 pending, 2 approved, 3 rejected.
ALTER TABLE fc.holds
    ADD COLUMN risk_score   integer NOT NULL DEFAULT 0,
    ADD COLUMN risk_rules   text[]  NOT NULL DEFAULT '{}',
    ADD COLUMN review_state smallint CHECK (review_state BETWEEN 1 AND 3),
    ADD COLUMN reviewed_by  text,
    ADD COLUMN reviewed_at  timestamptz,
    ADD COLUMN review_note  text;
DROP INDEX fc.holds_expiring;
CREATE INDEX holds_expiring ON fc.holds (expires_at) WHERE state IN (1, 5);
CREATE INDEX holds_suspended ON fc.holds (id) WHERE state = 5;

CREATE OR REPLACE FUNCTION fc.check_hold_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state <> OLD.state AND NOT (
           (OLD.state = 1 AND NEW.state IN (2, 3, 4))   -- confirm, cancel, expire
        OR (OLD.state = 4 AND NEW.state = 2)            -- late confirm
        OR (OLD.state = 5 AND NEW.state IN (1, 3, 4, 6)) -- review approve, cancel, expire, reject
    ) THEN
        RAISE EXCEPTION 'illegal hold transition % -> % for hold %', OLD.state, NEW.state, OLD.id;
    END IF;
    IF NEW.amount_fen <> OLD.amount_fen OR NEW.account_id <> OLD.account_id THEN
        RAISE EXCEPTION 'hold % amount and account are immutable', OLD.id;
    END IF;
    RETURN NEW;
END $$;

------------------------------------------------------------------------------
-- Rule sets.
------------------------------------------------------------------------------

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
    id            integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,   -- the version
    name          text        NOT NULL,
    -- what was loaded, normalised (fuelcard_server.risk.model.RuleSet.to_document)
    document      jsonb       NOT NULL,
    digest        text        NOT NULL,
    fallback      smallint    NOT NULL CHECK (fallback IN (2, 3)),
    review_score  integer     NOT NULL CHECK (review_score > 0),
    decline_score integer     NOT NULL CHECK (decline_score > 0),
    -- the distinct windows of window-based rules; rules index into it (widx)
    windows       integer[]   NOT NULL,
    has_points    boolean     NOT NULL,
    created_at    timestamptz NOT NULL,
    created_by    text        NOT NULL
);

CREATE TABLE fc.risk_rules (
    rule_set_id   integer  NOT NULL REFERENCES fc.risk_rule_sets (id),
    ord           integer  NOT NULL,
    rule_id       text     NOT NULL,
    kind          smallint NOT NULL CHECK (kind BETWEEN 1 AND 11 OR kind = 99),
    action        smallint NOT NULL CHECK (action IN (0, 2, 3)),
    score         integer  NOT NULL CHECK (score >= 0),
    tiers         smallint[],          -- NULL: every tier
    account_kinds smallint[],          -- NULL: every account type
    threshold     bigint   NOT NULL DEFAULT 0,
    window_s      integer  NOT NULL DEFAULT 0,
    widx          integer  NOT NULL DEFAULT 0,
    speed_kmh     double precision NOT NULL DEFAULT 0,
    minute_from   integer  NOT NULL DEFAULT 0,
    minute_to     integer  NOT NULL DEFAULT 0,
    stations      text[]   NOT NULL DEFAULT '{}',
    terminals     text[]   NOT NULL DEFAULT '{}',
    PRIMARY KEY (rule_set_id, ord),
    UNIQUE (rule_set_id, rule_id)
);
CREATE TRIGGER risk_rules_append_only BEFORE UPDATE OR DELETE ON fc.risk_rules
    FOR EACH ROW EXECUTE FUNCTION fc.refuse_change();
CREATE TRIGGER risk_rule_sets_append_only BEFORE UPDATE OR DELETE ON fc.risk_rule_sets
    FOR EACH ROW EXECUTE FUNCTION fc.refuse_change();

-- The rule set in force (none: no row, nothing is scored but the card state
-- is kept, so a set activated later sees the cards' history).
CREATE TABLE fc.risk_active (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    rule_set_id  integer NOT NULL REFERENCES fc.risk_rule_sets (id),
    activated_at timestamptz NOT NULL,
    activated_by text NOT NULL
);

-- Who changed the rules, when, and what changed (rule ids added, removed,
-- changed against the set in force before). The RPC itself is also in the
-- hash-chained audit log.
CREATE TABLE fc.risk_rule_changes (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action       text        NOT NULL CHECK (action IN ('load', 'activate', 'deactivate')),
    rule_set_id  integer REFERENCES fc.risk_rule_sets (id),
    previous_id  integer REFERENCES fc.risk_rule_sets (id),
    actor        text        NOT NULL,
    details      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL
);
CREATE TRIGGER risk_rule_changes_append_only BEFORE UPDATE OR DELETE ON fc.risk_rule_changes
    FOR EACH ROW EXECUTE FUNCTION fc.refuse_change();

-- Per card: what the rules need to know about its past, bounded.
CREATE TABLE fc.risk_card_state (
    card_id       bigint PRIMARY KEY REFERENCES fc.cards (id),
    n_auths       integer     NOT NULL DEFAULT 0,    -- holds made (approved or suspended)
    last_at       timestamptz,
    last_station  text,
    last_lat      double precision,
    last_lon      double precision,
    auth_times    timestamptz[] NOT NULL DEFAULT '{}',  -- oldest first, the last 64
    day_list      date[]      NOT NULL DEFAULT '{}',    -- newest first, last 7 local days
    day_fens      bigint[]    NOT NULL DEFAULT '{}',    -- authorized amount on each
    terminals     text[]      NOT NULL DEFAULT '{}',    -- most recent first, at most 32
    decline_times timestamptz[] NOT NULL DEFAULT '{}'   -- oldest first, the last 16
);

-- Redemptions by account and time, for the points_redemption rule.
CREATE INDEX journal_redemptions ON fc.journal (debit_account_id, created_at) WHERE kind = 4;

------------------------------------------------------------------------------
-- Loading and activating rule sets (RiskService, `fuelcard risk load`).
------------------------------------------------------------------------------

-- What changed between two rule sets: rule ids added, removed, changed.
CREATE FUNCTION fc.risk_diff(p_old integer, p_new integer) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH o AS (SELECT r.rule_id, to_jsonb(r) - 'rule_set_id' - 'ord' AS body
                 FROM fc.risk_rules r WHERE r.rule_set_id = p_old),
         n AS (SELECT r.rule_id, to_jsonb(r) - 'rule_set_id' - 'ord' AS body
                 FROM fc.risk_rules r WHERE r.rule_set_id = p_new)
    SELECT jsonb_build_object(
        'added', coalesce((SELECT jsonb_agg(n.rule_id ORDER BY n.rule_id) FROM n
                            WHERE NOT EXISTS (SELECT 1 FROM o WHERE o.rule_id = n.rule_id)), '[]'),
        'removed', coalesce((SELECT jsonb_agg(o.rule_id ORDER BY o.rule_id) FROM o
                              WHERE NOT EXISTS (SELECT 1 FROM n WHERE n.rule_id = o.rule_id)), '[]'),
        'changed', coalesce((SELECT jsonb_agg(n.rule_id ORDER BY n.rule_id) FROM n JOIN o USING (rule_id)
                              WHERE n.body <> o.body), '[]'))
$$;

CREATE FUNCTION fc.risk_set_json(p_id integer) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'version', s.id, 'name', s.name, 'digest', s.digest, 'document', s.document,
        'rules', (SELECT count(*) FROM fc.risk_rules r WHERE r.rule_set_id = s.id),
        'create_us', fc.ts(s.created_at), 'created_by', s.created_by,
        'active', a.rule_set_id IS NOT NULL,
        'activate_us', fc.ts(a.activated_at), 'activated_by', a.activated_by)
      FROM fc.risk_rule_sets s LEFT JOIN fc.risk_active a ON a.rule_set_id = s.id
     WHERE s.id = p_id
$$;

-- Store a validated rule set (the server validated it: fuelcard_server.risk)
-- and make it the one in force. p_rules: one object per rule, with the
-- columns of fc.risk_rules. p_lock: locks.RISK_RULES_LOCK.
CREATE FUNCTION fc.risk_load(
    p_caller text, p_request_id text, p_request_hash bytea, p_lock bigint, p_actor text,
    p_name text, p_document jsonb, p_digest text, p_fallback smallint, p_review_score integer,
    p_decline_score integer, p_windows integer[], p_has_points boolean, p_rules jsonb,
    p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_id       integer;
    v_previous integer;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    INSERT INTO fc.risk_rule_sets (name, document, digest, fallback, review_score, decline_score,
                                   windows, has_points, created_at, created_by)
    VALUES (p_name, p_document, p_digest, p_fallback, p_review_score, p_decline_score,
            p_windows, p_has_points, p_now, p_actor)
    RETURNING id INTO v_id;
    INSERT INTO fc.risk_rules (rule_set_id, ord, rule_id, kind, action, score, tiers,
                               account_kinds, threshold, window_s, widx, speed_kmh, minute_from,
                               minute_to, stations, terminals)
    SELECT v_id, x.ord, x.rule_id, x.kind, x.action, x.score, x.tiers, x.account_kinds,
           x.threshold, x.window_s, x.widx, x.speed_kmh, x.minute_from, x.minute_to,
           x.stations, x.terminals
      FROM jsonb_to_recordset(p_rules) AS x(ord integer, rule_id text, kind smallint,
           action smallint, score integer, tiers smallint[], account_kinds smallint[],
           threshold bigint, window_s integer, widx integer, speed_kmh double precision,
           minute_from integer, minute_to integer, stations text[], terminals text[]);
    SELECT rule_set_id INTO v_previous FROM fc.risk_active;
    INSERT INTO fc.risk_active (singleton, rule_set_id, activated_at, activated_by)
    VALUES (true, v_id, p_now, p_actor)
    ON CONFLICT (singleton) DO UPDATE
       SET rule_set_id = excluded.rule_set_id, activated_at = excluded.activated_at,
           activated_by = excluded.activated_by;
    INSERT INTO fc.risk_rule_changes (action, rule_set_id, previous_id, actor, details, created_at)
    VALUES ('load', v_id, v_previous, p_actor, fc.risk_diff(v_previous, v_id), p_now);
    v_response := jsonb_build_object('rule_set', fc.risk_set_json(v_id),
                                     'changes', fc.risk_diff(v_previous, v_id));
    RETURN fc.remember(p_caller, p_request_id, 'risk_load', p_request_hash, v_response, p_now);
END $$;

-- Put an earlier rule set back in force (rollback), or none (p_version 0).
CREATE FUNCTION fc.risk_activate(
    p_caller text, p_request_id text, p_request_hash bytea, p_lock bigint, p_actor text,
    p_version integer, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_previous integer;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    IF p_version <> 0 AND NOT EXISTS (SELECT 1 FROM fc.risk_rule_sets WHERE id = p_version) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'RULE_SET_NOT_FOUND', DETAIL = 'version';
    END IF;
    SELECT rule_set_id INTO v_previous FROM fc.risk_active;
    IF p_version = 0 THEN
        DELETE FROM fc.risk_active;
    ELSE
        INSERT INTO fc.risk_active (singleton, rule_set_id, activated_at, activated_by)
        VALUES (true, p_version, p_now, p_actor)
        ON CONFLICT (singleton) DO UPDATE
           SET rule_set_id = excluded.rule_set_id, activated_at = excluded.activated_at,
               activated_by = excluded.activated_by;
    END IF;
    INSERT INTO fc.risk_rule_changes (action, rule_set_id, previous_id, actor, details, created_at)
    VALUES (CASE WHEN p_version = 0 THEN 'deactivate' ELSE 'activate' END, nullif(p_version, 0),
            v_previous, p_actor, fc.risk_diff(v_previous, nullif(p_version, 0)), p_now);
    v_response := jsonb_build_object(
        'rule_set', CASE WHEN p_version = 0 THEN NULL ELSE fc.risk_set_json(p_version) END,
        'changes', fc.risk_diff(v_previous, nullif(p_version, 0)));
    RETURN fc.remember(p_caller, p_request_id, 'risk_activate', p_request_hash, v_response, p_now);
END $$;

------------------------------------------------------------------------------
-- Scoring.
------------------------------------------------------------------------------

-- The risk verdict on an authorization that passed every business check
-- (p_local: p_now in the business time zone):
-- {decision: APPROVE|REVIEW|DECLINE, score, rules: [fired rule ids],
--  version, fallback}; NULL when no rule set is in force. Reads only: the
-- card state is updated by fc.risk_note afterwards. The caller holds the
-- account's advisory lock. Any error inside applies the set's fallback.
CREATE FUNCTION fc.risk_assess(
    p_card_id bigint, p_tier smallint, p_account_kind smallint, p_spender_id bigint,
    p_amount bigint, p_station text, p_terminal text, p_now timestamptz, p_local timestamp)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_set        record;
    v_st         fc.risk_card_state;
    v_red_at     timestamptz[];
    v_red_pts    bigint[];
    v_day        date := p_local::date;
    v_minute     integer;
    v_day_fen    bigint := 0;
    v_week_fen   bigint := 0;
    v_since_us   bigint;
    v_dist_m     double precision;
    v_counts     bigint[];
    v_declines   bigint[];
    v_points     bigint[];
    v_new_term   boolean;
    v_fired      text[];
    v_score      bigint;
    v_action     integer;
    v_decision   text;
BEGIN
    -- Not s.*: the document is large (TOASTed) and not needed here.
    SELECT s.id, s.fallback, s.review_score, s.decline_score, s.windows, s.has_points
      INTO v_set FROM fc.risk_active a JOIN fc.risk_rule_sets s ON s.id = a.rule_set_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- The card's state and the station are read before the guarded block:
    -- a relation first locked inside a subtransaction makes its exit cost
    -- more (measured: ~150 us per authorize), and these plain reads are not
    -- where a rule set can fail.
    SELECT * INTO v_st FROM fc.risk_card_state WHERE card_id = p_card_id;
    IF v_st.last_lat IS NOT NULL THEN
        SELECT fc.distance_m(v_st.last_lat, v_st.last_lon, s.latitude, s.longitude)
          INTO v_dist_m FROM fc.stations s WHERE s.station_id = p_station;
    END IF;
    IF v_set.has_points THEN
        -- Redemptions in the longest window (one index scan); none: v_points
        -- stays NULL and no points rule fires.
        SELECT array_agg(j.created_at), array_agg(j.amount) INTO v_red_at, v_red_pts
          FROM fc.journal j
         WHERE j.kind = 4 AND j.debit_account_id = p_spender_id
           AND j.created_at > p_now - make_interval(secs => v_set.windows[cardinality(v_set.windows)])
           AND j.created_at <= p_now;
    END IF;
    PERFORM FROM fc.risk_rules r WHERE r.rule_set_id = v_set.id AND r.ord = 0;  -- its lock, here
    BEGIN
        -- The features, once.
        v_minute := extract(hour FROM p_local)::integer * 60 + extract(minute FROM p_local)::integer;
        IF v_st.card_id IS NOT NULL THEN
            SELECT coalesce(sum(f) FILTER (WHERE d = v_day), 0),
                   coalesce(sum(f) FILTER (WHERE d > v_day - 7), 0)
              INTO v_day_fen, v_week_fen
              FROM unnest(v_st.day_list, v_st.day_fens) AS x(d, f);
            v_since_us := fc.ts(p_now) - fc.ts(v_st.last_at);
            v_new_term := NOT (p_terminal = ANY (v_st.terminals));
        ELSE
            v_st.n_auths := 0;
            v_new_term := true;
        END IF;
        -- Times are kept oldest first: how many are later than the start of
        -- a window is a binary search (width_bucket counts those at or before).
        SELECT array_agg(cardinality(v_st.auth_times)
                         - width_bucket(p_now - make_interval(secs => w), v_st.auth_times) ORDER BY i),
               array_agg(cardinality(v_st.decline_times)
                         - width_bucket(p_now - make_interval(secs => w), v_st.decline_times) ORDER BY i)
          INTO v_counts, v_declines
          FROM unnest(v_set.windows) WITH ORDINALITY AS u(w, i);
        IF v_set.has_points THEN
            SELECT array_agg((SELECT coalesce(sum(x.pts), 0) FROM unnest(v_red_at, v_red_pts) x(t, pts)
                               WHERE x.t > p_now - make_interval(secs => w)) ORDER BY i)
              INTO v_points
              FROM unnest(v_set.windows) WITH ORDINALITY AS u(w, i)
             WHERE v_red_at IS NOT NULL;
        END IF;

        -- Every rule, in one pass.
        SELECT coalesce(array_agg(r.rule_id ORDER BY r.ord), '{}'), coalesce(sum(r.score), 0),
               coalesce(max(r.action), 0)
          INTO v_fired, v_score, v_action
          FROM fc.risk_rules r
         WHERE r.rule_set_id = v_set.id
           AND (r.tiers IS NULL OR p_tier = ANY (r.tiers))
           AND (r.account_kinds IS NULL OR p_account_kind = ANY (r.account_kinds))
           AND CASE r.kind
                 WHEN 1 THEN p_amount >= r.threshold
                 WHEN 2 THEN v_day_fen + p_amount >= r.threshold
                 WHEN 3 THEN v_week_fen + p_amount >= r.threshold
                 WHEN 4 THEN v_counts[r.widx] + 1 >= r.threshold
                 WHEN 5 THEN v_since_us < r.window_s::bigint * 1000000
                 WHEN 6 THEN v_dist_m >= r.threshold
                             AND v_dist_m * 3.6e6 > r.speed_kmh * greatest(v_since_us, 1000000)
                 WHEN 7 THEN v_new_term AND v_st.n_auths >= r.threshold
                 WHEN 8 THEN p_station = ANY (r.stations) OR p_terminal = ANY (r.terminals)
                 WHEN 9 THEN v_declines[r.widx] >= r.threshold
                 WHEN 10 THEN p_amount >= r.threshold
                              AND CASE WHEN r.minute_from <= r.minute_to
                                       THEN v_minute >= r.minute_from AND v_minute < r.minute_to
                                       ELSE v_minute >= r.minute_from OR v_minute < r.minute_to END
                 WHEN 11 THEN v_points[r.widx] >= r.threshold
                 WHEN 99 THEN 1 / r.threshold > 0
               END;
        v_decision := CASE
            WHEN v_action = 3 OR v_score >= v_set.decline_score THEN 'DECLINE'
            WHEN v_action = 2 OR v_score >= v_set.review_score THEN 'REVIEW'
            ELSE 'APPROVE' END;
        RETURN jsonb_build_object('decision', v_decision, 'score', v_score, 'rules', v_fired,
                                  'version', v_set.id, 'fallback', false);
    EXCEPTION WHEN OTHERS THEN
        -- Never approve blindly: the configured fallback, flagged for the metrics.
        RETURN jsonb_build_object(
            'decision', CASE v_set.fallback WHEN 3 THEN 'DECLINE' ELSE 'REVIEW' END,
            'score', 0, 'rules', jsonb_build_array('ENGINE_FAULT'), 'version', v_set.id,
            'fallback', true);
    END;
END $$;

-- Record an authorization in the card's risk state: p_held (a hold was made,
-- approved or suspended) or a decline. The caller holds the account's lock.
-- Times are appended oldest first, never before the last one (two server
-- processes' clocks may differ by a little), so the arrays stay sorted.
-- p_day: the local day of p_now.
CREATE FUNCTION fc.risk_note(p_card_id bigint, p_held boolean, p_amount bigint,
                             p_station text, p_terminal text, p_now timestamptz, p_day date)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_day date := p_day;
    v_lat double precision;
    v_lon double precision;
BEGIN
    IF NOT p_held THEN
        INSERT INTO fc.risk_card_state AS s (card_id, decline_times)
        VALUES (p_card_id, ARRAY[p_now])
        ON CONFLICT (card_id) DO UPDATE
           SET decline_times = (s.decline_times
                                || greatest(p_now, s.decline_times[cardinality(s.decline_times)]))
                               [greatest(1, cardinality(s.decline_times) - 14):];
        RETURN;
    END IF;
    SELECT latitude, longitude INTO v_lat, v_lon FROM fc.stations WHERE station_id = p_station;
    INSERT INTO fc.risk_card_state AS s (card_id, n_auths, last_at, last_station, last_lat,
                                         last_lon, auth_times, day_list, day_fens, terminals)
    VALUES (p_card_id, 1, p_now, p_station, v_lat, v_lon, ARRAY[p_now], ARRAY[v_day],
            ARRAY[p_amount], ARRAY[p_terminal])
    ON CONFLICT (card_id) DO UPDATE
       SET n_auths = s.n_auths + 1,
           last_at = p_now, last_station = p_station, last_lat = v_lat, last_lon = v_lon,
           auth_times = (s.auth_times || greatest(p_now, s.auth_times[cardinality(s.auth_times)]))
                        [greatest(1, cardinality(s.auth_times) - 62):],
           day_list = CASE WHEN s.day_list[1] = v_day THEN s.day_list
                           ELSE (v_day || s.day_list)[1:7] END,
           day_fens = CASE WHEN s.day_list[1] = v_day
                           THEN (s.day_fens[1] + p_amount) || s.day_fens[2:]
                           ELSE (p_amount || s.day_fens)[1:7] END,
           terminals = (p_terminal || array_remove(s.terminals, p_terminal))[1:32];
END $$;

------------------------------------------------------------------------------
-- The money movements, aware of suspended and rejected holds. Copies of the
-- final bodies of 0002 with the changes marked "risk".
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
         WHERE h.account_id = p_account_id AND h.state IN (1, 5) AND h.expires_at <= p_now  -- risk
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
             WHERE state IN (1, 5) AND expires_at <= p_now          -- risk: suspended too
             ORDER BY expires_at LIMIT p_limit) due
        ORDER BY account_id
    LOOP
        PERFORM fc.lock_chain(v_account_id);
        v_count := v_count + fc.release_expired_locked(v_account_id, p_now);
    END LOOP;
    RETURN v_count;
END $$;

CREATE OR REPLACE FUNCTION fc.authorize(
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
    v_risk     jsonb;         -- risk: the engine's verdict, NULL without a rule set
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

    -- risk: score what passed every business check.
    IF v_reason IS NULL THEN
        v_risk := fc.risk_assess(v_card.id, v_spender.tier, v_spender.kind, v_spender.id,
                                 p_amount_fen, p_station_id, p_terminal_id, p_now, v_local);
        IF v_risk->>'decision' = 'DECLINE' THEN
            v_reason := 'RISK_DECLINED';
        END IF;
    END IF;
    PERFORM fc.risk_note(v_card.id, v_reason IS NULL, p_amount_fen, p_station_id,
                         p_terminal_id, p_now, v_day);

    IF v_reason IS NOT NULL THEN
        v_response := jsonb_build_object(
            'decision', 'DECLINED', 'decline_reason', v_reason,
            'available_fen', v_funder.balance_fen - v_funder.held_fen);
    ELSE
        INSERT INTO fc.holds (account_id, card_id, spender_account_id, usage_day, state,
                              amount_fen, station_id, terminal_id, nozzle, product,
                              created_at, expires_at, risk_score, risk_rules, review_state)
        VALUES (v_funder.id, v_card.id, v_spender.id, v_day,
                CASE WHEN v_risk->>'decision' = 'REVIEW' THEN 5 ELSE 1 END,   -- risk
                p_amount_fen, p_station_id,
                p_terminal_id, p_nozzle, p_product, p_now, p_now + p_ttl,
                coalesce((v_risk->>'score')::integer, 0),
                coalesce(ARRAY(SELECT jsonb_array_elements_text(v_risk->'rules')), '{}'),
                CASE WHEN v_risk->>'decision' = 'REVIEW' THEN 1 END)
        RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen + p_amount_fen WHERE id = v_funder.id;
        PERFORM fc.charge_usage(v_card.id, v_spender.id, v_parent.id, v_day, p_amount_fen);
        v_response := jsonb_build_object(
            'decision', CASE WHEN v_hold.state = 5 THEN 'REVIEW' ELSE 'APPROVED' END,
            'hold', fc.hold_json(v_hold),
            'available_fen', v_funder.balance_fen - v_funder.held_fen - p_amount_fen);
    END IF;
    IF v_risk IS NOT NULL THEN
        v_response := v_response || jsonb_build_object('risk', v_risk);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'authorize', p_request_hash, v_response, p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.confirm(
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
    -- risk: a suspended hold, or one that expired before anyone approved it,
    -- was never approved: no fuel may have been sold on it.
    ELSIF v_hold.state = 5 OR (v_hold.state = 4 AND v_hold.review_state IN (1, 3)) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_SUSPENDED', DETAIL = 'hold_id';
    ELSIF v_hold.state = 6 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_REJECTED', DETAIL = 'hold_id';
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

CREATE OR REPLACE FUNCTION fc.cancel(
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
    -- risk: a suspended hold may be cancelled too (the driver gave up waiting).
    IF v_hold.state IN (1, 5) THEN
        UPDATE fc.holds SET state = 3, closed_at = p_now WHERE id = v_hold.id RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen - v_hold.amount_fen WHERE id = v_hold.account_id;
        PERFORM fc.charge_usage(v_hold.card_id, v_spender_id, v_parent_id, v_hold.usage_day,
                                -v_hold.amount_fen);
    END IF;
    -- Already cancelled, expired or rejected: the money is free; nothing to do.
    v_response := jsonb_build_object('hold', fc.hold_json(v_hold));
    RETURN fc.remember(p_caller, p_request_id, 'cancel', p_request_hash, v_response, p_now);
END $$;

------------------------------------------------------------------------------
-- Review of suspended holds (RiskService.ReviewHold).
------------------------------------------------------------------------------

-- Approve (-> AUTHORIZED, expiring p_ttl from now: the pump gets its full
-- window) or reject (-> REJECTED, money released) a suspended hold.
CREATE FUNCTION fc.review_hold(
    p_caller text, p_request_id text, p_request_hash bytea, p_hold_uid uuid, p_approve boolean,
    p_reviewer text, p_note text, p_now timestamptz, p_ttl interval)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response   jsonb;
    v_spender_id bigint;
    v_parent_id  bigint;
    v_hold       fc.holds;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT spender_account_id INTO v_spender_id FROM fc.holds WHERE uid = p_hold_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'HOLD_NOT_FOUND', DETAIL = 'hold_id';
    END IF;
    v_parent_id := fc.lock_chain(v_spender_id);
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_hold FROM fc.holds WHERE uid = p_hold_uid;
    IF v_hold.state <> 5 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_NOT_SUSPENDED', DETAIL = 'hold_id';
    ELSIF v_hold.expires_at <= p_now THEN
        -- Too late: the sweeper releases it like any expired hold.
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_EXPIRED', DETAIL = 'hold_id';
    END IF;
    IF p_approve THEN
        UPDATE fc.holds SET state = 1, expires_at = p_now + p_ttl, review_state = 2,
                            reviewed_by = p_reviewer, reviewed_at = p_now, review_note = p_note
         WHERE id = v_hold.id RETURNING * INTO v_hold;
    ELSE
        UPDATE fc.holds SET state = 6, closed_at = p_now, review_state = 3,
                            reviewed_by = p_reviewer, reviewed_at = p_now, review_note = p_note
         WHERE id = v_hold.id RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen - v_hold.amount_fen WHERE id = v_hold.account_id;
        PERFORM fc.charge_usage(v_hold.card_id, v_spender_id, v_parent_id, v_hold.usage_day,
                                -v_hold.amount_fen);
    END IF;
    v_response := jsonb_build_object('hold', fc.hold_json(v_hold));
    RETURN fc.remember(p_caller, p_request_id, 'review_hold', p_request_hash, v_response, p_now);
END $$;
