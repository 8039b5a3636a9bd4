-- Posted prices (挂牌价) and litre caps (issue 14, item 4): the price table ControlService
-- writes and reads, what fc.confirm checks a pump's figures against, and the litre caps of a
-- card that fc.authorize checks and fc.confirm charges.
--
-- Sinopec and WEX put litre caps on fleet cards: per fill, per day, per month. The pump is
-- preset in money here (Authorize carries no volume), so a litre cap is checked at
-- authorize by turning the amount into litres at the station's posted price (the per-fill
-- cap is the preset in litres), and the day's and month's litres are charged at confirm
-- with the volume the pump measured. Without a posted price for the station and product
-- the amount cannot be turned into litres: a card whose day or month is already used up
-- is declined all the same; otherwise the confirm counts what was sold.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- The price of p_product at p_station_id in force at p_at (fen per litre), NULL if none.
-- PL/pgSQL, not SQL: a SQL function with a FROM is not inlined, and is parsed and planned
-- again at every call of the statement that calls it (fc.settle_sale, on every confirm);
-- PL/pgSQL keeps its plan for the session (issue 14: the pump path's cost).
CREATE OR REPLACE FUNCTION fc.posted_price(p_station_id text, p_product smallint,
                                           p_at timestamptz)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT unit_price_fen FROM fc.prices
             WHERE station_id = p_station_id AND product = p_product AND effective_at <= p_at
             ORDER BY effective_at DESC LIMIT 1);
END $$;

