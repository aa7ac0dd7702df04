-- A small number per drop that the Redis gate writes into each reservation id, so any instance can tell a hold's
-- drop from its id alone. Assigned by Postgres, so it never changes and never repeats, whatever Redis loses.
ALTER TABLE drops ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
ALTER TABLE drops ADD CONSTRAINT drops_seq_key UNIQUE (seq);
