-- Guarantee 5a: Postgres refuses to store more paid units of a drop than its stock, whatever any gate says.
-- `sold` counts the units of the drop's stored purchases. The writer raises it in the same statement that stores
-- the purchases (one UPDATE per drop per batch, not per row), so a batch that would pass the stock fails its CHECK
-- and is rolled back; the writer then stores its purchases one by one and refuses those that do not fit.
-- NOT VALID: a drop oversold before this migration (the fault this fixes) must not stop the upgrade; every later
-- change of the row is checked.
ALTER TABLE drops ADD COLUMN sold integer NOT NULL DEFAULT 0;
UPDATE drops d SET sold = s.units
FROM (SELECT drop_id, sum(quantity)::int4 AS units FROM purchases GROUP BY drop_id) s
WHERE d.id = s.drop_id;
ALTER TABLE drops ADD CONSTRAINT drops_sold_check CHECK (sold >= 0 AND sold <= stock) NOT VALID;
