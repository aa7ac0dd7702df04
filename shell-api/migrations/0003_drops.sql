-- Drops, their reservations (holds) and purchases. Reservations and purchases are written by the engine's
-- batched writer; purchases are the record of truth for sold units (a restart rebuilds `sold` from them).
CREATE TABLE drops (
    id uuid PRIMARY KEY,
    product_id uuid NOT NULL REFERENCES products (id),
    seller_id uuid NOT NULL REFERENCES members (id),
    stock integer NOT NULL CONSTRAINT drops_stock_check CHECK (stock > 0),
    opens_at timestamptz NOT NULL,
    closes_at timestamptz CONSTRAINT drops_window_check CHECK (closes_at > opens_at),
    per_member_limit integer NOT NULL CONSTRAINT drops_limit_check CHECK (per_member_limit > 0),
    hold_seconds integer NOT NULL CONSTRAINT drops_hold_check CHECK (hold_seconds > 0),
    price bigint NOT NULL CONSTRAINT drops_price_check CHECK (price >= 0),
    currency text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX drops_product_idx ON drops (product_id);
CREATE INDEX drops_opens_at_idx ON drops (opens_at);

-- No foreign keys to members here: these rows are written in batches, and one bad row must not sink the batch.
CREATE TABLE reservations (
    id uuid PRIMARY KEY,
    drop_id uuid NOT NULL REFERENCES drops (id),
    member_id uuid NOT NULL,
    quantity integer NOT NULL CONSTRAINT reservations_quantity_check CHECK (quantity > 0),
    status text NOT NULL CONSTRAINT reservations_status_check CHECK (status IN ('held', 'paying', 'paid', 'released')),
    reason text CONSTRAINT reservations_reason_check CHECK (reason IN ('cancelled', 'expired', 'payment_declined')),
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
-- Restore reads only live holds.
CREATE INDEX reservations_live_idx ON reservations (drop_id) WHERE status IN ('held', 'paying');
CREATE INDEX reservations_member_idx ON reservations (member_id);

CREATE TABLE purchases (
    id uuid PRIMARY KEY,
    -- Exactly one purchase per paid reservation.
    reservation_id uuid NOT NULL CONSTRAINT purchases_reservation_key UNIQUE,
    drop_id uuid NOT NULL REFERENCES drops (id),
    product_id uuid NOT NULL,
    member_id uuid NOT NULL,
    quantity integer NOT NULL CONSTRAINT purchases_quantity_check CHECK (quantity > 0),
    amount bigint NOT NULL,
    currency text NOT NULL,
    paid_at timestamptz NOT NULL
);
CREATE INDEX purchases_member_idx ON purchases (member_id, paid_at DESC, id DESC);
CREATE INDEX purchases_drop_idx ON purchases (drop_id);
