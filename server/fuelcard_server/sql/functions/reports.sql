-- One bounded batch of the cost rollup (cost_rollup.py): the purchase entries after
-- fc.cost_rollup_state.rolled_id, up to p_limit ids and never past the journal chain's head
-- (ids up to it are final, so a later commit cannot land below the watermark), added to
-- fc.vehicle_costs per vehicle and UTC day and month of the hold's closed_at (a late confirm
-- keeps the expiry as closed_at, which the report goes by, not the entry's created_at).
-- Returns how many journal ids the watermark moved.
CREATE OR REPLACE FUNCTION fc.roll_up_costs(p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_from bigint;
    v_to bigint;
BEGIN
    SELECT rolled_id INTO STRICT v_from FROM fc.cost_rollup_state FOR UPDATE;
    SELECT least(coalesce(max(entry_id), 0), v_from + p_limit) INTO v_to FROM fc.journal_chain;
    IF v_to <= v_from THEN
        RETURN 0;
    END IF;
    INSERT INTO fc.vehicle_costs AS c (vehicle_id, grain, bucket, spend_fen, volume_ml, sale_count,
                                       first_hold_id, last_hold_id)
    SELECT h.spender_account_id, g.grain,
           date_trunc(CASE g.grain WHEN 1 THEN 'day' ELSE 'month' END, h.closed_at, 'UTC'),
           sum(h.settled_fen), sum(h.volume_ml), count(*), min(h.id), max(h.id)
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
           last_hold_id = greatest(c.last_hold_id, excluded.last_hold_id);
    UPDATE fc.cost_rollup_state SET rolled_id = v_to;
    RETURN (v_to - v_from)::integer;
END $$;
