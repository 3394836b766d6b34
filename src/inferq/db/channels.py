"""The NOTIFY channel names, in one place, with the migration or code that emits each."""

from __future__ import annotations

# Emitted by inferq.notify_task_status() (sql/0002_triggers.sql) for every inserted task and
# every status change. Payload: JSON array of [task_id, status, pool_name, attempt].
TASK = "inferq_task"

# Emitted by ChunkRepository.append (src/inferq/db/chunks.py), once per flush.
# Payload: JSON array of [task_id, attempt, last_seq].
CHUNK = "inferq_chunk"

# Emitted by TokenRepository.revoke (src/inferq/db/tokens.py). Payload: the token id.
TOKEN = "inferq_token"

# Emitted by inferq.notify_dashboard() (sql/0008_dashboard.sql) once per statement that binds,
# unbinds or reaps worker sessions, and once per statement that creates a batch or changes a
# batch's status. Payload: the statement's operation (INSERT, UPDATE, DELETE); only the live
# pages of the dashboard care.
SESSION = "inferq_session"
BATCH = "inferq_batch"
# Emitted the same way once per statement of the rollup sweep (inferq.queue_minute).
ROLLUP = "inferq_rollup"

ALL = (TASK, CHUNK, TOKEN, SESSION, BATCH, ROLLUP)

# Payloads stay well below PostgreSQL's 8000-byte limit.
MAX_PAYLOAD_BYTES = 7000
