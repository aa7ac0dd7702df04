-- When a member's token_version or role last changed. Instances poll this to learn of logout-all, password
-- changes and role changes made elsewhere, so checking a token never needs a query.
ALTER TABLE members ADD COLUMN auth_changed_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX members_auth_changed_idx ON members (auth_changed_at);

CREATE FUNCTION members_stamp_auth_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.token_version IS DISTINCT FROM OLD.token_version OR NEW.role IS DISTINCT FROM OLD.role THEN
        NEW.auth_changed_at := clock_timestamp();
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER members_auth_change BEFORE UPDATE ON members
    FOR EACH ROW EXECUTE FUNCTION members_stamp_auth_change();
