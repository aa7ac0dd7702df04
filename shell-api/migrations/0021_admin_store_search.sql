-- The back office finds stores by name, suspended ones too (API.md, "Stores"): a trigram index over every store's
-- name (the stores area's own, 0016, cover active stores only, which is what the public search shows).
CREATE INDEX stores_name_all_trgm_idx ON stores USING gin (name gin_trgm_ops);
