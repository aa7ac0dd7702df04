-- Stores (API.md, "Stores"): a seller's storefront that members follow, its products, its suspension by an
-- admin, and restock alerts on sold-out shelf products.
--
-- `follower_count` moves in the follow's own transaction, as `count +/- 1`, only when a follow row really came or
-- went (as `products.heart_count`). `product_count` is moved by the triggers below, in the statement that adds a
-- product to a store, takes it out, moves it or soft-deletes it, whichever area's statement that is: the store's
-- row is updated (so locked) by each, which makes concurrent creates add up exactly.
CREATE TABLE stores (
    -- UUID v7 from the service: ordering by id is ordering by creation, which the lists' keyset uses.
    id uuid PRIMARY KEY,
    seller_id uuid NOT NULL CONSTRAINT stores_seller_fkey REFERENCES members (id),
    name text NOT NULL CONSTRAINT stores_name_check CHECK (char_length(name) BETWEEN 1 AND 200),
    description text CONSTRAINT stores_description_check CHECK (char_length(description) <= 5000),
    status text NOT NULL DEFAULT 'active' CONSTRAINT stores_status_check CHECK (status IN ('active', 'suspended')),
    follower_count integer NOT NULL DEFAULT 0 CONSTRAINT stores_follower_count_check CHECK (follower_count >= 0),
    product_count integer NOT NULL DEFAULT 0 CONSTRAINT stores_product_count_check CHECK (product_count >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Names are unique ignoring case; the service maps this index's violation to 409 store_name_taken.
CREATE UNIQUE INDEX stores_name_key ON stores (lower(name));
CREATE INDEX stores_seller_idx ON stores (seller_id);
-- Search: `name ILIKE '%text%' OR description ILIKE '%text%'` over active stores, one trigram index per column
-- (the planner ORs the two bitmaps).
CREATE INDEX stores_name_trgm_idx ON stores USING gin (name gin_trgm_ops) WHERE status = 'active';
CREATE INDEX stores_description_trgm_idx ON stores USING gin (description gin_trgm_ops) WHERE status = 'active';

-- A product may sit in one of its seller's stores. Deleting the store leaves the product, without a store.
ALTER TABLE products ADD COLUMN store_id uuid
    CONSTRAINT products_store_fkey REFERENCES stores (id) ON DELETE SET NULL;
-- A store's products, newest first (keyset on id).
CREATE INDEX products_store_recent_idx ON products (store_id, id DESC)
    WHERE store_id IS NOT NULL AND deleted_at IS NULL;

CREATE TABLE store_follows (
    store_id uuid NOT NULL CONSTRAINT store_follows_store_fkey REFERENCES stores (id) ON DELETE CASCADE,
    member_id uuid NOT NULL CONSTRAINT store_follows_member_fkey REFERENCES members (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Also "who follows this store", which the notifier reads when a drop of one of its products is announced.
    CONSTRAINT store_follows_pkey PRIMARY KEY (store_id, member_id)
);
-- The stores I follow, most recently followed first (keyset on created_at, store_id).
CREATE INDEX store_follows_member_recent_idx ON store_follows (member_id, created_at DESC, store_id DESC);

-- product_count on insert: one UPDATE per statement (a bulk create of 1000 products moves its store once), the
-- stores' rows locked in id order first so that two bulk creates over the same stores cannot deadlock.
CREATE FUNCTION stores_count_inserted_products() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM stores
    WHERE id IN (SELECT store_id FROM inserted WHERE store_id IS NOT NULL AND deleted_at IS NULL)
    ORDER BY id FOR NO KEY UPDATE;
    UPDATE stores SET product_count = stores.product_count + added.n
    FROM (SELECT store_id, count(*) AS n FROM inserted
          WHERE store_id IS NOT NULL AND deleted_at IS NULL GROUP BY store_id) added
    WHERE stores.id = added.store_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER products_store_count_insert AFTER INSERT ON products
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION stores_count_inserted_products();

-- product_count on update: only rows whose store or deletion changed (the WHEN keeps stock and price updates
-- free of it). A store's deletion sets its products' store_id to NULL: the old store's row is gone by then, so its
-- UPDATE touches nothing.
CREATE FUNCTION stores_count_moved_product() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.store_id IS NOT NULL AND OLD.deleted_at IS NULL THEN
        UPDATE stores SET product_count = product_count - 1 WHERE id = OLD.store_id;
    END IF;
    IF NEW.store_id IS NOT NULL AND NEW.deleted_at IS NULL THEN
        UPDATE stores SET product_count = product_count + 1 WHERE id = NEW.store_id;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER products_store_count_update AFTER UPDATE OF store_id, deleted_at ON products
    FOR EACH ROW
    WHEN (OLD.store_id IS DISTINCT FROM NEW.store_id OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at)
    EXECUTE FUNCTION stores_count_moved_product();

-- "Tell me when it is back": one pending request per member and shelf product. The statement that takes a
-- product's shelf stock from 0 to more deletes its requests (DELETE ... RETURNING, under the product's row lock)
-- and writes one `restock` notification per request in the same transaction, so each request is used once.
CREATE TABLE restock_alerts (
    id uuid PRIMARY KEY,
    product_id uuid NOT NULL CONSTRAINT restock_alerts_product_fkey REFERENCES products (id) ON DELETE CASCADE,
    member_id uuid NOT NULL CONSTRAINT restock_alerts_member_fkey REFERENCES members (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT restock_alerts_product_member_key UNIQUE (product_id, member_id)
);
-- A shelf product's restock notification (no drop_id) carries the request it answers in burst_id: once per
-- member and request, whichever retries or instances write it.
CREATE UNIQUE INDEX notifications_shelf_restock_once_key ON notifications (member_id, burst_id)
    WHERE kind = 'restock' AND drop_id IS NULL;
