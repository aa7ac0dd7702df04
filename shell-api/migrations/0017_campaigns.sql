-- Preorder campaigns and fulfilment (API.md, "Preorder campaigns and fulfilment"; DESIGN.md guarantee 13), and
-- the back office's search.
--
-- A drop with `goal_units` is a campaign: `campaign` is 'live' from its creation, becomes 'funded' in the very
-- statement that stores the purchase which brings `sold` to the goal (the trigger below, on the writer's UPDATE of
-- `sold`), and is decided at the close (`campaign_closed_at`, set by one conditional UPDATE, so one closer wins
-- whichever instances run): 'funded' or 'unfunded'. An outcome never changes again.
ALTER TABLE drops
    ADD COLUMN goal_units integer,
    ADD COLUMN campaign text,
    ADD COLUMN funded_at timestamptz,
    -- When the buyers so far were told `campaign_funded` (the close tells later buyers too).
    ADD COLUMN funded_notified_at timestamptz,
    ADD COLUMN campaign_closed_at timestamptz,
    -- An unfunded campaign whose every purchase is refunded (the refund pass stops looking at it).
    ADD COLUMN refunds_done_at timestamptz,
    ADD CONSTRAINT drops_campaign_shape CHECK (
        (goal_units IS NULL) = (campaign IS NULL)
        AND (goal_units IS NULL OR (goal_units > 0 AND goal_units <= stock AND closes_at IS NOT NULL))
        AND (campaign IS NULL OR campaign IN ('live', 'funded', 'unfunded'))
        AND (campaign IS DISTINCT FROM 'unfunded' OR campaign_closed_at IS NOT NULL));

CREATE INDEX drops_campaign_due ON drops (closes_at) WHERE campaign IS NOT NULL AND campaign_closed_at IS NULL;
CREATE INDEX drops_campaign_funded_unnotified ON drops (id)
    WHERE campaign = 'funded' AND funded_notified_at IS NULL;
CREATE INDEX drops_campaign_refunding ON drops (id) WHERE campaign = 'unfunded' AND refunds_done_at IS NULL;

-- Funded the moment `sold` reaches the goal, in the purchase's own transaction: a 200 on the payment that funds a
-- campaign means the campaign is funded in Postgres, and a close that runs after it can only find it funded.
CREATE FUNCTION drops_campaign_funded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.campaign = 'live' AND NEW.sold >= NEW.goal_units THEN
        NEW.campaign := 'funded';
        NEW.funded_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER drops_campaign_funded BEFORE UPDATE OF sold ON drops
    FOR EACH ROW WHEN (NEW.campaign = 'live') EXECUTE FUNCTION drops_campaign_funded();

-- The supporters' list pages a drop's purchases by id: this replaces the index on `drop_id` alone (same width,
-- so the writer's inserts cost the same).
CREATE INDEX purchases_drop_id_idx ON purchases (drop_id, id);
DROP INDEX purchases_drop_idx;

-- One row per purchase of an unfunded campaign, written (committed) before the gateway is asked to refund it.
-- The purchase's id is the refund's idempotency key at the gateway, so a pass that crashes between the gateway's
-- answer and `refunded_at` asks again with the same key after a restart and the gateway pays it once.
CREATE TABLE purchase_refunds (
    purchase_id uuid PRIMARY KEY,
    drop_id uuid NOT NULL,
    member_id uuid NOT NULL,
    -- The charge being refunded: the reservation id the payment was charged under.
    charge_key uuid NOT NULL,
    amount bigint NOT NULL CHECK (amount >= 0),
    currency text NOT NULL,
    created_at timestamptz NOT NULL,
    refunded_at timestamptz
);
CREATE INDEX purchase_refunds_pending_idx ON purchase_refunds (drop_id) WHERE refunded_at IS NULL;
-- The settlement reads the refunds of a day.
CREATE INDEX purchase_refunds_refunded_at_idx ON purchase_refunds (refunded_at) WHERE refunded_at IS NOT NULL;

-- A purchase is shipped once: the primary key makes repeated and racing shipments one row.
CREATE TABLE shipments (
    purchase_id uuid PRIMARY KEY,
    drop_id uuid NOT NULL,
    tracking text,
    shipped_at timestamptz NOT NULL,
    shipped_by uuid NOT NULL
);
CREATE INDEX shipments_drop_idx ON shipments (drop_id);

-- The simulated gateway's refund idempotency records, when they must outlive its process (`SIMULATED_GATEWAY_LEDGER`:
-- tests and the demo count refunds "at the gateway" across a kill). `calls` counts every request for the id, the
-- first included: only the first paid.
CREATE TABLE simulated_gateway_refunds (
    refund_id uuid PRIMARY KEY,
    charge_key uuid NOT NULL,
    amount bigint NOT NULL,
    calls integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX simulated_gateway_refunds_charge_idx ON simulated_gateway_refunds (charge_key);

-- Once per member and campaign for each outcome; once per purchase for `shipped`.
CREATE UNIQUE INDEX notifications_campaign_once_key ON notifications (member_id, drop_id, kind)
    WHERE kind IN ('campaign_funded', 'campaign_unfunded');
CREATE UNIQUE INDEX notifications_shipped_once_key ON notifications (member_id, purchase_id)
    WHERE kind = 'shipped';

-- The back office's search (GET /api/v1/admin/search): substring matches served by trigram indexes (pg_trgm is
-- created by 0002, which indexes product names already), newest first.
CREATE INDEX members_email_trgm_idx ON members USING gin (email gin_trgm_ops);
CREATE INDEX members_name_trgm_idx ON members USING gin (name gin_trgm_ops);
CREATE INDEX members_created_idx ON members (created_at DESC, id DESC);
CREATE INDEX products_created_idx ON products (created_at DESC, id DESC) WHERE deleted_at IS NULL;
