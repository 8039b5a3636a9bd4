-- Account locks: every function that touches several accounts locks them in ascending id
-- order and holds them to the end of its transaction (pg_advisory_xact_lock; keys >= 1 are
-- account ids, keys <= 0 belong to jobs: fuelcard_server/locks.py).
--
-- A movement on a sub-account locks its parent first,
-- then the sub-account. parent_id < id always holds (a parent exists before
-- its children), so "parent first" is "ascending account id" and agrees with
-- every other function: no two transactions can wait on each other in a cycle.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- Takes the advisory locks of an account and its parent, parent first (the
-- documented order), and returns the parent's id or NULL.
CREATE OR REPLACE FUNCTION fc.lock_chain(p_account_id bigint) RETURNS bigint
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

-- 0016: expired points are never spent, and the maintenance jobs never
-- deadlock each other.
--
-- 1. Points past their expiry stayed spendable until the points sweep got
--    to them: fc.redeem_points and fc.transfer_points checked points_balance
--    and fc.take_points took the oldest lots whatever their expires_at. Now,
--    under the account lock and before deciding, they lapse the account's
--    expired lots (fc.lapse_points_locked: the booking fc.expire_points has
--    always made, a kind 7 points entry to POINTS_EXPIRED), as fc.authorize
--    releases expired holds under the lock (fc.release_expired_locked). The
--    lapse is kept whatever the decision (a declined redemption commits it
--    too, as a declined authorize keeps the holds it released), so the
--    stored answer's balance is the one the account is left with. The
--    transfer lapses the receiving main account's expired lots as well (it
--    is locked too): its balance in the answer counts no expired points.
--    fc.take_points refuses an expired lot: a caller that did not lapse
--    first fails loudly instead of spending it.
--
-- 2. fc.expire_holds, fc.expire_points and fc.evaluate_tiers looped over
--    accounts in ascending id and called fc.lock_chain (parent, then the
--    account) per account. The advisory locks are held to the end of the
--    job's one transaction, so across iterations they were not taken in
--    ascending order (P1 < P2 < A < B locked P1, A, P2, B), and two jobs
--    running at once (each has its own job lock) deadlocked. Each job is one
--    statement, one transaction (app.py: SELECT ... fc.<job>(...) under
--    pg_try_advisory_xact_lock), so it cannot commit per account: it now
--    collects the batch's accounts and their parents, locks them all in one
--    pass in ascending id (fc.lock_accounts), then does the work. The number
--    of locks held is what it was (xact locks were already held to the end).
--
-- Bodies otherwise as in 0002 (redeem_points, transfer_points, take_points,
-- expire_points, evaluate_tiers) and 0007 (expire_holds). evaluate_tiers
-- also runs in batches now (see there).

-- Locks the given accounts and their parents, all in ascending id in one
-- pass: the documented lock order for a transaction that needs many.
CREATE OR REPLACE FUNCTION fc.lock_accounts(p_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    FOR v_id IN
        SELECT k.id FROM (
            SELECT a.id FROM fc.accounts a WHERE a.id = ANY (p_ids)
            UNION
            SELECT a.parent_id FROM fc.accounts a
             WHERE a.id = ANY (p_ids) AND a.parent_id IS NOT NULL) k
        ORDER BY k.id
    LOOP
        PERFORM pg_advisory_xact_lock(v_id);
    END LOOP;
END $$;
