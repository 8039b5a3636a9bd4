-- Statements and invoices (统一开票): a month's statement of an account family from the
-- journal, invoice requests (on a recharge, or on a month's consumption), their issue by the
-- invoicing provider and their red-letter reversal. The provider is called from Python
-- (invoices.py); these functions record what it answered.
--
-- The same money is never invoiced twice: a top-level account's first invoice request fixes
-- its invoicing mode (fc.invoicing_modes: at recharge, or on consumption), and every invoice
-- references its account's mode by foreign key. A request takes the account's advisory lock
-- (lock order: account ids, as everywhere) so that two requests for the same month or the same
-- recharge, or the first two of different kinds, run one after the other.
--
-- Named tax_invoices.sql so that it is applied after ledger.sql (files go in name order), whose
-- fc.refuse_change and fc.business_tz it uses.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- A mode is chosen once: changing it would let money invoiced one way be invoiced the other.
CREATE OR REPLACE TRIGGER invoicing_modes_fixed BEFORE UPDATE OR DELETE ON fc.invoicing_modes
    FOR EACH ROW EXECUTE FUNCTION fc.refuse_change();

-- What an invoice says about a product: its item name (*category*name), the 19-digit tax
-- classification code (商品和服务税收分类编码; the finance team confirms these against the
-- current code table before going live), its unit, and its VAT rate in basis points: 13 % on
-- refined oil products and shop goods, 9 % on natural gas.
CREATE OR REPLACE FUNCTION fc.invoice_product(p_product smallint)
RETURNS TABLE (name text, tax_code text, unit text, rate_bp smallint)
LANGUAGE sql IMMUTABLE AS $$
    SELECT v.name, v.tax_code, v.unit, v.rate_bp::smallint
      FROM (VALUES (1, '*汽油*92#', '1070101010100000000', '升', 1300),
                   (2, '*汽油*95#', '1070101010100000000', '升', 1300),
                   (3, '*汽油*98#', '1070101010100000000', '升', 1300),
                   (4, '*柴油*0#', '1070101030100000000', '升', 1300),
                   (5, '*柴油*-10#', '1070101030100000000', '升', 1300),
                   (6, '*天然气*车用天然气', '1100301010000000000', '升', 900),
                   (7, '*日用杂品*便利店商品', '1060512990000000000', '', 1300))
           AS v(product, name, tax_code, unit, rate_bp)
     WHERE v.product = p_product
$$;

-- The VAT inside a tax-inclusive amount, in whole fen: total * rate / (1 + rate), rounded half
-- up (numeric: exact, and round() takes halves away from zero, which is up for amounts > 0).
CREATE OR REPLACE FUNCTION fc.vat_in(p_total_fen bigint, p_rate_bp integer) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT round(p_total_fen::numeric * p_rate_bp / (10000 + p_rate_bp))::bigint
$$;

-- The first instant of a business month (its first day at midnight in the business time zone).
CREATE OR REPLACE FUNCTION fc.month_start(p_month date) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT (date_trunc('month', p_month)::date)::timestamp AT TIME ZONE fc.business_tz()
$$;

-- A month's statement of a top-level account and its sub-accounts: one row per account, from
-- the journal's money entries (asset 1). Sales are counted twice over, on purpose: by who
-- bought (the card's account, `sales_fen`) and by whose balance paid (`sales_charged_fen`);
-- the balance columns follow the second. Every movement of the family's accounts in the month
-- lands in exactly one column, so the columns' sums are the journal's.
--
-- The balances are not summed over the family's whole history (a fleet of 10 000 vehicles has
-- over a million entries: a second per visit): a customer account's balance_fen is the sum of
-- its journal entries (`fuelcard verify` checks it, and both change in one transaction, so one
-- snapshot sees them agree), so closing = balance_fen - what moved since the month's end, and
-- opening = closing - what moved in the month. Only entries from the month's start on are read,
-- found by the BRIN index journal_by_time (migration 0017).
CREATE OR REPLACE FUNCTION fc.statement_lines(p_account_id bigint, p_month date)
RETURNS TABLE (account_uid uuid, label text, top_level boolean, opening_fen bigint,
               recharges_fen bigint, transfers_fen bigint, sales_fen bigint,
               sales_volume_ml bigint, sale_count bigint, sales_charged_fen bigint,
               refunds_fen bigint, other_fen bigint, closing_fen bigint)
LANGUAGE sql STABLE AS $$
    WITH fam AS (
        SELECT id, uid, label, parent_id, balance_fen FROM fc.accounts
         WHERE id = p_account_id OR parent_id = p_account_id),
    b AS (SELECT fc.month_start(p_month) AS s,
                 fc.month_start((p_month + interval '1 month')::date) AS e),
    moves AS (
        SELECT j.credit_account_id AS acct, j.amount AS delta, j.kind, j.created_at
          FROM fc.journal j, b
         WHERE j.asset = 1 AND j.created_at >= b.s AND j.credit_account_id IN (SELECT id FROM fam)
        UNION ALL
        SELECT j.debit_account_id, -j.amount, j.kind, j.created_at
          FROM fc.journal j, b
         WHERE j.asset = 1 AND j.created_at >= b.s AND j.debit_account_id IN (SELECT id FROM fam)),
    money AS (
        SELECT m.acct,
               coalesce(sum(m.delta) FILTER (WHERE m.created_at < b.e), 0) AS during,
               coalesce(sum(m.delta) FILTER (WHERE m.created_at < b.e AND m.kind = 1), 0) AS recharged,
               coalesce(sum(m.delta) FILTER (WHERE m.created_at < b.e AND m.kind = 5), 0) AS transfers,
               coalesce(-sum(m.delta) FILTER (WHERE m.created_at < b.e AND m.kind = 2), 0) AS charged,
               coalesce(-sum(m.delta) FILTER (WHERE m.created_at < b.e AND m.kind = 8), 0) AS refunded,
               coalesce(sum(m.delta) FILTER (WHERE m.created_at < b.e
                                               AND m.kind NOT IN (1, 2, 5, 8)), 0) AS other,
               coalesce(sum(m.delta) FILTER (WHERE m.created_at >= b.e), 0) AS since
          FROM moves m, b GROUP BY m.acct),
    bought AS (
        SELECT h.spender_account_id AS acct, sum(j.amount) AS fen, sum(h.volume_ml) AS ml,
               count(*) AS n
          FROM fc.journal j JOIN fc.holds h ON h.id = j.hold_id, b
         WHERE j.kind = 2 AND j.asset = 1 AND j.created_at >= b.s AND j.created_at < b.e
           AND h.spender_account_id IN (SELECT id FROM fam)
         GROUP BY h.spender_account_id)
    SELECT f.uid, f.label, f.parent_id IS NULL,
           (f.balance_fen - coalesce(m.since, 0) - coalesce(m.during, 0))::bigint,
           coalesce(m.recharged, 0)::bigint,
           coalesce(m.transfers, 0)::bigint, coalesce(s.fen, 0)::bigint, coalesce(s.ml, 0)::bigint,
           coalesce(s.n, 0)::bigint, coalesce(m.charged, 0)::bigint, coalesce(m.refunded, 0)::bigint,
           coalesce(m.other, 0)::bigint, (f.balance_fen - coalesce(m.since, 0))::bigint
      FROM fam f LEFT JOIN money m ON m.acct = f.id LEFT JOIN bought s ON s.acct = f.id
     ORDER BY f.parent_id IS NOT NULL, f.label, f.uid
$$;

-- The statement's sums of the money entries with ids in (p_from, p_to], per account and
-- business month (fc.month_start's bounds, in time zone p_tz): what fc.roll_up_statements adds
-- to fc.statement_movements, and what a statement reads for the entries past its watermark.
-- Each entry moves its credit account up and its debit account down; a purchase also counts
-- as a sale of the account whose card bought.
CREATE OR REPLACE FUNCTION fc.statement_movement_sums(p_from bigint, p_to bigint, p_tz text)
RETURNS TABLE (account_id bigint, month date, recharges_fen bigint, transfers_fen bigint,
               charged_fen bigint, refunds_fen bigint, other_fen bigint, sales_fen bigint,
               sales_volume_ml bigint, sale_count bigint)
LANGUAGE sql STABLE AS $$
    WITH e AS (
        SELECT j.kind, j.amount, j.credit_account_id, j.debit_account_id, j.hold_id,
               date_trunc('month', j.created_at AT TIME ZONE p_tz)::date AS month
          FROM fc.journal j
         WHERE j.id > p_from AND j.id <= p_to AND j.asset = fc.asset_money()),
    moves AS (
        SELECT e.credit_account_id AS acct, e.month, e.kind, e.amount AS delta,
               0::bigint AS fen, 0::bigint AS ml, 0 AS n
          FROM e
        UNION ALL
        SELECT e.debit_account_id, e.month, e.kind, -e.amount, 0, 0, 0 FROM e
        UNION ALL
        -- kind 0 (no kind): a sale counted for the buyer, no money moved by it here
        SELECT h.spender_account_id, e.month, 0::smallint, 0, e.amount, h.volume_ml, 1
          FROM e JOIN fc.holds h ON h.id = e.hold_id
         WHERE e.kind = fc.ledger_entry_kind_purchase())
    SELECT m.acct, m.month,
           coalesce(sum(m.delta) FILTER (WHERE m.kind = fc.ledger_entry_kind_recharge()), 0)::bigint,
           coalesce(sum(m.delta) FILTER (WHERE m.kind = fc.ledger_entry_kind_allocation()), 0)::bigint,
           coalesce(-sum(m.delta) FILTER (WHERE m.kind = fc.ledger_entry_kind_purchase()), 0)::bigint,
           coalesce(-sum(m.delta) FILTER (WHERE m.kind = fc.ledger_entry_kind_recharge_refund()),
                    0)::bigint,
           coalesce(sum(m.delta) FILTER (WHERE m.kind NOT IN (
               0, fc.ledger_entry_kind_recharge(), fc.ledger_entry_kind_allocation(),
               fc.ledger_entry_kind_purchase(), fc.ledger_entry_kind_recharge_refund())), 0)::bigint,
           sum(m.fen)::bigint, sum(m.ml)::bigint, sum(m.n)::bigint
      FROM moves m
     GROUP BY m.acct, m.month
$$;

-- The statement rollup's job (statement_rollup.py): adds the money entries past the watermark,
-- up to p_limit ids and never past the journal chain's head (ids up to it are final), to
-- fc.statement_movements and moves the watermark; returns how many ids it moved. Concurrent
-- runs queue on the state row's lock.
CREATE OR REPLACE FUNCTION fc.roll_up_statements(p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_from bigint;
    v_to bigint;
    -- once, not once per entry
    v_tz text := fc.business_tz();
BEGIN
    SELECT rolled_id INTO STRICT v_from FROM fc.statement_rollup_state FOR UPDATE;
    v_to := fc.rollup_batch_end(p_after => v_from, p_limit => p_limit);
    IF v_to <= v_from THEN
        RETURN 0;
    END IF;
    INSERT INTO fc.statement_movements AS m (account_id, month, recharges_fen, transfers_fen,
                                             charged_fen, refunds_fen, other_fen, sales_fen,
                                             sales_volume_ml, sale_count)
    SELECT * FROM fc.statement_movement_sums(p_from => v_from, p_to => v_to, p_tz => v_tz)
    ON CONFLICT (account_id, month) DO UPDATE
       SET recharges_fen = m.recharges_fen + excluded.recharges_fen,
           transfers_fen = m.transfers_fen + excluded.transfers_fen,
           charged_fen = m.charged_fen + excluded.charged_fen,
           refunds_fen = m.refunds_fen + excluded.refunds_fen,
           other_fen = m.other_fen + excluded.other_fen,
           sales_fen = m.sales_fen + excluded.sales_fen,
           sales_volume_ml = m.sales_volume_ml + excluded.sales_volume_ml,
           sale_count = m.sale_count + excluded.sale_count;
    UPDATE fc.statement_rollup_state SET rolled_id = v_to;
    RETURN (v_to - v_from)::integer;
END $$;

-- fc.statement_lines from the rollup: the same lines, to the fen, without reading the month's
-- journal, in no particular order (the caller orders them). In one snapshot: each family
-- account's rolled rows of the month and of the months after it (a few index probes per
-- account, summed per account: no hash of the whole family to spill), and the money entries
-- past the watermark (the rollup's lag, read by the journal's key), so the lines are exact
-- however far behind the rollup is, only slower the further it lags (statements.py falls back
-- to fc.statement_lines past a bound). The month's movement is its rows; what moved since the
-- month's end (to back out from balance_fen) is the later months'.
CREATE OR REPLACE FUNCTION fc.statement_lines_rolled(p_account_id bigint, p_month date)
RETURNS TABLE (account_uid uuid, label text, top_level boolean, opening_fen bigint,
               recharges_fen bigint, transfers_fen bigint, sales_fen bigint,
               sales_volume_ml bigint, sale_count bigint, sales_charged_fen bigint,
               refunds_fen bigint, other_fen bigint, closing_fen bigint)
LANGUAGE sql STABLE AS $$
    WITH fam AS (
        SELECT id, uid, label, parent_id, balance_fen FROM fc.accounts
         WHERE id = p_account_id OR parent_id = p_account_id),
    -- the time zone once (a plpgsql call per journal entry of the tail costs more than the rest)
    mon AS (SELECT date_trunc('month', p_month)::date AS m, fc.business_tz() AS tz),
    tail AS (
        SELECT t.account_id AS acct,
               sum(t.recharges_fen) FILTER (WHERE t.month = mon.m) AS recharged,
               sum(t.transfers_fen) FILTER (WHERE t.month = mon.m) AS transfers,
               sum(t.charged_fen) FILTER (WHERE t.month = mon.m) AS charged,
               sum(t.refunds_fen) FILTER (WHERE t.month = mon.m) AS refunded,
               sum(t.other_fen) FILTER (WHERE t.month = mon.m) AS other,
               sum(t.sales_fen) FILTER (WHERE t.month = mon.m) AS fen,
               sum(t.sales_volume_ml) FILTER (WHERE t.month = mon.m) AS ml,
               sum(t.sale_count) FILTER (WHERE t.month = mon.m) AS n,
               sum(t.recharges_fen + t.transfers_fen - t.charged_fen - t.refunds_fen + t.other_fen)
                   FILTER (WHERE t.month > mon.m) AS since
          FROM mon, fc.statement_rollup_state w
         CROSS JOIN LATERAL fc.statement_movement_sums(
             p_from => w.rolled_id, p_to => 9223372036854775807, p_tz => mon.tz) t
         WHERE t.account_id IN (SELECT id FROM fam) AND t.month >= mon.m
         GROUP BY t.account_id),
    lines AS (
        SELECT f.uid, f.label, f.parent_id,
               f.balance_fen - coalesce(r.since, 0) - coalesce(t.since, 0) AS closing,
               coalesce(r.recharges_fen, 0) + coalesce(t.recharged, 0) AS recharged,
               coalesce(r.transfers_fen, 0) + coalesce(t.transfers, 0) AS transfers,
               coalesce(r.charged_fen, 0) + coalesce(t.charged, 0) AS charged,
               coalesce(r.refunds_fen, 0) + coalesce(t.refunded, 0) AS refunded,
               coalesce(r.other_fen, 0) + coalesce(t.other, 0) AS other,
               coalesce(r.sales_fen, 0) + coalesce(t.fen, 0) AS fen,
               coalesce(r.sales_volume_ml, 0) + coalesce(t.ml, 0) AS ml,
               coalesce(r.sale_count, 0) + coalesce(t.n, 0) AS n
          FROM fam f CROSS JOIN mon
          LEFT JOIN LATERAL (
              SELECT sum(x.recharges_fen) FILTER (WHERE x.month = mon.m) AS recharges_fen,
                     sum(x.transfers_fen) FILTER (WHERE x.month = mon.m) AS transfers_fen,
                     sum(x.charged_fen) FILTER (WHERE x.month = mon.m) AS charged_fen,
                     sum(x.refunds_fen) FILTER (WHERE x.month = mon.m) AS refunds_fen,
                     sum(x.other_fen) FILTER (WHERE x.month = mon.m) AS other_fen,
                     sum(x.sales_fen) FILTER (WHERE x.month = mon.m) AS sales_fen,
                     sum(x.sales_volume_ml) FILTER (WHERE x.month = mon.m) AS sales_volume_ml,
                     sum(x.sale_count) FILTER (WHERE x.month = mon.m) AS sale_count,
                     sum(x.recharges_fen + x.transfers_fen - x.charged_fen - x.refunds_fen
                         + x.other_fen) FILTER (WHERE x.month > mon.m) AS since
                FROM fc.statement_movements x WHERE x.account_id = f.id AND x.month >= mon.m) r ON true
          LEFT JOIN tail t ON t.acct = f.id)
    SELECT l.uid, l.label, l.parent_id IS NULL,
           (l.closing - l.recharged - l.transfers + l.charged + l.refunded - l.other)::bigint,
           l.recharged::bigint, l.transfers::bigint, l.fen::bigint, l.ml::bigint, l.n::bigint,
           l.charged::bigint, l.refunded::bigint, l.other::bigint, l.closing::bigint
      FROM lines l
$$;

-- A month's consumption of an account family, as a consolidated invoice's list: one entry
-- per vehicle (the account whose card bought) and product, from the journal's sales.
CREATE OR REPLACE FUNCTION fc.consumption_entries(p_account_id bigint, p_month date)
RETURNS TABLE (line_no bigint, spender_account_id bigint, product smallint, quantity_ml bigint,
               sale_count bigint, total_fen bigint)
LANGUAGE sql STABLE AS $$
    SELECT row_number() OVER (ORDER BY a.parent_id IS NOT NULL, a.label, h.spender_account_id,
                                       h.product),
           h.spender_account_id, h.product, sum(h.volume_ml)::bigint, count(*),
           sum(j.amount)::bigint
      FROM fc.journal j JOIN fc.holds h ON h.id = j.hold_id
      JOIN fc.accounts a ON a.id = h.spender_account_id
     WHERE j.kind = 2 AND j.asset = 1
       AND j.created_at >= fc.month_start(p_month)
       AND j.created_at < fc.month_start((p_month + interval '1 month')::date)
       AND (a.id = p_account_id OR a.parent_id = p_account_id)
     GROUP BY h.spender_account_id, a.parent_id IS NOT NULL, a.label, h.product
     ORDER BY a.parent_id IS NOT NULL, a.label, h.spender_account_id, h.product
$$;

CREATE OR REPLACE FUNCTION fc.invoice_json(i fc.invoices) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'invoice_id', i.uid, 'account_id', (SELECT uid FROM fc.accounts WHERE id = i.account_id),
        'kind', i.kind, 'type', i.invoice_type, 'state', i.state,
        'month', to_char(i.month, 'YYYY-MM'),
        'recharge_id', (SELECT uid FROM fc.recharges WHERE id = i.recharge_id),
        'buyer_name', i.buyer_name, 'buyer_taxpayer_id', i.buyer_tax_id,
        'amount_fen', i.amount_fen, 'tax_fen', i.tax_fen, 'total_fen', i.total_fen,
        'invoice_number', i.invoice_number, 'red_letter_number', i.red_letter_number,
        'reversal_reason', i.reversal_reason, 'create_us', fc.ts(i.created_at),
        'issue_us', fc.ts(i.issued_at), 'reverse_us', fc.ts(i.reversed_at),
        'refunded_since_fen', (SELECT coalesce(sum(f.amount_fen), 0) FROM fc.refunds f
                                WHERE f.recharge_id = i.recharge_id AND f.created_at > i.created_at),
        'seller_name', (SELECT value FROM fc.config WHERE key = 'invoice_seller_name'),
        'seller_taxpayer_id', (SELECT value FROM fc.config WHERE key = 'invoice_seller_taxpayer_id'),
        'items', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                     'line_no', t.line_no, 'product', t.product, 'name', t.name,
                     'tax_code', t.tax_code, 'unit', t.unit, 'quantity_ml', t.quantity_ml,
                     'amount_fen', t.amount_fen, 'tax_rate_bp', t.tax_rate_bp,
                     'tax_fen', t.tax_fen, 'total_fen', t.total_fen) ORDER BY t.line_no), '[]')
                    FROM fc.invoice_items t WHERE t.invoice_id = i.id),
        'entries', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'line_no', e.line_no, 'account_id', a.uid, 'label', a.label,
                       'product', e.product, 'name', p.name,
                       'quantity_ml', e.quantity_ml, 'sale_count', e.sale_count,
                       'amount_fen', e.amount_fen, 'tax_fen', e.tax_fen, 'total_fen', e.total_fen)
                       ORDER BY e.line_no), '[]')
                      FROM fc.invoice_list_entries e JOIN fc.accounts a ON a.id = e.spender_account_id
                      LEFT JOIN LATERAL fc.invoice_product(e.product) p ON true
                     WHERE e.invoice_id = i.id));
