-- The embedded gate's journal of new holds. A row per hold cost Postgres about as much CPU as the whole
-- reservation cost the server, so the writer stores the holds of one batch and drop as one row of arrays; a hold
-- gets its own `reservations` row when it settles (paid or released, by upsert). Loading or unloading a drop
-- materializes its journaled holds into `reservations` rows (`store::materialize_holds`) and deletes the batches,
-- so this table holds only the holds of drops being sold now.
CREATE TABLE hold_batches (
    drop_id uuid NOT NULL,
    ids uuid[] NOT NULL,
    member_ids uuid[] NOT NULL,
    quantities int4[] NOT NULL,
    created_at timestamptz[] NOT NULL,
    expires_at timestamptz[] NOT NULL,
    CONSTRAINT hold_batches_lengths_check CHECK (
        cardinality(ids) = cardinality(member_ids) AND cardinality(ids) = cardinality(quantities)
        AND cardinality(ids) = cardinality(created_at) AND cardinality(ids) = cardinality(expires_at))
);
CREATE INDEX hold_batches_drop_idx ON hold_batches (drop_id);
-- Out of line and uncompressed: these arrays are ids and times, which do not compress, and trying costs CPU.
ALTER TABLE hold_batches
    ALTER COLUMN ids SET STORAGE EXTERNAL,
    ALTER COLUMN member_ids SET STORAGE EXTERNAL,
    ALTER COLUMN quantities SET STORAGE EXTERNAL,
    ALTER COLUMN created_at SET STORAGE EXTERNAL,
    ALTER COLUMN expires_at SET STORAGE EXTERNAL;

-- Every hold as stored: its row if it has one, else its journal entry (held). A journal batch written twice
-- (a retried commit) names its holds twice; DISTINCT ON folds them.
CREATE VIEW stored_holds AS
SELECT id, drop_id, member_id, quantity, status, reason, created_at, expires_at, updated_at
FROM reservations
UNION ALL
SELECT DISTINCT ON (h.id) h.id, b.drop_id, h.member_id, h.quantity, 'held', NULL, h.created_at, h.expires_at,
       h.created_at
FROM hold_batches b
CROSS JOIN LATERAL unnest(b.ids, b.member_ids, b.quantities, b.created_at, b.expires_at)
    AS h(id, member_id, quantity, created_at, expires_at)
WHERE NOT EXISTS (SELECT 1 FROM reservations r WHERE r.id = h.id);