-- SetPrice: the price from p_effective on. Setting the same row again (same station,
-- product and moment) replaces its price: a correction before it takes effect.
CREATE OR REPLACE FUNCTION fc.set_price(p_caller text, p_request_id text, p_request_hash bytea,
                                        p_station_id text, p_product smallint,
                                        p_effective timestamptz, p_unit_price_fen bigint,
                                        p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_price    fc.prices;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    INSERT INTO fc.prices (station_id, product, effective_at, unit_price_fen, set_by, created_at)
    VALUES (p_station_id, p_product, p_effective, p_unit_price_fen, p_caller, p_now)
    ON CONFLICT (station_id, product, effective_at) DO UPDATE
       SET unit_price_fen = EXCLUDED.unit_price_fen, set_by = EXCLUDED.set_by,
           created_at = EXCLUDED.created_at
    RETURNING * INTO v_price;
    RETURN fc.remember(p_caller, p_request_id, 'set_price', p_request_hash,
                       jsonb_build_object('price', fc.price_json(v_price)), p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.price_json(p fc.prices) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('station_id', p.station_id, 'product', p.product,
                              'effective_us', fc.ts(p.effective_at),
                              'unit_price_fen', p.unit_price_fen, 'set_by', p.set_by)
$$;

-- SetVolumeLimits: a card's litre caps (0: none), by its account's parent, as
-- SetSpendingLimits; recorded as a control change.
CREATE OR REPLACE FUNCTION fc.set_volume_limits(
    p_caller text, p_request_id text, p_request_hash bytea, p_actor_uid uuid, p_card_uid uuid,
    p_fill_ml bigint, p_daily_ml bigint, p_monthly_ml bigint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_target   record;
    v_actor    bigint;
    v_limits   jsonb := jsonb_build_object('per_fill_ml', p_fill_ml, 'daily_ml', p_daily_ml,
                                           'monthly_ml', p_monthly_ml);
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    v_target := fc.resolve_target(p_card_uid, NULL);
    v_actor := fc.require_controller(p_actor_uid, v_target.o_account);
    PERFORM fc.lock_chain((v_target.o_account).id);
    UPDATE fc.cards SET limit_fill_ml = nullif(p_fill_ml, 0), limit_daily_ml = nullif(p_daily_ml, 0),
                        limit_monthly_ml = nullif(p_monthly_ml, 0)
     WHERE id = (v_target.o_card).id;
    INSERT INTO fc.control_changes (actor_account_id, kind, card_id, account_id, details, created_at)
    VALUES (v_actor, 'volume_limits', (v_target.o_card).id, (v_target.o_account).id, v_limits,
            p_now);
    RETURN fc.remember(p_caller, p_request_id, 'set_volume_limits', p_request_hash,
                       jsonb_build_object('limits', v_limits), p_now);
END $$;

-- Why card c may not take p_amount (fen) of p_product at p_station_id for its litre caps:
-- LIMIT_VOLUME_PER_FILL, LIMIT_VOLUME_DAILY, LIMIT_VOLUME_MONTHLY, or NULL. The amount in
-- litres is at the posted price; without one, only a day or month already used up refuses.
-- fc.room_refusal calls it only for a card with a litre cap.
CREATE OR REPLACE FUNCTION fc.volume_refusal(c fc.cards, p_station_id text, p_product smallint,
                                             p_amount bigint, p_day date, p_now timestamptz)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_price bigint := fc.posted_price(p_station_id, p_product, p_now);
    v_ml    bigint;   -- the amount in millilitres, 0 without a price
    v_day   bigint;
    v_month bigint;
BEGIN
    v_ml := CASE WHEN v_price IS NULL THEN 0 ELSE p_amount * 1000 / v_price END;
    IF c.limit_fill_ml < v_ml THEN
        RETURN 'LIMIT_VOLUME_PER_FILL';
    END IF;
    SELECT coalesce(sum(volume_ml) FILTER (WHERE day = p_day), 0), coalesce(sum(volume_ml), 0)
      INTO v_day, v_month FROM fc.volume_usage
     WHERE card_id = c.id AND day >= date_trunc('month', p_day)::date AND day <= p_day;
    IF c.limit_daily_ml <= v_day OR c.limit_daily_ml < v_day + v_ml THEN
        RETURN 'LIMIT_VOLUME_DAILY';
    ELSIF c.limit_monthly_ml <= v_month OR c.limit_monthly_ml < v_month + v_ml THEN
        RETURN 'LIMIT_VOLUME_MONTHLY';
    END IF;
    RETURN NULL;
END $$;

-- What fc.confirm records of a sale's figures beyond its money (fc.settle_sale, once the
-- sale is booked): whether volume x unit price is the amount within one fen, whether the
-- unit price is the posted one (p_posted, NULL: none posted), and, for a card with litre
-- caps, the volume charged to its day's litres. Writes only when there is something to
-- write: the common sale adds up and has no litre caps. Returns the hold as updated.
CREATE OR REPLACE FUNCTION fc.note_sale_figures(h fc.holds, p_posted bigint, p_counts boolean)
RETURNS fc.holds
LANGUAGE plpgsql AS $$
DECLARE
    v_amount_off boolean := h.volume_ml > 0 AND h.unit_price_fen > 0
                            AND abs(h.volume_ml * h.unit_price_fen / 1000.0 - h.settled_fen) > 1;
    v_price_off  boolean := h.unit_price_fen > 0 AND p_posted <> h.unit_price_fen;
BEGIN
    IF p_counts AND h.volume_ml > 0 THEN
        INSERT INTO fc.volume_usage (card_id, day, volume_ml) VALUES (h.card_id, h.usage_day, h.volume_ml)
        ON CONFLICT (card_id, day) DO UPDATE
           SET volume_ml = fc.volume_usage.volume_ml + EXCLUDED.volume_ml;
    ELSE
        p_counts := false;
    END IF;
    IF v_amount_off OR coalesce(v_price_off, false) OR p_counts THEN
        UPDATE fc.holds SET amount_mismatch = v_amount_off,
                            price_mismatch = coalesce(v_price_off, false), volume_counted = p_counts
         WHERE id = h.id RETURNING * INTO h;
    END IF;
    RETURN h;
END $$;

-- A card's litre caps and its litres today and this month (p_day's), for GetSpendingLimits.
CREATE OR REPLACE FUNCTION fc.volume_limits_json(c fc.cards, p_day date) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'volume_limits', jsonb_build_object('per_fill_ml', coalesce(c.limit_fill_ml, 0),
                                            'daily_ml', coalesce(c.limit_daily_ml, 0),
                                            'monthly_ml', coalesce(c.limit_monthly_ml, 0)),
        'used_today_ml', coalesce(sum(u.volume_ml) FILTER (WHERE u.day = p_day), 0),
        'used_this_month_ml', coalesce(sum(u.volume_ml), 0))
      FROM fc.volume_usage u
     WHERE u.card_id = c.id AND u.day >= date_trunc('month', p_day)::date AND u.day <= p_day
$$;
