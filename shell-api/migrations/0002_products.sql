-- Products, owned by a seller. Deleting a product sets deleted_at (soft delete): drops and purchases keep
-- pointing at it, and every read filters deleted rows out.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE products (
    -- UUID v7 from the service: ordering by id is ordering by creation, which the list's keyset uses.
    id uuid PRIMARY KEY,
    seller_id uuid NOT NULL REFERENCES members (id),
    name text NOT NULL CONSTRAINT products_name_check CHECK (char_length(name) BETWEEN 1 AND 200),
    description text CONSTRAINT products_description_check CHECK (char_length(description) <= 5000),
    price bigint NOT NULL CONSTRAINT products_price_check CHECK (price >= 0),
    currency text NOT NULL DEFAULT 'KRW' CONSTRAINT products_currency_check CHECK (currency ~ '^[A-Z]{3}$'),
    kind text NOT NULL CONSTRAINT products_kind_check CHECK (kind IN ('regular', 'preorder')),
    -- Shelf stock of a regular product; a preorder product's stock lives in its drops, so it is always 0 here.
    stock bigint NOT NULL DEFAULT 0 CONSTRAINT products_stock_check CHECK (stock >= 0 AND (kind = 'regular' OR stock = 0)),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);

CREATE INDEX products_seller_idx ON products (seller_id);
-- Case-insensitive substring search (`name ILIKE '%text%'`) over live products.
CREATE INDEX products_name_trgm_idx ON products USING gin (name gin_trgm_ops) WHERE deleted_at IS NULL;
