-- The real-time risk engine, its stored side.
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
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- Loading and activating rule sets (RiskService, `fuelcard risk load`).
------------------------------------------------------------------------------

-- What changed between two rule sets: rule ids added, removed, changed.
CREATE OR REPLACE FUNCTION fc.risk_diff(p_old integer, p_new integer) RETURNS jsonb
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

CREATE OR REPLACE FUNCTION fc.risk_set_json(p_id integer) RETURNS jsonb
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
CREATE OR REPLACE FUNCTION fc.risk_load(
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
CREATE OR REPLACE FUNCTION fc.risk_activate(
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

-- Scoring.
------------------------------------------------------------------------------

-- The risk verdict on an authorization that passed every business check
-- (p_local: p_now in the business time zone):
-- {decision: APPROVE|REVIEW|DECLINE, score, rules: [fired rule ids],
--  version, fallback}; NULL when no rule set is in force. Reads only: the
-- card state is updated by fc.risk_note afterwards. The caller holds the
-- account's advisory lock. Any error inside applies the set's fallback.
-- Steps: the reads here, the features (fc.risk_score), the rules (fc.risk_fired).
CREATE OR REPLACE FUNCTION fc.risk_assess(
    p_card_id bigint, p_tier smallint, p_account_kind smallint, p_spender_id bigint,
    p_amount bigint, p_station text, p_terminal text, p_now timestamptz, p_local timestamp)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_set        record;
    v_st         fc.risk_card_state;
    v_red_at     timestamptz[];
    v_red_pts    bigint[];
    v_dist_m     double precision;
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
        -- Redemptions in the longest window (one index scan); none: no points rule fires.
        SELECT array_agg(j.created_at), array_agg(j.amount) INTO v_red_at, v_red_pts
          FROM fc.journal j
         WHERE j.kind = fc.ledger_entry_kind_points_redeemed() AND j.debit_account_id = p_spender_id
           AND j.created_at > p_now - make_interval(secs => v_set.windows[cardinality(v_set.windows)])
           AND j.created_at <= p_now;
    END IF;
    PERFORM FROM fc.risk_rules r WHERE r.rule_set_id = v_set.id AND r.ord = 0;  -- its lock, here
    BEGIN
        RETURN fc.risk_score(v_set.id, v_set.review_score, v_set.decline_score, v_set.windows,
                             v_set.has_points, v_st, v_dist_m, v_red_at, v_red_pts, p_tier,
                             p_account_kind, p_amount, p_station, p_terminal, p_now, p_local);
    EXCEPTION WHEN OTHERS THEN
        -- Never approve blindly: the configured fallback, flagged for the metrics.
        RETURN jsonb_build_object(
            'decision', CASE v_set.fallback WHEN fc.risk_decision_decline() THEN 'DECLINE'
                                            ELSE 'REVIEW' END,
            'score', 0, 'rules', jsonb_build_array('ENGINE_FAULT'), 'version', v_set.id,
            'fallback', true);
    END;
END $$;

-- Rule set p_set_id's verdict (fc.risk_assess's answer) from what fc.risk_assess read: the
-- card's risk state p_st (all NULL for a card not seen before), the distance from its last
-- station p_dist_m, the spender's redemptions in the longest window (p_red_at, p_red_pts;
-- NULL if none or the set has no points rule). Works out each feature once, for every rule.
-- Runs inside fc.risk_assess's guarded block: an error here is the set's fallback.
CREATE OR REPLACE FUNCTION fc.risk_score(
    p_set_id integer, p_review_score integer, p_decline_score integer, p_windows integer[],
    p_has_points boolean, p_st fc.risk_card_state, p_dist_m double precision,
    p_red_at timestamptz[], p_red_pts bigint[], p_tier smallint, p_account_kind smallint,
    p_amount bigint, p_station text, p_terminal text, p_now timestamptz, p_local timestamp)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_day        date := p_local::date;
    v_minute     integer;
    v_day_fen    bigint := 0;
    v_week_fen   bigint := 0;
    v_since_us   bigint;
    v_counts     bigint[];
    v_declines   bigint[];
    v_points     bigint[];
    v_new_term   boolean;
    v_fired      record;   -- fc.risk_fired's answer
