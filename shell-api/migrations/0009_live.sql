-- Live: hearts (a member's wishlist, and the subscription for drop notifications) and notifications.
--
-- `products.heart_count` is moved by the handlers in the same transaction as the heart row, as `count +/- 1`, only
-- when a row was really inserted or deleted (like `posts.like_count`); the CHECK catches a count that would go
-- negative. A repeated PUT can never double-count: the primary key is the judge.
ALTER TABLE products ADD COLUMN heart_count integer NOT NULL DEFAULT 0
    CONSTRAINT products_heart_count_check CHECK (heart_count >= 0);

CREATE TABLE product_hearts (
    product_id uuid NOT NULL CONSTRAINT product_hearts_product_fkey REFERENCES products (id) ON DELETE CASCADE,
    member_id uuid NOT NULL CONSTRAINT product_hearts_member_fkey REFERENCES members (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Also "who hearted this product", which the notifier reads when a drop of it is scheduled, opens or restocks.
    CONSTRAINT product_hearts_pkey PRIMARY KEY (product_id, member_id)
);
-- A member's hearts, newest first (keyset on created_at, product_id).
CREATE INDEX product_hearts_member_recent_idx ON product_hearts (member_id, created_at DESC, product_id DESC);

-- What a member is told. Ids are UUID v7 made by the service, so `read up_to <id>` is "everything up to then".
-- drop_scheduled and drop_open exist at most once per member and drop, restock once per member, drop and burst,
-- refund_decided once per member and refund: the unique indexes below are what makes that hold across instances
-- (every insert is ON CONFLICT DO NOTHING).
CREATE TABLE notifications (
    id uuid PRIMARY KEY,
    member_id uuid NOT NULL CONSTRAINT notifications_member_fkey REFERENCES members (id) ON DELETE CASCADE,
    kind text NOT NULL CONSTRAINT notifications_kind_check
        CHECK (kind IN ('drop_scheduled', 'drop_open', 'restock', 'refund_decided')),
    drop_id uuid CONSTRAINT notifications_drop_fkey REFERENCES drops (id) ON DELETE CASCADE,
    product_id uuid CONSTRAINT notifications_product_fkey REFERENCES products (id) ON DELETE CASCADE,
    -- No foreign key: refunds are another part's table; the id is what the buyer looks up.
    refund_id uuid,
    -- The restock burst this notification belongs to (drop_restocks.burst_id); NULL for other kinds.
    burst_id uuid,
    read boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notifications_shape_check CHECK (
        (kind IN ('drop_scheduled', 'drop_open') AND drop_id IS NOT NULL AND product_id IS NOT NULL
            AND refund_id IS NULL AND burst_id IS NULL)
        OR (kind = 'restock' AND drop_id IS NOT NULL AND product_id IS NOT NULL AND refund_id IS NULL
            AND burst_id IS NOT NULL)
        OR (kind = 'refund_decided' AND refund_id IS NOT NULL AND drop_id IS NULL AND burst_id IS NULL)
    )
);
-- A member's list, newest first, and the stream's "new rows of these members".
CREATE INDEX notifications_member_recent_idx ON notifications (member_id, id DESC);
CREATE INDEX notifications_unread_idx ON notifications (member_id) WHERE NOT read;
CREATE INDEX notifications_created_idx ON notifications (created_at);
CREATE INDEX notifications_drop_idx ON notifications (drop_id) WHERE drop_id IS NOT NULL;
CREATE UNIQUE INDEX notifications_drop_once_key ON notifications (member_id, drop_id, kind)
    WHERE kind IN ('drop_scheduled', 'drop_open');
CREATE UNIQUE INDEX notifications_restock_once_key ON notifications (member_id, drop_id, burst_id)
    WHERE kind = 'restock';
CREATE UNIQUE INDEX notifications_refund_once_key ON notifications (member_id, refund_id)
    WHERE kind = 'refund_decided';

-- One row per drop and event the notifier has announced: the marker an instance inserts (ON CONFLICT DO NOTHING)
-- before it writes the members' notifications in the same transaction, so exactly one instance announces each
-- drop's drop_scheduled and drop_open, however many run.
CREATE TABLE drop_notices (
    drop_id uuid NOT NULL CONSTRAINT drop_notices_drop_fkey REFERENCES drops (id) ON DELETE CASCADE,
    kind text NOT NULL CONSTRAINT drop_notices_kind_check CHECK (kind IN ('drop_scheduled', 'drop_open')),
    at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT drop_notices_pkey PRIMARY KEY (drop_id, kind)
);
-- The last restock burst of each drop. A new burst (and its notifications) begins only when the last began more
-- than the burst window ago; that is decided by one conditional upsert on this row, so two instances that both
-- see units come back announce one burst.
CREATE TABLE drop_restocks (
    drop_id uuid PRIMARY KEY CONSTRAINT drop_restocks_drop_fkey REFERENCES drops (id) ON DELETE CASCADE,
    burst_id uuid NOT NULL,
    at timestamptz NOT NULL
);
-- The notifier looks for recently created drops (drop_scheduled).
CREATE INDEX drops_created_at_idx ON drops (created_at);
