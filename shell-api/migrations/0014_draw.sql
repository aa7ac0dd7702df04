-- Launch modes (API.md, "Launch modes"): a drop is a race (`first_come`) or a draw. A draw drop keeps its
-- 32-byte secret seed from its creation (its SHA-256 is the published commitment), is drawn once (`drawn_at`, set
-- by one conditional UPDATE in the transaction that ranks its entries) and records what the draw revealed.
-- `draw_settled_at`: the allocator has nothing left to do (no entry waitlisted).
ALTER TABLE drops
    ADD COLUMN mode text NOT NULL DEFAULT 'first_come' CHECK (mode IN ('first_come', 'draw')),
    ADD COLUMN draw_at timestamptz,
    ADD COLUMN draw_seed bytea CHECK (octet_length(draw_seed) = 32),
    ADD COLUMN drawn_at timestamptz,
    ADD COLUMN draw_entries integer,
    ADD COLUMN draw_entries_digest text,
    ADD COLUMN draw_settled_at timestamptz,
    ADD CONSTRAINT drops_draw_shape CHECK (
        (mode = 'draw') = (draw_at IS NOT NULL AND draw_seed IS NOT NULL)
        AND (draw_at IS NULL OR draw_at > opens_at)
        AND (draw_at IS NULL OR closes_at IS NULL OR draw_at < closes_at));

CREATE INDEX drops_draw_due ON drops (draw_at) WHERE mode = 'draw' AND draw_settled_at IS NULL;

-- One entry per member and draw drop (the unique constraint makes concurrent entries of one member one row).
-- `rank` is written by the draw; `status` moves entered -> waitlisted (at the draw) -> won | lost.
CREATE TABLE drop_entries (
    id uuid PRIMARY KEY,
    drop_id uuid NOT NULL REFERENCES drops (id),
    member_id uuid NOT NULL REFERENCES members (id),
    quantity integer NOT NULL CHECK (quantity > 0),
    status text NOT NULL DEFAULT 'entered' CHECK (status IN ('entered', 'won', 'waitlisted', 'lost')),
    rank integer CHECK (rank > 0),
    reservation_id uuid,
    created_at timestamptz NOT NULL,
    CONSTRAINT drop_entries_one_per_member UNIQUE (drop_id, member_id),
    CONSTRAINT drop_entries_rank UNIQUE (drop_id, rank)
);
