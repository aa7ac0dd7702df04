-- The regular shop: points balances and their ledger, carts, orders of shelf stock, refunds decided by the
-- seller, daily settlements, and remembered search terms. The CHECKs are the last line of the guarantees
-- (shelf stock and balances never negative, refunds never above what was ordered); the service never relies on
-- hitting them, it updates conditionally first.

-- One balance per member, in KRW (the shop's currency), moved only in the transaction that appends its ledger
-- entry, so `balance` always equals the sum of the member's `balance_entries.amount`.
CREATE TABLE balances (
    member_id uuid PRIMARY KEY REFERENCES members (id),
    balance bigint NOT NULL DEFAULT 0 CONSTRAINT balances_balance_check CHECK (balance >= 0),
    currency text NOT NULL DEFAULT 'KRW',
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Append-only: rows are inserted, never updated or deleted. `balance` is the balance right after the entry.
CREATE TABLE balance_entries (
    id uuid PRIMARY KEY,
    member_id uuid NOT NULL REFERENCES members (id),
    kind text NOT NULL CONSTRAINT balance_entries_kind_check CHECK (kind IN ('charge', 'order', 'refund')),
    amount bigint NOT NULL CONSTRAINT balance_entries_amount_check CHECK (amount <> 0),
    balance bigint NOT NULL CONSTRAINT balance_entries_balance_check CHECK (balance >= 0),
    order_id uuid,
    refund_id uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX balance_entries_member_idx ON balance_entries (member_id, id DESC);

CREATE TABLE cart_items (
    member_id uuid NOT NULL REFERENCES members (id),
    product_id uuid NOT NULL REFERENCES products (id),
    quantity integer NOT NULL CONSTRAINT cart_items_quantity_check CHECK (quantity BETWEEN 1 AND 99),
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (member_id, product_id)
);

-- Only paid orders exist: an order that fails leaves no row.
CREATE TABLE orders (
    id uuid PRIMARY KEY,
    member_id uuid NOT NULL REFERENCES members (id),
    status text NOT NULL DEFAULT 'paid' CONSTRAINT orders_status_check CHECK (status IN ('paid')),
    total bigint NOT NULL CONSTRAINT orders_total_check CHECK (total >= 0),
    currency text NOT NULL,
    payment_method text NOT NULL CONSTRAINT orders_payment_method_check CHECK (payment_method IN ('points', 'card')),
    created_at timestamptz NOT NULL,
    paid_at timestamptz NOT NULL
);
CREATE INDEX orders_member_idx ON orders (member_id, id DESC);

-- `refund_claimed` counts units in refunds requested or accepted (a rejected refund gives its units back), so a
-- refund request can never pass what was ordered, whatever runs concurrently.
CREATE TABLE order_items (
    order_id uuid NOT NULL REFERENCES orders (id),
    product_id uuid NOT NULL REFERENCES products (id),
    seller_id uuid NOT NULL REFERENCES members (id),
    quantity integer NOT NULL CONSTRAINT order_items_quantity_check CHECK (quantity > 0),
    unit_price bigint NOT NULL CONSTRAINT order_items_unit_price_check CHECK (unit_price >= 0),
    subtotal bigint NOT NULL,
    currency text NOT NULL,
    -- The order's paid_at, kept here so a seller's sales are one index range.
    paid_at timestamptz NOT NULL,
    refund_claimed integer NOT NULL DEFAULT 0
        CONSTRAINT order_items_refund_claimed_check CHECK (refund_claimed BETWEEN 0 AND quantity),
    PRIMARY KEY (order_id, product_id)
);
CREATE INDEX order_items_seller_idx ON order_items (seller_id, paid_at);

CREATE TABLE refunds (
    id uuid PRIMARY KEY,
    order_id uuid NOT NULL REFERENCES orders (id),
    seller_id uuid NOT NULL REFERENCES members (id),
    member_id uuid NOT NULL REFERENCES members (id),
    amount bigint NOT NULL CONSTRAINT refunds_amount_check CHECK (amount >= 0),
    currency text NOT NULL,
    status text NOT NULL DEFAULT 'requested'
        CONSTRAINT refunds_status_check CHECK (status IN ('requested', 'accepted', 'rejected')),
    reason text NOT NULL,
    decision_reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    decided_at timestamptz,
    CONSTRAINT refunds_decided_check CHECK ((status = 'requested') = (decided_at IS NULL))
);
CREATE INDEX refunds_seller_idx ON refunds (seller_id, status, id DESC);
CREATE INDEX refunds_decided_idx ON refunds (decided_at) WHERE status = 'accepted';

CREATE TABLE refund_items (
    refund_id uuid NOT NULL REFERENCES refunds (id),
    product_id uuid NOT NULL,
    quantity integer NOT NULL CONSTRAINT refund_items_quantity_check CHECK (quantity > 0),
    unit_price bigint NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (refund_id, product_id)
);

-- One row per seller, day (UTC) and currency; `flashsale settle` rewrites it, never adds a second.
CREATE TABLE settlements (
    seller_id uuid NOT NULL REFERENCES members (id),
    day date NOT NULL,
    currency text NOT NULL,
    orders integer NOT NULL,
    gross bigint NOT NULL,
    refunds bigint NOT NULL,
    fee bigint NOT NULL,
    net bigint NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (seller_id, day, currency),
    CONSTRAINT settlements_net_check CHECK (net = gross - refunds - fee)
);

-- A seller's drop purchases are found through the seller's drops.
CREATE INDEX drops_seller_idx ON drops (seller_id);
CREATE INDEX purchases_paid_at_idx ON purchases (paid_at);

-- Search terms: the member's distinct recent terms (one row per term, stamped at the last search), and every
-- search for the popular list (trimmed past two days by the daily settlement task).
CREATE TABLE search_recent (
    member_id uuid NOT NULL REFERENCES members (id),
    term text NOT NULL,
    searched_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (member_id, term)
);
CREATE INDEX search_recent_member_idx ON search_recent (member_id, searched_at DESC);

CREATE TABLE search_events (
    term text NOT NULL,
    searched_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX search_events_at_idx ON search_events (searched_at);