BEGIN
    v_minute := extract(hour FROM p_local)::integer * 60 + extract(minute FROM p_local)::integer;
    IF p_st.card_id IS NOT NULL THEN
        SELECT coalesce(sum(f) FILTER (WHERE d = v_day), 0),
               coalesce(sum(f) FILTER (WHERE d > v_day - 7), 0)
          INTO v_day_fen, v_week_fen
          FROM unnest(p_st.day_list, p_st.day_fens) AS x(d, f);
        v_since_us := fc.ts(p_now) - fc.ts(p_st.last_at);
        v_new_term := NOT (p_terminal = ANY (p_st.terminals));
    ELSE
        p_st.n_auths := 0;
        v_new_term := true;
    END IF;
    -- Times are kept oldest first: how many are later than the start of
    -- a window is a binary search (width_bucket counts those at or before).
    SELECT array_agg(cardinality(p_st.auth_times)
                     - width_bucket(p_now - make_interval(secs => w), p_st.auth_times) ORDER BY i),
           array_agg(cardinality(p_st.decline_times)
                     - width_bucket(p_now - make_interval(secs => w), p_st.decline_times) ORDER BY i)
      INTO v_counts, v_declines
      FROM unnest(p_windows) WITH ORDINALITY AS u(w, i);
    IF p_has_points THEN
        SELECT array_agg((SELECT coalesce(sum(x.pts), 0) FROM unnest(p_red_at, p_red_pts) x(t, pts)
                           WHERE x.t > p_now - make_interval(secs => w)) ORDER BY i)
          INTO v_points
          FROM unnest(p_windows) WITH ORDINALITY AS u(w, i)
         WHERE p_red_at IS NOT NULL;
    END IF;
    v_fired := fc.risk_fired(p_set_id, p_tier, p_account_kind, p_amount, p_station, p_terminal,
                             v_minute, v_day_fen, v_week_fen, v_since_us, p_dist_m, v_new_term,
                             p_st.n_auths, v_counts, v_declines, v_points);
    RETURN jsonb_build_object(
        'decision', CASE
            WHEN v_fired.o_action = fc.risk_decision_decline() OR v_fired.o_score >= p_decline_score
                THEN 'DECLINE'
            WHEN v_fired.o_action = fc.risk_decision_review() OR v_fired.o_score >= p_review_score
                THEN 'REVIEW'
            ELSE 'APPROVE' END,
        'score', v_fired.o_score, 'rules', v_fired.o_fired, 'version', p_set_id, 'fallback', false);
END $$;

