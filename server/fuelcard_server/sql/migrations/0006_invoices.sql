-- Invoices (统一开票): invoice requests and what they cover, and the invoicing mode that keeps
-- the same money from being invoiced twice (functions/tax_invoices.sql holds the functions, invoices.py and
-- services/invoice.py the rest).

-- table: fc.invoicing_modes
-- How a top-level account's money is invoiced, chosen by its first invoice request and never
-- changed: 1 at recharge (an ordinary invoice marked 不征税, 预付卡销售和充值), 2 on consumption
-- (the month's sales, ordinary or special VAT invoice). One mode per account is the whole
-- guarantee that no fen is invoiced both when loaded and when spent: every invoice names its
-- account's mode through the foreign key below, so an invoice of the other kind cannot exist.
CREATE TABLE fc.invoicing_modes (
    account_id bigint PRIMARY KEY REFERENCES fc.accounts (id),
    mode smallint NOT NULL CHECK (mode IN (1, 2)),
    chosen_at timestamp with time zone NOT NULL,
    UNIQUE (account_id, mode)
);

-- table: fc.invoices
-- Kinds (= the mode they belong to): 1 recharge, 2 consumption. Types: 1 ordinary (普通发票),
-- 2 special (增值税专用发票). States: 1 REQUESTED, 2 ISSUED, 3 RED_LETTER (reversed).
-- Amounts in fen: amount before tax, tax, and total (价税合计), each the sum of the items'.
CREATE TABLE fc.invoices (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    account_id bigint NOT NULL,
    kind smallint NOT NULL CHECK (kind IN (1, 2)),
    invoice_type smallint NOT NULL CHECK (invoice_type IN (1, 2)),
    state smallint NOT NULL DEFAULT 1 CHECK (state IN (1, 2, 3)),
    month date,
    recharge_id bigint REFERENCES fc.recharges (id),
    buyer_name text NOT NULL CHECK (buyer_name <> ''),
    buyer_tax_id text NOT NULL DEFAULT '',
    amount_fen bigint NOT NULL CHECK (amount_fen > 0),
    tax_fen bigint NOT NULL CHECK (tax_fen >= 0),
    total_fen bigint NOT NULL,
    invoice_number text,
    red_letter_number text,
    reversal_reason text,
    created_at timestamp with time zone NOT NULL,
    issued_at timestamp with time zone,
    reversed_at timestamp with time zone,
    requested_by text NOT NULL,
    CONSTRAINT invoice_follows_account_mode FOREIGN KEY (account_id, kind)
        REFERENCES fc.invoicing_modes (account_id, mode),
    CONSTRAINT recharge_invoice_is_ordinary_and_untaxed CHECK (kind <> 1 OR (
        invoice_type = 1 AND tax_fen = 0 AND recharge_id IS NOT NULL AND month IS NULL)),
    CONSTRAINT consumption_invoice_names_a_month CHECK (kind <> 2 OR (
        recharge_id IS NULL AND month IS NOT NULL AND extract(day FROM month) = 1)),
    CONSTRAINT special_invoice_names_the_taxpayer CHECK (invoice_type <> 2 OR buyer_tax_id <> ''),
    CONSTRAINT invoice_totals_add_up CHECK (total_fen = amount_fen + tax_fen),
    CONSTRAINT issued_with_a_number CHECK (
        (state = 1) = (invoice_number IS NULL) AND (state = 1) = (issued_at IS NULL)),
    CONSTRAINT red_letter_with_a_number CHECK (
        (state = 3) = (red_letter_number IS NOT NULL) AND (state = 3) = (reversed_at IS NOT NULL)
        AND (state = 3) = (reversal_reason IS NOT NULL))
);

-- A recharge, a month, is covered by at most one live (requested or issued) invoice; a
-- reversed one frees it to be invoiced again. The request function checks first under the
-- account's lock and answers why; these are the backstop.
CREATE UNIQUE INDEX invoices_one_per_recharge ON fc.invoices (recharge_id)
    WHERE kind = 1 AND state IN (1, 2);
CREATE UNIQUE INDEX invoices_one_per_month ON fc.invoices (account_id, month)
    WHERE kind = 2 AND state IN (1, 2);
CREATE INDEX invoices_by_account ON fc.invoices (account_id, id DESC);

-- table: fc.invoice_items
-- The items on an invoice's face. Fuel items (a product other than 7, shop goods) carry
-- litres; the recharge item has no product. tax_rate_bp NULL: 不征税.
CREATE TABLE fc.invoice_items (
    invoice_id bigint NOT NULL REFERENCES fc.invoices (id),
    line_no smallint NOT NULL CHECK (line_no >= 1),
    product smallint,
    name text NOT NULL,
    tax_code text NOT NULL CHECK (tax_code ~ '^[0-9]{19}$'),
    unit text NOT NULL DEFAULT '',
    quantity_ml bigint NOT NULL DEFAULT 0 CHECK (quantity_ml >= 0),
    amount_fen bigint NOT NULL CHECK (amount_fen > 0),
    tax_rate_bp smallint CHECK (tax_rate_bp > 0),
    tax_fen bigint NOT NULL CHECK (tax_fen >= 0),
    total_fen bigint NOT NULL,
    PRIMARY KEY (invoice_id, line_no),
    CONSTRAINT fuel_items_carry_litres CHECK (
        product IS NULL OR product = 7 OR (unit = '升' AND quantity_ml > 0)),
    CONSTRAINT item_adds_up CHECK (total_fen = amount_fen + tax_fen),
    CONSTRAINT untaxed_item_has_no_tax CHECK (tax_rate_bp IS NOT NULL OR tax_fen = 0)
);

-- table: fc.invoice_list_entries
-- The list (清单) of a consolidated consumption invoice: one vehicle's (spending account's)
-- sales of one product in the month. An item is the sum of its product's entries.
CREATE TABLE fc.invoice_list_entries (
    invoice_id bigint NOT NULL REFERENCES fc.invoices (id),
    line_no integer NOT NULL CHECK (line_no >= 1),
    spender_account_id bigint NOT NULL REFERENCES fc.accounts (id),
    product smallint NOT NULL,
    quantity_ml bigint NOT NULL CHECK (quantity_ml >= 0),
    sale_count bigint NOT NULL CHECK (sale_count > 0),
    amount_fen bigint NOT NULL,
    tax_fen bigint NOT NULL CHECK (tax_fen >= 0),
    total_fen bigint NOT NULL CHECK (total_fen > 0),
    PRIMARY KEY (invoice_id, line_no),
    CONSTRAINT entry_adds_up CHECK (total_fen = amount_fen + tax_fen)
);

-- The seller (销售方) printed on every invoice: the operator's own registration, set by the
-- operator (UPDATE fc.config) before the first invoice is issued for real.
INSERT INTO fc.config VALUES
    ('invoice_seller_name', '示例加油站有限公司'),
    ('invoice_seller_taxpayer_id', '91530100000000000X');
