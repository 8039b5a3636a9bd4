-- Issue 19: the reviewer console's audit trail (clients/fuelcard_console/audit_trail.py) pages
-- fc.audit_log newest first, filtered by target, console user or time. Without these, a filter
-- that matches few rows walks the whole log backwards through the primary key.

-- Everything done to one object (a hold, an adjustment, a break): an index range, newest first.
CREATE INDEX audit_log_target_by_id ON fc.audit_log USING btree (target, id)
    WHERE (target IS NOT NULL);

-- Everything one console user did: the console's own records ("console:<role>:<uuid>") and the
-- core's for calls made on the user's behalf ("<edge certificate> for console_user:<uuid>")
-- both end with the user's uuid, 36 characters.
CREATE INDEX audit_log_actor_tail_by_id ON fc.audit_log USING btree ("right"(actor, 36), id);

-- A time window: its first and last records' ids (fc.audit_append numbers them in clock order),
-- found in two probes, bound the scan of the other filters' index.
CREATE INDEX audit_log_created_by_id ON fc.audit_log USING btree (created_at, id);
