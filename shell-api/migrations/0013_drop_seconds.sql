-- A drop's report: what the engine decided each second (seconds from the drop's opening), added up across
-- instances by the writer's upsert. Kept after the drop settles. No foreign key to drops, like the writer's other
-- tables (migration 0011): the writer's rows are checked by the engine, not by a lookup per row.
CREATE TABLE drop_seconds (
    drop_id          uuid    NOT NULL,
    second           integer NOT NULL CHECK (second >= 0),
    reserved         bigint  NOT NULL DEFAULT 0,
    paid             bigint  NOT NULL DEFAULT 0,
    expired          bigint  NOT NULL DEFAULT 0,
    cancelled        bigint  NOT NULL DEFAULT 0,
    declined         bigint  NOT NULL DEFAULT 0,
    refused_sold_out bigint  NOT NULL DEFAULT 0,
    refused_limit    bigint  NOT NULL DEFAULT 0,
    refused_overload bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (drop_id, second)
);
