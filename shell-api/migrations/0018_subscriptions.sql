-- Subscriptions (API.md, "Subscriptions"; DESIGN.md guarantee 14: one charge per period).
--
-- A subscription product is a product of kind 'subscription' with a billing interval; its `price` is per period.
ALTER TABLE products
    ADD COLUMN billing_interval text
        CONSTRAINT products_billing_interval_check CHECK (billing_interval IN ('week', 'month')),
    DROP CONSTRAINT products_kind_check,
    ADD CONSTRAINT products_kind_check CHECK (kind IN ('regular', 'preorder', 'subscription')),
    ADD CONSTRAINT products_interval_shape_check CHECK ((kind = 'subscription') = (billing_interval IS NOT NULL));

-- One row per subscription. The renewal due next is for the period starting at `current_period_end`, attempt
-- `renewal_attempt` (1 on the due date, 2..4 the dunning retries), due at `next_attempt_at` (NULL: nothing is due,
-- as when paused or canceled). `price` is what the member agreed to pay per period: a higher product price applies
-- only after the member accepts it.
CREATE TABLE subscriptions (
    id uuid PRIMARY KEY,
    product_id uuid NOT NULL REFERENCES products (id),
    member_id uuid NOT NULL REFERENCES members (id),
    seller_id uuid NOT NULL REFERENCES members (id),
    status text NOT NULL
        CONSTRAINT subscriptions_status_check CHECK (status IN ('active', 'past_due', 'paused', 'canceled')),
    price bigint NOT NULL CONSTRAINT subscriptions_price_check CHECK (price >= 0),
    currency text NOT NULL,
    billing_interval text NOT NULL
        CONSTRAINT subscriptions_billing_interval_check CHECK (billing_interval IN ('week', 'month')),
    payment_method text NOT NULL
        CONSTRAINT subscriptions_payment_method_check CHECK (payment_method IN ('points', 'card')),
    payment_token text,
    current_period_start timestamptz NOT NULL,
    current_period_end timestamptz NOT NULL,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    renewal_attempt integer NOT NULL DEFAULT 1
        CONSTRAINT subscriptions_renewal_attempt_check CHECK (renewal_attempt BETWEEN 1 AND 4),
    next_attempt_at timestamptz,
    paused_reason text CONSTRAINT subscriptions_paused_reason_check CHECK (paused_reason IN ('member', 'price_change')),
    created_at timestamptz NOT NULL,
    canceled_at timestamptz,
    CONSTRAINT subscriptions_payment_shape_check CHECK ((payment_method = 'card') = (payment_token IS NOT NULL)),
    CONSTRAINT subscriptions_due_shape_check CHECK (
        (status IN ('active', 'past_due')) = (next_attempt_at IS NOT NULL)),
    CONSTRAINT subscriptions_paused_shape_check CHECK ((status = 'paused') = (paused_reason IS NOT NULL))
);
-- What renewers claim: the due subscriptions, oldest due first.
CREATE INDEX subscriptions_due_idx ON subscriptions (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX subscriptions_member_idx ON subscriptions (member_id, id DESC);
CREATE INDEX subscriptions_product_idx ON subscriptions (product_id, id DESC);
CREATE INDEX subscriptions_seller_idx ON subscriptions (seller_id, id DESC);

-- Every charge attempt of a subscription. The id is derived from (subscription, period start, attempt), and it is
-- the idempotency key of the gateway call, so asking again for the same attempt (a retry, a second renewer, a
-- re-run after a crash) is the same charge. A card attempt is written `pending` and committed before the gateway
-- is asked; its outcome is recorded in the renewal's transaction.
CREATE TABLE subscription_charges (
    id uuid PRIMARY KEY,
    subscription_id uuid NOT NULL REFERENCES subscriptions (id),
    member_id uuid NOT NULL REFERENCES members (id),
    seller_id uuid NOT NULL REFERENCES members (id),
    product_id uuid NOT NULL REFERENCES products (id),
    period_start timestamptz NOT NULL,
    period_end timestamptz NOT NULL,
    attempt integer NOT NULL CONSTRAINT subscription_charges_attempt_check CHECK (attempt BETWEEN 1 AND 4),
    amount bigint NOT NULL CONSTRAINT subscription_charges_amount_check CHECK (amount >= 0),
    currency text NOT NULL,
    payment_method text NOT NULL
        CONSTRAINT subscription_charges_payment_method_check CHECK (payment_method IN ('points', 'card')),
    status text NOT NULL
        CONSTRAINT subscription_charges_status_check CHECK (status IN ('pending', 'paid', 'failed')),
    created_at timestamptz NOT NULL,
    paid_at timestamptz,
    CONSTRAINT subscription_charges_attempt_key UNIQUE (subscription_id, period_start, attempt),
    CONSTRAINT subscription_charges_paid_shape_check CHECK ((status = 'paid') = (paid_at IS NOT NULL))
);
-- The authority of guarantee 14: Postgres stores at most one paid charge per subscription and period, whatever
-- renewers run or crash. Locks and claims only keep renewers from doing the same work twice.
CREATE UNIQUE INDEX subscription_charges_once_per_period
    ON subscription_charges (subscription_id, period_start) WHERE status = 'paid';
CREATE INDEX subscription_charges_subscription_idx ON subscription_charges (subscription_id, id DESC);
CREATE INDEX subscription_charges_seller_paid_idx ON subscription_charges (seller_id, paid_at) WHERE status = 'paid';

-- The simulated card gateway's own record of subscription charges, by idempotency key. A real gateway keeps this on
-- its side and answers a repeated key with the first answer; the bundled gateway lives in the process and forgets
-- everything when the process dies, so this table plays the gateway's memory: it survives a crash between the
-- gateway's approval and our commit, and it is where tests count charges "at the gateway" across processes.
CREATE TABLE gateway_charges (
    charge_key uuid PRIMARY KEY,
    member_id uuid NOT NULL,
    amount bigint NOT NULL,
    currency text NOT NULL,
    outcome text NOT NULL CONSTRAINT gateway_charges_outcome_check CHECK (outcome IN ('approved', 'declined')),
    -- An approved charge given back (the subscription it paid for could not be stored).
    refunded boolean NOT NULL DEFAULT false,
    times_asked integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Points paid for a period are a ledger entry of their own kind, naming the charge; at most one entry per charge.
ALTER TABLE balance_entries
    ADD COLUMN subscription_charge_id uuid,
    DROP CONSTRAINT balance_entries_kind_check,
    ADD CONSTRAINT balance_entries_kind_check CHECK (kind IN ('charge', 'order', 'refund', 'subscription'));
CREATE UNIQUE INDEX balance_entries_subscription_charge_idx
    ON balance_entries (subscription_charge_id) WHERE subscription_charge_id IS NOT NULL;

-- A member holds at most one live subscription of a product (a canceled one does not count).
CREATE UNIQUE INDEX subscriptions_one_live_per_member
    ON subscriptions (member_id, product_id) WHERE status <> 'canceled';
