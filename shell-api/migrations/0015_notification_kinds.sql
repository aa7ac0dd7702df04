-- The notification kinds of the launch modes, campaigns, fulfilment, subscriptions and stores (API.md), widened
-- in one place so each of those areas adds only its own once-only index in its own migration.
--
-- Each kind's references (the shape check says which must be set):
--   drop_scheduled, drop_open        drop_id, product_id (unchanged)
--   restock                          a drop's restock: drop_id, product_id, burst_id (unchanged);
--                                    a shelf product's restock: product_id, no drop_id
--   refund_decided                   refund_id (unchanged)
--   draw_won, draw_lost              drop_id
--   campaign_funded, campaign_unfunded  drop_id
--   shipped                          drop_id, purchase_id
--   subscription_renewed, subscription_payment_failed, subscription_changed  subscription_id
-- No foreign keys on purchase_id and subscription_id: like refund_id, they name another area's rows, and the id is
-- what the member looks up.
ALTER TABLE notifications
    ADD COLUMN purchase_id uuid,
    ADD COLUMN subscription_id uuid,
    DROP CONSTRAINT notifications_kind_check,
    DROP CONSTRAINT notifications_shape_check,
    ADD CONSTRAINT notifications_kind_check CHECK (kind IN (
        'drop_scheduled', 'drop_open', 'restock', 'refund_decided',
        'draw_won', 'draw_lost', 'campaign_funded', 'campaign_unfunded', 'shipped',
        'subscription_renewed', 'subscription_payment_failed', 'subscription_changed')),
    ADD CONSTRAINT notifications_shape_check CHECK (
        (kind IN ('drop_scheduled', 'drop_open') AND drop_id IS NOT NULL AND product_id IS NOT NULL
            AND refund_id IS NULL AND burst_id IS NULL)
        OR (kind = 'restock' AND product_id IS NOT NULL AND refund_id IS NULL
            AND (drop_id IS NOT NULL AND burst_id IS NOT NULL OR drop_id IS NULL))
        OR (kind = 'refund_decided' AND refund_id IS NOT NULL AND drop_id IS NULL AND burst_id IS NULL)
        OR (kind IN ('draw_won', 'draw_lost', 'campaign_funded', 'campaign_unfunded') AND drop_id IS NOT NULL)
        OR (kind = 'shipped' AND drop_id IS NOT NULL AND purchase_id IS NOT NULL)
        OR (kind IN ('subscription_renewed', 'subscription_payment_failed', 'subscription_changed')
            AND subscription_id IS NOT NULL)
    );