-- Which rules of set p_set_id fire on these features, in one pass over the set: their ids in
-- order (o_fired), their summed score (o_score) and their strongest action (o_action: 0 when
-- they only score, else a RiskDecision). The kinds are fuelcard_server.risk.model.KINDS;
-- p_counts, p_declines and p_points hold one value per window of the set (r.widx).
CREATE OR REPLACE FUNCTION fc.risk_fired(
    p_set_id integer, p_tier smallint, p_account_kind smallint, p_amount bigint,
    p_station text, p_terminal text, p_minute integer, p_day_fen bigint, p_week_fen bigint,
    p_since_us bigint, p_dist_m double precision, p_new_term boolean, p_n_auths integer,
    p_counts bigint[], p_declines bigint[], p_points bigint[],
    OUT o_fired text[], OUT o_score bigint, OUT o_action integer)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT coalesce(array_agg(r.rule_id ORDER BY r.ord), '{}'), coalesce(sum(r.score), 0),
           coalesce(max(r.action), 0)
      INTO o_fired, o_score, o_action
      FROM fc.risk_rules r
     WHERE r.rule_set_id = p_set_id
       AND (r.tiers IS NULL OR p_tier = ANY (r.tiers))
       AND (r.account_kinds IS NULL OR p_account_kind = ANY (r.account_kinds))
       AND CASE r.kind
             WHEN 1 THEN p_amount >= r.threshold                          -- amount
             WHEN 2 THEN p_day_fen + p_amount >= r.threshold              -- daily_amount
             WHEN 3 THEN p_week_fen + p_amount >= r.threshold             -- weekly_amount
             WHEN 4 THEN p_counts[r.widx] + 1 >= r.threshold              -- velocity
             WHEN 5 THEN p_since_us < r.window_s::bigint * 1000000        -- min_interval
             WHEN 6 THEN p_dist_m >= r.threshold                          -- impossible_travel
                         AND p_dist_m * 3.6e6 > r.speed_kmh * greatest(p_since_us, 1000000)
             WHEN 7 THEN p_new_term AND p_n_auths >= r.threshold          -- new_terminal
             WHEN 8 THEN p_station = ANY (r.stations) OR p_terminal = ANY (r.terminals)  -- watchlist
             WHEN 9 THEN p_declines[r.widx] >= r.threshold                -- decline_streak
             WHEN 10 THEN p_amount >= r.threshold                         -- night_amount
                          AND CASE WHEN r.minute_from <= r.minute_to
                                   THEN p_minute >= r.minute_from AND p_minute < r.minute_to
                                   ELSE p_minute >= r.minute_from OR p_minute < r.minute_to END
             WHEN 11 THEN p_points[r.widx] >= r.threshold                 -- points_redemption
             WHEN 99 THEN 1 / r.threshold > 0                             -- fault (tests)
           END;
END $$;

-- Record an authorization in the card's risk state: p_held (a hold was made,
-- approved or suspended) or a decline. The caller holds the account's lock.
-- Times are appended oldest first, never before the last one (two server
-- processes' clocks may differ by a little), so the arrays stay sorted.
-- p_day: the local day of p_now.
CREATE OR REPLACE FUNCTION fc.risk_note(p_card_id bigint, p_held boolean, p_amount bigint,
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

-- Review of suspended holds (RiskService.ReviewHold).
------------------------------------------------------------------------------

-- Approve (-> AUTHORIZED, expiring p_ttl from now: the pump gets its full
-- window) or reject (-> REJECTED, money released) a suspended hold.
CREATE OR REPLACE FUNCTION fc.review_hold(
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
    IF v_hold.state <> fc.hold_state_suspended() THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_NOT_SUSPENDED', DETAIL = 'hold_id';
    ELSIF v_hold.expires_at <= p_now THEN
        -- Too late: the sweeper releases it like any expired hold.
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_EXPIRED', DETAIL = 'hold_id';
    END IF;
    IF p_approve THEN
        UPDATE fc.holds SET state = fc.hold_state_authorized(), expires_at = p_now + p_ttl,
                            review_state = fc.review_state_approved(),
                            reviewed_by = p_reviewer, reviewed_at = p_now, review_note = p_note
         WHERE id = v_hold.id RETURNING * INTO v_hold;
    ELSE
        UPDATE fc.holds SET state = fc.hold_state_rejected(), closed_at = p_now,
                            review_state = fc.review_state_rejected(),
                            reviewed_by = p_reviewer, reviewed_at = p_now, review_note = p_note
         WHERE id = v_hold.id RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen - v_hold.amount_fen WHERE id = v_hold.account_id;
        PERFORM fc.charge_usage(v_hold.card_id, v_spender_id, v_parent_id, v_hold.usage_day,
                                -v_hold.amount_fen);
    END IF;
    v_response := jsonb_build_object('hold', fc.hold_json(v_hold));
    RETURN fc.remember(p_caller, p_request_id, 'review_hold', p_request_hash, v_response, p_now);
END $$;
