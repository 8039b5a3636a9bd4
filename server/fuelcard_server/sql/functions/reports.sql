-- The minute of the day (0-1439) at which a sale closed, in the given time zone (the business
-- time zone: fc.business_tz()); what fc.vehicle_costs.fill_minutes holds.
CREATE OR REPLACE FUNCTION fc.minute_of_day(p_at timestamptz, p_tz text)
RETURNS smallint
LANGUAGE sql IMMUTABLE AS $$
    SELECT (extract(hour FROM p_at AT TIME ZONE p_tz) * 60
            + extract(minute FROM p_at AT TIME ZONE p_tz))::smallint
$$;

-- Whether a minute of the day is inside working hours [p_start, p_end): a window with
-- p_start > p_end runs over midnight (a night shift).
CREATE OR REPLACE FUNCTION fc.within_hours(p_minute integer, p_start integer, p_end integer)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_start < p_end THEN p_minute >= p_start AND p_minute < p_end
                ELSE p_minute >= p_start OR p_minute < p_end END
$$;

-- Where a rollup's next batch ends: p_limit journal ids after p_after, never past the journal
-- chain's head (ids up to it are final: no transaction can still commit one below it, so a
-- watermark there never skips an entry). Both rollups (fc.roll_up_costs,
-- fc.roll_up_statements) take their batches from here.
CREATE OR REPLACE FUNCTION fc.rollup_batch_end(p_after bigint, p_limit integer)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT least(coalesce(max(entry_id), 0), p_after + p_limit) FROM fc.journal_chain
$$;

-- One bounded batch of the cost rollup (cost_rollup.py): the purchase entries after
-- fc.cost_rollup_state.rolled_id, up to p_limit ids and never past the journal chain's head
-- (ids up to it are final, so a later commit cannot land below the watermark), added to
-- fc.vehicle_costs per vehicle and business day and month (fc.business_tz()) of the hold's
-- closed_at (a late confirm keeps the expiry as closed_at, which the report goes by, not the
-- entry's created_at), with the largest fill and the minutes of the day the fills closed at
-- (the report's fill flags).
-- Returns how many journal ids the watermark moved.
CREATE OR REPLACE FUNCTION fc.roll_up_costs(p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_from bigint;
    v_to bigint;
    v_tz text := fc.business_tz();
BEGIN
    SELECT rolled_id INTO STRICT v_from FROM fc.cost_rollup_state FOR UPDATE;
    v_to := fc.rollup_batch_end(p_after => v_from, p_limit => p_limit);
    IF v_to <= v_from THEN
        RETURN 0;
    END IF;
    INSERT INTO fc.vehicle_costs AS c (vehicle_id, grain, bucket, spend_fen, volume_ml, sale_count,
                                       first_hold_id, last_hold_id, max_fill_ml, fill_minutes)
    SELECT h.spender_account_id, g.grain,
           date_trunc(CASE g.grain WHEN 1 THEN 'day' ELSE 'month' END, h.closed_at, v_tz),
           sum(h.settled_fen), sum(h.volume_ml), count(*), min(h.id), max(h.id), max(h.volume_ml),
           array_agg(DISTINCT fc.minute_of_day(p_at => h.closed_at, p_tz => v_tz)
                     ORDER BY fc.minute_of_day(p_at => h.closed_at, p_tz => v_tz))
      FROM fc.journal j
      JOIN fc.holds h ON h.id = j.hold_id
     CROSS JOIN (VALUES (1::smallint), (2::smallint)) g (grain)
     WHERE j.id > v_from AND j.id <= v_to
       AND j.kind = fc.ledger_entry_kind_purchase()
       AND h.state = fc.hold_state_confirmed()
     GROUP BY 1, 2, 3
    ON CONFLICT (vehicle_id, grain, bucket) DO UPDATE
       SET spend_fen = c.spend_fen + excluded.spend_fen,
           volume_ml = c.volume_ml + excluded.volume_ml,
           sale_count = c.sale_count + excluded.sale_count,
           first_hold_id = least(c.first_hold_id, excluded.first_hold_id),
           last_hold_id = greatest(c.last_hold_id, excluded.last_hold_id),
           max_fill_ml = greatest(c.max_fill_ml, excluded.max_fill_ml),
           fill_minutes = ARRAY(SELECT DISTINCT m FROM unnest(c.fill_minutes || excluded.fill_minutes) m
                                ORDER BY m);
    UPDATE fc.cost_rollup_state SET rolled_id = v_to;
    RETURN (v_to - v_from)::integer;
END $$;
