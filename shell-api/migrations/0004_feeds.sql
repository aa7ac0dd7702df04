-- Feeds: posts, comments, likes, follows and the activity log.
--
-- Counts (posts.like_count, posts.comment_count, comments.like_count) are maintained by the handlers in the same
-- transaction as the row that changes them, as `count = count +/- 1`, only when a row was really inserted or
-- deleted; the CHECKs below catch a count that would go negative. Uniqueness of likes and follows is the primary
-- key's job, so a repeated PUT can never double-count. Deleting a post removes its comments, likes and activities.

CREATE TABLE posts (
    id uuid PRIMARY KEY,
    author_id uuid NOT NULL CONSTRAINT posts_author_fkey REFERENCES members (id) ON DELETE CASCADE,
    title text NOT NULL CONSTRAINT posts_title_check CHECK (char_length(title) BETWEEN 1 AND 200),
    content text NOT NULL CONSTRAINT posts_content_check CHECK (char_length(content) BETWEEN 1 AND 10000),
    like_count integer NOT NULL DEFAULT 0 CONSTRAINT posts_like_count_check CHECK (like_count >= 0),
    comment_count integer NOT NULL DEFAULT 0 CONSTRAINT posts_comment_count_check CHECK (comment_count >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Newsfeed, scope=all: sort=recent and sort=popular (like count, recency breaks ties), keyset-paginated.
CREATE INDEX posts_recent_idx ON posts (created_at DESC, id DESC);
CREATE INDEX posts_popular_idx ON posts (like_count DESC, created_at DESC, id DESC);
-- Newsfeed, scope=following (one short index range per followed author) and a member's own posts.
CREATE INDEX posts_author_recent_idx ON posts (author_id, created_at DESC, id DESC);
CREATE INDEX posts_author_popular_idx ON posts (author_id, like_count DESC, created_at DESC, id DESC);

CREATE TABLE comments (
    id uuid PRIMARY KEY,
    post_id uuid NOT NULL CONSTRAINT comments_post_fkey REFERENCES posts (id) ON DELETE CASCADE,
    author_id uuid NOT NULL CONSTRAINT comments_author_fkey REFERENCES members (id) ON DELETE CASCADE,
    content text NOT NULL CONSTRAINT comments_content_check CHECK (char_length(content) BETWEEN 1 AND 2000),
    like_count integer NOT NULL DEFAULT 0 CONSTRAINT comments_like_count_check CHECK (like_count >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
-- A post's comments, oldest first; also serves the cascade from posts.
CREATE INDEX comments_post_idx ON comments (post_id, created_at, id);
CREATE INDEX comments_author_idx ON comments (author_id);

CREATE TABLE post_likes (
    post_id uuid NOT NULL CONSTRAINT post_likes_post_fkey REFERENCES posts (id) ON DELETE CASCADE,
    member_id uuid NOT NULL CONSTRAINT post_likes_member_fkey REFERENCES members (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT post_likes_pkey PRIMARY KEY (post_id, member_id)
);
CREATE INDEX post_likes_member_idx ON post_likes (member_id);

CREATE TABLE comment_likes (
    comment_id uuid NOT NULL CONSTRAINT comment_likes_comment_fkey REFERENCES comments (id) ON DELETE CASCADE,
    member_id uuid NOT NULL CONSTRAINT comment_likes_member_fkey REFERENCES members (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT comment_likes_pkey PRIMARY KEY (comment_id, member_id)
);
CREATE INDEX comment_likes_member_idx ON comment_likes (member_id);

CREATE TABLE follows (
    follower_id uuid NOT NULL CONSTRAINT follows_follower_fkey REFERENCES members (id) ON DELETE CASCADE,
    followee_id uuid NOT NULL CONSTRAINT follows_followee_fkey REFERENCES members (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Also the newsfeed's "whom do I follow" lookup.
    CONSTRAINT follows_pkey PRIMARY KEY (follower_id, followee_id),
    CONSTRAINT follows_not_self_check CHECK (follower_id <> followee_id)
);
-- Follower and following lists, newest first.
CREATE INDEX follows_followee_recent_idx ON follows (followee_id, created_at DESC, follower_id DESC);
CREATE INDEX follows_follower_recent_idx ON follows (follower_id, created_at DESC, followee_id DESC);

-- What happened, written in the transaction of the action itself. `target_member_id` is the member the action was
-- done to (the post's author for a comment or a post like, the comment's author for a comment like, the followee
-- for a follow), so "done to me" is one indexed predicate.
CREATE TABLE activities (
    id uuid PRIMARY KEY,
    actor_id uuid NOT NULL CONSTRAINT activities_actor_fkey REFERENCES members (id) ON DELETE CASCADE,
    kind text NOT NULL CONSTRAINT activities_kind_check CHECK (kind IN ('posted', 'commented', 'liked', 'followed')),
    post_id uuid CONSTRAINT activities_post_fkey REFERENCES posts (id) ON DELETE CASCADE,
    comment_id uuid CONSTRAINT activities_comment_fkey REFERENCES comments (id) ON DELETE CASCADE,
    target_member_id uuid CONSTRAINT activities_target_fkey REFERENCES members (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT activities_shape_check CHECK (
        (kind = 'posted' AND post_id IS NOT NULL AND comment_id IS NULL AND target_member_id IS NULL)
        OR (kind = 'commented' AND post_id IS NOT NULL AND comment_id IS NOT NULL AND target_member_id IS NOT NULL)
        OR (kind = 'liked' AND post_id IS NOT NULL AND target_member_id IS NOT NULL)
        OR (kind = 'followed' AND post_id IS NULL AND comment_id IS NULL AND target_member_id IS NOT NULL)
    )
);
-- "What the people I follow did" and "what was done to me", newest first.
CREATE INDEX activities_actor_recent_idx ON activities (actor_id, created_at DESC, id DESC);
-- actor_id is included so that "not my own action" is checked in the index (index-only scan).
CREATE INDEX activities_target_recent_idx ON activities (target_member_id, created_at DESC, id DESC)
    INCLUDE (actor_id) WHERE target_member_id IS NOT NULL;
-- Cascades from posts and comments.
CREATE INDEX activities_post_idx ON activities (post_id) WHERE post_id IS NOT NULL;
CREATE INDEX activities_comment_idx ON activities (comment_id) WHERE comment_id IS NOT NULL;
-- An unlike or unfollow removes its activity: at most one per live like or follow, and these find it.
CREATE UNIQUE INDEX activities_post_like_key ON activities (actor_id, post_id)
    WHERE kind = 'liked' AND comment_id IS NULL;
CREATE UNIQUE INDEX activities_comment_like_key ON activities (actor_id, comment_id)
    WHERE kind = 'liked' AND comment_id IS NOT NULL;
CREATE UNIQUE INDEX activities_follow_key ON activities (actor_id, target_member_id)
    WHERE kind = 'followed';
