-- The numbers the columns hold for states, modes and kinds, named once. Each is a constant
-- function: LANGUAGE sql, IMMUTABLE, no arguments, so the planner inlines it and folds it to the
-- number when a statement is planned (PL/pgSQL plans a statement once per session): a body that
-- says `state = fc.hold_state_suspended()` runs as `state = 5`, and still matches the partial
-- indexes and CHECK constraints written with the number.
--
-- The values are the proto enums' (fuelcard.v1), named as there: fc.hold_state_authorized() is
-- HOLD_STATE_AUTHORIZED. tests/test_states.py holds every one to its proto value, and
-- fuelcard_server/states.py gives Python the same names. The CHECK constraints of the schema
-- keep the numbers (they are schema, in the baseline).
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Function bodies
-- resolve these names when they run (migrate creates them with check_function_bodies off), so
-- any file may use them; what is resolved when it is made, a trigger's WHEN or an index
-- expression, must be in a file applied after this one or keep the number.

-- Hold states (fuelcard.v1.HoldState): the life of a reservation at the pump.
CREATE OR REPLACE FUNCTION fc.hold_state_authorized() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.hold_state_confirmed() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
CREATE OR REPLACE FUNCTION fc.hold_state_cancelled() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3::smallint';
CREATE OR REPLACE FUNCTION fc.hold_state_expired() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 4::smallint';
CREATE OR REPLACE FUNCTION fc.hold_state_suspended() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 5::smallint';
CREATE OR REPLACE FUNCTION fc.hold_state_rejected() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 6::smallint';

-- How a sub-account is funded (fuelcard.v1.FundingMode); UNSPECIFIED on a top-level account,
-- which funds itself.
CREATE OR REPLACE FUNCTION fc.funding_mode_unspecified() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 0::smallint';
CREATE OR REPLACE FUNCTION fc.funding_mode_allocated() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.funding_mode_shared() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';

-- Account types (fuelcard.v1.AccountType), the accounts.kind column.
CREATE OR REPLACE FUNCTION fc.account_type_personal() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.account_type_corporate() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
CREATE OR REPLACE FUNCTION fc.account_type_family() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3::smallint';

-- Account status (fuelcard.v1.AccountStatus).
CREATE OR REPLACE FUNCTION fc.account_status_active() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.account_status_frozen() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';

-- Card status (fuelcard.v1.CardStatus).
CREATE OR REPLACE FUNCTION fc.card_status_active() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.card_status_blocked() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
CREATE OR REPLACE FUNCTION fc.card_status_closed() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3::smallint';

-- Journal entry kinds (fuelcard.v1.LedgerEntryKind), the journal.kind column.
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_recharge() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_purchase() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_points_earned() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_points_redeemed() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 4::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_allocation() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 5::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_points_transfer() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 6::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_points_expired() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 7::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_recharge_refund() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 8::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_manual_adjustment() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 9::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_sale_refund() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 10::smallint';
CREATE OR REPLACE FUNCTION fc.ledger_entry_kind_overrun_receivable() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 12::smallint';

-- What a journal entry moves (fuelcard.v1.Asset).
CREATE OR REPLACE FUNCTION fc.asset_money() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.asset_points() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';

-- Risk decisions (fuelcard.v1.RiskDecision): a rule's action and a rule set's fallback.
CREATE OR REPLACE FUNCTION fc.risk_decision_approve() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.risk_decision_review() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
CREATE OR REPLACE FUNCTION fc.risk_decision_decline() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3::smallint';

-- What a step-up challenge confirms (fuelcard.v1.StepUpKind).
CREATE OR REPLACE FUNCTION fc.step_up_kind_recharge() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.step_up_kind_pin_reset() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
CREATE OR REPLACE FUNCTION fc.step_up_kind_limit_raise() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3::smallint';
CREATE OR REPLACE FUNCTION fc.step_up_kind_reveal_card_number() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 4::smallint';
CREATE OR REPLACE FUNCTION fc.step_up_kind_anomaly() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 5::smallint';
CREATE OR REPLACE FUNCTION fc.step_up_kind_holder_data_export() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 6::smallint';
CREATE OR REPLACE FUNCTION fc.step_up_kind_sale_refund() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 7::smallint';
CREATE OR REPLACE FUNCTION fc.step_up_kind_phone_change() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 8::smallint';

-- A settlement record's kind (fuelcard.v1.SettlementKind): settlement_records.kind, and
-- reconciliation_breaks.record_kind.
CREATE OR REPLACE FUNCTION fc.settlement_kind_payment() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.settlement_kind_refund() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';

-- A settlement record's status (fuelcard.v1.SettlementStatus).
CREATE OR REPLACE FUNCTION fc.settlement_status_success() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.settlement_status_failed() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
CREATE OR REPLACE FUNCTION fc.settlement_status_processing() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3::smallint';

-- What a reconciliation break is (fuelcard.v1.BreakKind): reconciliation_breaks.kind.
CREATE OR REPLACE FUNCTION fc.break_kind_missing_ours() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.break_kind_missing_theirs() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
CREATE OR REPLACE FUNCTION fc.break_kind_amount_mismatch() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3::smallint';
CREATE OR REPLACE FUNCTION fc.break_kind_status_mismatch() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 4::smallint';

-- Not in the proto: the kind of the system accounts (FUEL_SALES, CHANNEL_CLEARING_*, POINTS_*),
-- which the API never shows.
CREATE OR REPLACE FUNCTION fc.account_kind_system() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 100::smallint';

-- Not in the proto: where a hold the risk engine suspended stands in its review
-- (holds.review_state; NULL on a hold never suspended).
CREATE OR REPLACE FUNCTION fc.review_state_pending() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.review_state_approved() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
CREATE OR REPLACE FUNCTION fc.review_state_rejected() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 3::smallint';

-- Not in the proto: who a JSON API principal is (fc.principals.kind): a card holder (a family's
-- main-card holder holds the parent account) or a fleet manager (a top-level corporate account).
CREATE OR REPLACE FUNCTION fc.principal_kind_holder() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1::smallint';
CREATE OR REPLACE FUNCTION fc.principal_kind_fleet_manager() RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 2::smallint';
