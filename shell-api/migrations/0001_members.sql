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
