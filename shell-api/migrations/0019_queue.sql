-- Queue drops (API.md, "Launch modes": the waiting room). The queue itself lives beside the stock authority (in
-- memory on the embedded gate, under the drop's hash tag in Redis); Postgres keeps the drop's terms: when the
-- queue opens (never after `opens_at`), how long a pass lasts and the admission ceiling (NULL: none).
ALTER TABLE drops
    DROP CONSTRAINT drops_mode_check,
    ADD CONSTRAINT drops_mode_check CHECK (mode IN ('first_come', 'draw', 'queue')),
    ADD COLUMN queue_opens_at timestamptz,
    ADD COLUMN pass_seconds integer CHECK (pass_seconds > 0),
    ADD COLUMN admit_per_second integer CHECK (admit_per_second > 0),
    ADD CONSTRAINT drops_queue_shape CHECK (
        (mode = 'queue') = (queue_opens_at IS NOT NULL AND pass_seconds IS NOT NULL)
        AND (queue_opens_at IS NULL OR queue_opens_at <= opens_at)
        AND (admit_per_second IS NULL OR mode = 'queue'));
