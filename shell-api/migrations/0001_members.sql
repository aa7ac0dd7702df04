-- Members and their credentials. Emails are stored lower-cased; uniqueness is the database's job.
CREATE TABLE members (
    id uuid PRIMARY KEY,
    email text NOT NULL,
    password_hash text NOT NULL,
    name text NOT NULL,
    greeting text,
    role text NOT NULL DEFAULT 'customer' CONSTRAINT members_role_check CHECK (role IN ('customer', 'seller', 'admin')),
    -- Bumped by logout-all and password change: access tokens carry the version they were issued under.
    token_version integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT members_email_key UNIQUE (email)
);

-- Refresh tokens, stored only as SHA-256 hashes of the opaque token the client holds. Every login starts a
-- family; every refresh marks the presented token used and issues its successor in the same family. A used or
-- revoked token presented again means the token leaked, so the whole family is revoked.
CREATE TABLE refresh_tokens (
    id uuid PRIMARY KEY,
    token_hash bytea NOT NULL CONSTRAINT refresh_tokens_token_hash_key UNIQUE,
    family_id uuid NOT NULL,
    member_id uuid NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);
-- logout-all revokes what is still live; the partial index keeps that scan to live tokens.
CREATE INDEX refresh_tokens_member_live_idx ON refresh_tokens (member_id) WHERE revoked_at IS NULL;