END $$;

-- The checks of an invoice request that depend on its kind, under the account's lock; returns
-- the recharge to invoice (NULL for a consumption invoice) and what is left of it.
CREATE OR REPLACE FUNCTION fc.invoice_request_checks(p_account_id bigint, p_kind smallint,
                                                     p_type smallint, p_month date,
                                                     p_recharge_uid uuid, p_now timestamptz,
                                                     OUT o_recharge_id bigint, OUT o_left_fen bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_mode smallint;
BEGIN
    SELECT mode INTO v_mode FROM fc.invoicing_modes WHERE account_id = p_account_id;
    IF v_mode IS NOT NULL AND v_mode <> p_kind THEN
        -- this account's money is invoiced the other way: invoicing it now would invoice it twice
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'INVOICING_MODE_CONFLICT', DETAIL = 'kind';
    END IF;
    IF p_kind = 2 THEN
        IF fc.month_start((p_month + interval '1 month')::date) > p_now THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'MONTH_NOT_ENDED', DETAIL = 'month';
        END IF;
        IF EXISTS (SELECT 1 FROM fc.invoices WHERE account_id = p_account_id AND kind = 2
                      AND month = p_month AND state IN (1, 2)) THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'MONTH_ALREADY_INVOICED', DETAIL = 'month';
        END IF;
        RETURN;
    END IF;
    IF p_type = 2 THEN
        -- 单用途卡: no special VAT invoice when a card is loaded
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'SPECIAL_INVOICE_NOT_AT_RECHARGE',
            DETAIL = 'type';
    END IF;
    SELECT r.id, r.amount_fen - coalesce((SELECT sum(f.amount_fen) FROM fc.refunds f
                                           WHERE f.recharge_id = r.id), 0)
      INTO o_recharge_id, o_left_fen
      FROM fc.recharges r JOIN fc.accounts a ON a.id = r.account_id
     WHERE r.uid = p_recharge_uid AND (a.id = p_account_id OR a.parent_id = p_account_id);
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'RECHARGE_NOT_FOUND', DETAIL = 'recharge';
    END IF;
    IF EXISTS (SELECT 1 FROM fc.invoices WHERE recharge_id = o_recharge_id AND state IN (1, 2)) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'RECHARGE_ALREADY_INVOICED',
            DETAIL = 'recharge_id';
    END IF;
    IF o_left_fen <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'NOTHING_TO_INVOICE', DETAIL = 'recharge_id';
    END IF;
END $$;

-- The items and list of a consumption invoice: tax per list entry (one vehicle, one product),
-- rounded half up; an item is the sum of its product's entries, the invoice of its items.
CREATE OR REPLACE FUNCTION fc.fill_consumption_invoice(p_invoice_id bigint, p_account_id bigint,
                                                       p_month date)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.invoice_list_entries (invoice_id, line_no, spender_account_id, product,
                                         quantity_ml, sale_count, amount_fen, tax_fen, total_fen)
    SELECT p_invoice_id, c.line_no, c.spender_account_id, c.product, c.quantity_ml,
           c.sale_count, c.total_fen - t.tax, t.tax, c.total_fen
      FROM fc.consumption_entries(p_account_id => p_account_id, p_month => p_month) c
     CROSS JOIN LATERAL (SELECT fc.vat_in(p_total_fen => c.total_fen, p_rate_bp => p.rate_bp) AS tax
                           FROM fc.invoice_product(c.product) p) t;
    IF EXISTS (SELECT 1 FROM fc.invoice_list_entries e
                WHERE e.invoice_id = p_invoice_id AND e.product <> 7
                GROUP BY e.product HAVING sum(e.quantity_ml) = 0) THEN
        -- a fuel item must state its litres; a sale confirmed without a volume cannot be invoiced
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'SALES_WITHOUT_LITRES', DETAIL = 'month';
    END IF;
    INSERT INTO fc.invoice_items (invoice_id, line_no, product, name, tax_code, unit, quantity_ml,
                                  amount_fen, tax_rate_bp, tax_fen, total_fen)
    SELECT p_invoice_id, row_number() OVER (ORDER BY e.product), e.product, p.name, p.tax_code,
           p.unit, sum(e.quantity_ml), sum(e.amount_fen), p.rate_bp, sum(e.tax_fen), sum(e.total_fen)
      FROM fc.invoice_list_entries e CROSS JOIN LATERAL fc.invoice_product(e.product) p
     WHERE e.invoice_id = p_invoice_id
     GROUP BY e.product, p.name, p.tax_code, p.unit, p.rate_bp;
    UPDATE fc.invoices i
       SET (amount_fen, tax_fen, total_fen) = (SELECT sum(t.amount_fen), sum(t.tax_fen), sum(t.total_fen)
                                                 FROM fc.invoice_items t WHERE t.invoice_id = i.id)
     WHERE i.id = p_invoice_id;
END $$;

-- RequestInvoice: idempotent on request_id, also for a twin sent while the first was in
-- flight (the key is looked up again after the account lock). The invoice row is written with
-- the month's total first (amounts must be positive), then its list and items, then its sums.
CREATE OR REPLACE FUNCTION fc.request_invoice(p_caller text, p_request_id text, p_request_hash bytea,
                                              p_account_uid uuid, p_kind smallint, p_type smallint,
                                              p_month date, p_recharge_uid uuid, p_buyer_name text,
                                              p_buyer_tax_id text, p_requested_by text,
                                              p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_account  fc.accounts;
    v_check    record;
    v_total    bigint;
    v_invoice  fc.invoices;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account';
    END IF;
    IF v_account.parent_id IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'NOT_A_TOP_LEVEL_ACCOUNT',
            DETAIL = 'account_id';
    END IF;
    PERFORM pg_advisory_xact_lock(v_account.id);
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_check FROM fc.invoice_request_checks(
        p_account_id => v_account.id, p_kind => p_kind, p_type => p_type, p_month => p_month,
        p_recharge_uid => p_recharge_uid, p_now => p_now);
    IF p_kind = 2 THEN
        SELECT sum(c.total_fen) INTO v_total
          FROM fc.consumption_entries(p_account_id => v_account.id, p_month => p_month) c;
        IF v_total IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'NOTHING_TO_INVOICE', DETAIL = 'month';
        END IF;
    ELSE
        v_total := v_check.o_left_fen;
    END IF;
    INSERT INTO fc.invoicing_modes (account_id, mode, chosen_at)
    VALUES (v_account.id, p_kind, p_now) ON CONFLICT (account_id) DO NOTHING;
    INSERT INTO fc.invoices (account_id, kind, invoice_type, month, recharge_id, buyer_name,
                             buyer_tax_id, amount_fen, tax_fen, total_fen, created_at, requested_by)
    VALUES (v_account.id, p_kind, p_type, CASE WHEN p_kind = 2 THEN p_month END,
            v_check.o_recharge_id, p_buyer_name, p_buyer_tax_id, v_total, 0, v_total, p_now,
            p_requested_by)
    RETURNING * INTO v_invoice;
    IF p_kind = 2 THEN
        PERFORM fc.fill_consumption_invoice(p_invoice_id => v_invoice.id,
                                            p_account_id => v_account.id, p_month => p_month);
        SELECT * INTO v_invoice FROM fc.invoices WHERE id = v_invoice.id;
    ELSE
        INSERT INTO fc.invoice_items (invoice_id, line_no, name, tax_code, amount_fen, tax_fen,
                                      total_fen)
        VALUES (v_invoice.id, 1, '*预付卡销售和充值*加油卡充值', '6010000000000000000',
                v_total, 0, v_total);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'request_invoice', p_request_hash,
                       jsonb_build_object('invoice', fc.invoice_json(v_invoice)), p_now);
END $$;

-- IssueInvoice and ReverseInvoice record what the provider answered: REQUESTED -> ISSUED with
-- its number, ISSUED -> RED_LETTER with the red-letter invoice's number. Idempotent on
-- request_id, also for a twin that waited for the row lock. A NULL number means the server did
-- not call the provider (it found the invoice past that state): only a replay can answer then.
CREATE OR REPLACE FUNCTION fc.advance_invoice(p_caller text, p_request_id text,
                                              p_request_hash bytea, p_invoice_uid uuid,
                                              p_to_state smallint, p_number text, p_reason text,
                                              p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_invoice  fc.invoices;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_invoice FROM fc.invoices WHERE uid = p_invoice_uid FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'INVOICE_NOT_FOUND', DETAIL = 'invoice';
    END IF;
    IF v_invoice.state <> p_to_state - 1 OR p_number IS NULL THEN
        v_response := fc.replay(p_caller, p_request_id, p_request_hash);
        IF v_response IS NOT NULL THEN
            RETURN v_response;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', DETAIL = 'invoice_id',
            MESSAGE = CASE p_to_state WHEN 2 THEN 'INVOICE_NOT_REQUESTED' ELSE 'INVOICE_NOT_ISSUED' END;
    END IF;
    IF p_to_state = 2 THEN
        UPDATE fc.invoices SET state = 2, invoice_number = p_number, issued_at = p_now
         WHERE id = v_invoice.id RETURNING * INTO v_invoice;
    ELSE
        UPDATE fc.invoices
           SET state = 3, red_letter_number = p_number, reversal_reason = p_reason, reversed_at = p_now
         WHERE id = v_invoice.id RETURNING * INTO v_invoice;
    END IF;
    RETURN fc.remember(p_caller, p_request_id,
                       CASE p_to_state WHEN 2 THEN 'issue_invoice' ELSE 'reverse_invoice' END,
                       p_request_hash, jsonb_build_object('invoice', fc.invoice_json(v_invoice)), p_now);
END $$;
