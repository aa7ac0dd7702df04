-- No query reads reservations by member (a member's purchases come from `purchases`, which has its own index),
-- and every hold the writer stores paid for this index with a random B-tree insert.
DROP INDEX IF EXISTS reservations_member_idx;
