"""Advisory lock keys.

Positive keys are account ids (accounts.id): every money movement on an
account takes pg_advisory_xact_lock(account id). When a function needs
several accounts it locks them in ascending id order, so two movements can
never wait on each other in a cycle. Keys <= 0 belong to jobs and tools.
"""

MIGRATION_LOCK = -1
EXPIRY_SWEEP_LOCK = -2
POINTS_EXPIRY_LOCK = -3
TIER_EVALUATION_LOCK = -4
# The audit log's hash chain (fc.audit_append): every append takes it, so
# appends are serialised and each extends the committed head - one chain,
# never a fork, across all server processes.
AUDIT_LOCK = -5
# Risk rule set loads and activations (fc.risk_load, fc.risk_activate): one at
# a time, so each change's diff is against the set really in force before it.
RISK_RULES_LOCK = -6
# The event sequencer (fc.sequence_events, fc.prune_events): one process at a
# time gives outbox rows their stream positions.
EVENT_SEQUENCER_LOCK = -20
# Retention (fc.prune_idempotency_keys, fc.prune_step_ups; retention.py): one
# process at a time deletes, the others skip the round.
RETENTION_LOCK = -30
# The journal's hash chain (journal_chain.py): one process at a time extends
# it, the others skip the round.
JOURNAL_CHAIN_LOCK = -40
