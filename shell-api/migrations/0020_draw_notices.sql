-- A draw's entrants are told draw_won or draw_lost once per member and drop (the kinds are migration 0015's);
-- the allocator and the settle write them in the transaction that moves the entry, ON CONFLICT DO NOTHING.
CREATE UNIQUE INDEX notifications_draw_once_key ON notifications (member_id, drop_id, kind)
    WHERE kind IN ('draw_won', 'draw_lost');
