-- The writer's rows no longer check their drop on insert. Each foreign-key check was a query of its own per row
-- (a KEY SHARE lock on the drop's row, shared by every batch in flight, so a multixact): about 30% of Postgres's
-- CPU for a batch of purchases. Like the member ids above them, these rows are written in batches, and one bad row
-- must not sink a batch of good ones; the engine writes rows only for drops it loaded from this table.
-- What the keys also promised, that a drop with sales never vanishes, is kept on the side that never runs hot:
-- a drop with reservations or purchases cannot be deleted, nor its id changed.
ALTER TABLE reservations DROP CONSTRAINT reservations_drop_id_fkey;
ALTER TABLE purchases DROP CONSTRAINT purchases_drop_id_fkey;

CREATE FUNCTION drops_keep_sales() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM purchases WHERE drop_id = OLD.id)
       OR EXISTS (SELECT 1 FROM reservations WHERE drop_id = OLD.id)
       OR EXISTS (SELECT 1 FROM hold_batches WHERE drop_id = OLD.id) THEN
        RAISE EXCEPTION 'drop % has sales', OLD.id
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'drops_keep_sales';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END
$$;

CREATE TRIGGER drops_keep_sales BEFORE DELETE OR UPDATE OF id ON drops
    FOR EACH ROW EXECUTE FUNCTION drops_keep_sales();
