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

-- The maintenance jobs (fc.expire_holds, fc.expire_points, fc.evaluate_tiers)
-- work on many accounts in one statement, one transaction (the job runs
-- `SELECT fc.<job>(...)` under pg_try_advisory_xact_lock), and the advisory
-- locks they take are held to its end. Locking per account as they went
-- (fc.lock_chain: parent, then the account) would take them out of
-- ascending order across accounts (P1 < P2 < A < B locked P1, A, P2, B), and
-- two jobs running at once (each has its own job lock) would deadlock. So a
-- job first collects its batch's accounts and their parents, locks them all
-- in one pass in ascending id (fc.lock_accounts), then does the work.
--
-- Expired points are never spent: fc.redeem_points and fc.transfer_points
-- lapse the account's expired lots under the account lock before deciding
-- (fc.lapse_points_locked, the booking fc.expire_points makes), as
-- fc.authorize releases expired holds under the lock. The lapse is kept
-- whatever the decision (a declined redemption commits it too, as a declined
-- authorize keeps the holds it released), so the stored answer's balance is
-- the one the account is left with; a transfer lapses the receiving main
-- account's lots as well. fc.take_points refuses an expired lot: a caller
-- that did not lapse first fails loudly instead of spending it.

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

-- fc.lock_chain's locks, in its order (the parent first), for a caller that read the
-- account's parent already in a statement it needed anyway (fc.authorize, with the card): a
-- parent never changes, so it may be read before the lock.
CREATE OR REPLACE FUNCTION fc.lock_pair(p_parent_id bigint, p_account_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_parent_id IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(p_parent_id);
    END IF;
    PERFORM pg_advisory_xact_lock(p_account_id);
END $$;
