//! Feeds against real Postgres, in-process through `app()`: posts and comments with their ownership rules, bad
//! input (422/404/403, never 500), idempotent likes and follows, exact counts under parallel likes and unlikes,
//! follower lists, newsfeed scopes and orders, pagination while inserting, and the activity feed.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
// Helpers outside `#[test]` functions unwrap too: a panic there is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use axum::http::StatusCode;
use common::{TestApp, TestMember};
use serde_json::{json, Value};
use shell_api::auth::Role;
use uuid::Uuid;

/// Asserts the status, showing the body when it differs.
#[track_caller]
fn expect(response: &common::TestResponse, status: StatusCode) {
    assert_eq!(response.status, status, "body: {}", response.body);
}

async fn new_post(app: &TestApp, author: &TestMember, title: &str) -> Value {
    let body = json!({ "title": title, "content": format!("content of {title}") });
    let response = app
        .call("POST", "/api/v1/posts", Some(&author.token), Some(body))
        .await;
    expect(&response, StatusCode::CREATED);
    response.body
}

async fn new_comment(app: &TestApp, author: &TestMember, post: &str, text: &str) -> Value {
    let path = format!("/api/v1/posts/{post}/comments");
    let body = json!({ "content": text });
    let response = app
        .call("POST", &path, Some(&author.token), Some(body))
        .await;
    expect(&response, StatusCode::CREATED);
    response.body
}

async fn put(app: &TestApp, member: &TestMember, path: &str) -> StatusCode {
    app.call("PUT", path, Some(&member.token), None)
        .await
        .status
}

async fn delete(app: &TestApp, member: &TestMember, path: &str) -> StatusCode {
    app.call("DELETE", path, Some(&member.token), None)
        .await
        .status
}

async fn get(app: &TestApp, member: &TestMember, path: &str) -> Value {
    let response = app.call("GET", path, Some(&member.token), None).await;
    expect(&response, StatusCode::OK);
    response.body
}

/// Every page of a list, following `next_cursor`; `path` must already carry a `?`.
async fn all_pages(app: &TestApp, member: &TestMember, path: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(cursor) => format!("{path}&cursor={cursor}"),
            None => path.to_owned(),
        };
        let page = get(app, member, &url).await;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

fn id_of(value: &Value) -> String {
    value["id"].as_str().unwrap().to_owned()
}

async fn count(app: &TestApp, sql: &str, id: &str) -> i64 {
    let id: Uuid = id.parse().unwrap();
    app.db
        .client()
        .await
        .query_one(sql, &[&id])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn posts_crud_and_ownership() {
    let app = TestApp::new().await;
    let author = app.member(Role::Customer).await;
    let other = app.member(Role::Seller).await;
    let admin = app.member(Role::Admin).await;

    let created = new_post(&app, &author, "Drop at noon").await;
    assert_eq!(created["author_id"], author.id.to_string());
    assert_eq!(created["title"], "Drop at noon");
    assert_eq!(created["content"], "content of Drop at noon");
    assert_eq!(created["like_count"], 0);
    assert_eq!(created["comment_count"], 0);
    let id = id_of(&created);
    assert_eq!(id.parse::<Uuid>().unwrap().get_version_num(), 7);
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));

    let path = format!("/api/v1/posts/{id}");
    let read = app.call("GET", &path, None, None).await;
    expect(&read, StatusCode::OK);
    assert_eq!(read.body, created);

    let edit = json!({ "title": "Drop at one" });
    let forbidden = app
        .call("PATCH", &path, Some(&other.token), Some(edit.clone()))
        .await;
    expect(&forbidden, StatusCode::FORBIDDEN);
    assert_eq!(forbidden.code(), "forbidden");
    let edited = app
        .call("PATCH", &path, Some(&author.token), Some(edit))
        .await;
    expect(&edited, StatusCode::OK);
    assert_eq!(edited.body["title"], "Drop at one");
    assert_eq!(
        edited.body["content"], "content of Drop at noon",
        "absent field unchanged"
    );
    let by_admin = json!({ "content": "moderated" });
    let moderated = app
        .call("PATCH", &path, Some(&admin.token), Some(by_admin))
        .await;
    expect(&moderated, StatusCode::OK);
    assert_eq!(moderated.body["content"], "moderated");
    assert_eq!(moderated.body["title"], "Drop at one");

    assert_eq!(delete(&app, &other, &path).await, StatusCode::FORBIDDEN);
    assert_eq!(delete(&app, &author, &path).await, StatusCode::NO_CONTENT);
    let gone = app.call("GET", &path, None, None).await;
    expect(&gone, StatusCode::NOT_FOUND);
    assert_eq!(gone.code(), "post_not_found");
    assert_eq!(delete(&app, &author, &path).await, StatusCode::NOT_FOUND);
    let edit_gone = json!({ "title": "x" });
    let response = app
        .call("PATCH", &path, Some(&author.token), Some(edit_gone))
        .await;
    expect(&response, StatusCode::NOT_FOUND);

    // An admin may delete anyone's post.
    let second = id_of(&new_post(&app, &author, "second").await);
    let second_path = format!("/api/v1/posts/{second}");
    assert_eq!(
        delete(&app, &admin, &second_path).await,
        StatusCode::NO_CONTENT
    );

    let anonymous = app
        .call(
            "POST",
            "/api/v1/posts",
            None,
            Some(json!({"title": "t", "content": "c"})),
        )
        .await;
    expect(&anonymous, StatusCode::UNAUTHORIZED);
    let not_uuid = app.call("GET", "/api/v1/posts/123", None, None).await;
    expect(&not_uuid, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_is_a_client_error_never_a_500() {
    let app = TestApp::new().await;
    let member = app.member(Role::Customer).await;
    let token = Some(member.token.as_str());
    let post = id_of(&new_post(&app, &member, "target").await);

    let long_title = "t".repeat(201);
    let long_content = "c".repeat(10_001);
    let cases = [
        (json!({ "title": "", "content": "c" }), "title"),
        (json!({ "title": "   ", "content": "c" }), "title"),
        (json!({ "content": "c" }), "title"),
        (json!({ "title": long_title, "content": "c" }), "title"),
        (json!({ "title": "t", "content": "" }), "content"),
        (json!({ "title": "t", "content": long_content }), "content"),
        (
            json!({ "title": "t", "content": "nul \u{0} here" }),
            "content",
        ),
        (json!({ "title": 5, "content": "c" }), "body"),
    ];
    for (body, field) in cases {
        let response = app
            .call("POST", "/api/v1/posts", token, Some(body.clone()))
            .await;
        expect(&response, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(response.code(), "validation");
        assert!(
            response.body["error"]["fields"][field].is_string(),
            "{body} -> {}",
            response.body
        );
    }
    // Exactly at the limits is fine; limits count characters, not bytes.
    let at_limit = json!({ "title": "가".repeat(200), "content": "c".repeat(10_000) });
    let response = app
        .call("POST", "/api/v1/posts", token, Some(at_limit))
        .await;
    expect(&response, StatusCode::CREATED);

    let patch = format!("/api/v1/posts/{post}");
    let response = app
        .call("PATCH", &patch, token, Some(json!({ "title": "" })))
        .await;
    expect(&response, StatusCode::UNPROCESSABLE_ENTITY);
    let response = app
        .call(
            "PATCH",
            &patch,
            token,
            Some(json!({ "content": "x".repeat(10_001) })),
        )
        .await;
    expect(&response, StatusCode::UNPROCESSABLE_ENTITY);

    let comments = format!("/api/v1/posts/{post}/comments");
    for body in [
        json!({ "content": "" }),
        json!({}),
        json!({ "content": "c".repeat(2_001) }),
    ] {
        let response = app.call("POST", &comments, token, Some(body)).await;
        expect(&response, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(response.body["error"]["fields"]["content"].is_string());
    }

    let missing = Uuid::now_v7();
    let not_found = [
        (
            "PUT",
            format!("/api/v1/posts/{missing}/like"),
            "post_not_found",
        ),
        (
            "DELETE",
            format!("/api/v1/posts/{missing}/like"),
            "post_not_found",
        ),
        (
            "PUT",
            format!("/api/v1/comments/{missing}/like"),
            "comment_not_found",
        ),
        (
            "DELETE",
            format!("/api/v1/comments/{missing}/like"),
            "comment_not_found",
        ),
        (
            "DELETE",
            format!("/api/v1/comments/{missing}"),
            "comment_not_found",
        ),
        (
            "PUT",
            format!("/api/v1/members/{missing}/follow"),
            "member_not_found",
        ),
        (
            "DELETE",
            format!("/api/v1/members/{missing}/follow"),
            "member_not_found",
        ),
        (
            "GET",
            format!("/api/v1/members/{missing}/followers"),
            "member_not_found",
        ),
        (
            "GET",
            format!("/api/v1/members/{missing}/following"),
            "member_not_found",
        ),
        (
            "GET",
            format!("/api/v1/members/{missing}/posts"),
            "member_not_found",
        ),
        (
            "GET",
            format!("/api/v1/posts/{missing}/comments"),
            "post_not_found",
        ),
        (
            "PUT",
            "/api/v1/posts/not-a-uuid/like".to_owned(),
            "not_found",
        ),
    ];
    for (method, path, code) in not_found {
        let response = app.call(method, &path, token, None).await;
        expect(&response, StatusCode::NOT_FOUND);
        assert_eq!(response.code(), code, "{method} {path}");
    }
    let response = app
        .call(
            "POST",
            &format!("/api/v1/posts/{missing}/comments"),
            token,
            Some(json!({ "content": "hello?" })),
        )
        .await;
    expect(&response, StatusCode::NOT_FOUND);
    assert_eq!(response.code(), "post_not_found");

    let response = app
        .call(
            "PUT",
            &format!("/api/v1/members/{}/follow", member.id),
            token,
            None,
        )
        .await;
    expect(&response, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(response.code(), "validation");

    let recent_cursor = get(&app, &member, "/api/v1/feed?scope=all&limit=1").await["next_cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    let bad_queries = [
        ("/api/v1/feed?scope=friends".to_owned(), "scope"),
        ("/api/v1/feed?sort=hot".to_owned(), "sort"),
        ("/api/v1/feed?limit=0".to_owned(), "limit"),
        ("/api/v1/feed?limit=101".to_owned(), "limit"),
        ("/api/v1/feed?limit=ten".to_owned(), "query"),
        ("/api/v1/feed?cursor=zz".to_owned(), "cursor"),
        (
            format!("/api/v1/feed?scope=all&sort=popular&cursor={recent_cursor}"),
            "cursor",
        ),
        ("/api/v1/activity?cursor=00".to_owned(), "cursor"),
        (format!("/api/v1/posts/{post}/comments?limit=-1"), "limit"),
    ];
    for (path, field) in bad_queries {
        let response = app.call("GET", &path, token, None).await;
        expect(&response, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            response.body["error"]["fields"][field].is_string(),
            "{path} -> {}",
            response.body
        );
    }
    let response = app.call("GET", "/api/v1/feed", None, None).await;
    expect(&response, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn likes_and_follows_are_idempotent() {
    let app = TestApp::new().await;
    let author = app.member(Role::Seller).await;
    let fan = app.member(Role::Customer).await;
    let post = id_of(&new_post(&app, &author, "sneakers").await);
    let like = format!("/api/v1/posts/{post}/like");
    let post_path = format!("/api/v1/posts/{post}");

    assert_eq!(put(&app, &fan, &like).await, StatusCode::NO_CONTENT);
    assert_eq!(put(&app, &fan, &like).await, StatusCode::NO_CONTENT);
    assert_eq!(get(&app, &fan, &post_path).await["like_count"], 1);
    let likes_sql = "SELECT count(*) FROM post_likes WHERE post_id = $1";
    assert_eq!(count(&app, likes_sql, &post).await, 1);
    assert_eq!(delete(&app, &fan, &like).await, StatusCode::NO_CONTENT);
    assert_eq!(delete(&app, &fan, &like).await, StatusCode::NO_CONTENT);
    assert_eq!(get(&app, &fan, &post_path).await["like_count"], 0);
    assert_eq!(count(&app, likes_sql, &post).await, 0);

    let comment = id_of(&new_comment(&app, &fan, &post, "want").await);
    let comment_like = format!("/api/v1/comments/{comment}/like");
    assert_eq!(
        put(&app, &author, &comment_like).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        put(&app, &author, &comment_like).await,
        StatusCode::NO_CONTENT
    );
    let comments = get(&app, &fan, &format!("/api/v1/posts/{post}/comments")).await;
    assert_eq!(comments["items"][0]["like_count"], 1);
    assert_eq!(
        delete(&app, &author, &comment_like).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        delete(&app, &author, &comment_like).await,
        StatusCode::NO_CONTENT
    );
    let comments = get(&app, &fan, &format!("/api/v1/posts/{post}/comments")).await;
    assert_eq!(comments["items"][0]["like_count"], 0);

    let follow = format!("/api/v1/members/{}/follow", author.id);
    assert_eq!(put(&app, &fan, &follow).await, StatusCode::NO_CONTENT);
    assert_eq!(put(&app, &fan, &follow).await, StatusCode::NO_CONTENT);
    let follows_sql = "SELECT count(*) FROM follows WHERE followee_id = $1";
    assert_eq!(count(&app, follows_sql, &author.id.to_string()).await, 1);
    let followed_sql =
        "SELECT count(*) FROM activities WHERE target_member_id = $1 AND kind = 'followed'";
    assert_eq!(count(&app, followed_sql, &author.id.to_string()).await, 1);
    assert_eq!(delete(&app, &fan, &follow).await, StatusCode::NO_CONTENT);
    assert_eq!(delete(&app, &fan, &follow).await, StatusCode::NO_CONTENT);
    assert_eq!(count(&app, follows_sql, &author.id.to_string()).await, 0);
    assert_eq!(count(&app, followed_sql, &author.id.to_string()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_likes_and_unlikes_keep_counts_exact() {
    const MEMBERS: usize = 50;
    const ROUNDS: usize = 6;
    let app = Arc::new(TestApp::new().await);
    let author = app.member(Role::Seller).await;
    let post = id_of(&new_post(&app, &author, "limited run").await);
    let comment = id_of(&new_comment(&app, &author, &post, "first").await);
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        members.push(app.member(Role::Customer).await);
    }

    // Each member toggles its likes ROUNDS times, sending every request twice at once (a double click), and
    // ends liking the post and the comment when its index is even.
    let mut tasks = Vec::new();
    for (index, member) in members.into_iter().enumerate() {
        let app = Arc::clone(&app);
        let post_like = format!("/api/v1/posts/{post}/like");
        let comment_like = format!("/api/v1/comments/{comment}/like");
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for round in 0..ROUNDS {
                let method = if round % 2 == 0 { "PUT" } else { "DELETE" };
                let (a, b, c) = tokio::join!(
                    app.call(method, &post_like, Some(&member.token), None),
                    app.call(method, &post_like, Some(&member.token), None),
                    app.call(method, &comment_like, Some(&member.token), None),
                );
                statuses.extend([a.status, b.status, c.status]);
            }
            if index % 2 == 0 {
                let a = app.call("PUT", &post_like, Some(&member.token), None).await;
                let b = app
                    .call("PUT", &comment_like, Some(&member.token), None)
                    .await;
                statuses.extend([a.status, b.status]);
            }
            statuses
        }));
    }
    for task in tasks {
        for status in task.await.unwrap() {
            assert_eq!(status, StatusCode::NO_CONTENT);
        }
    }

    let expected = i64::try_from(MEMBERS / 2).unwrap();
    let like_count = "SELECT like_count::bigint FROM posts WHERE id = $1";
    let like_rows = "SELECT count(*) FROM post_likes WHERE post_id = $1";
    let liked = "SELECT count(*) FROM activities WHERE post_id = $1 AND kind = 'liked' AND comment_id IS NULL";
    assert_eq!(count(&app, like_count, &post).await, expected);
    assert_eq!(count(&app, like_rows, &post).await, expected);
    assert_eq!(count(&app, liked, &post).await, expected);

    let comment_count = "SELECT like_count::bigint FROM comments WHERE id = $1";
    let comment_rows = "SELECT count(*) FROM comment_likes WHERE comment_id = $1";
    let comment_liked = "SELECT count(*) FROM activities WHERE comment_id = $1 AND kind = 'liked'";
    assert_eq!(count(&app, comment_count, &comment).await, expected);
    assert_eq!(count(&app, comment_rows, &comment).await, expected);
    assert_eq!(count(&app, comment_liked, &comment).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn comments_count_exactly_and_list_in_order() {
    const WRITERS: usize = 20;
    let app = Arc::new(TestApp::new().await);
    let author = app.member(Role::Seller).await;
    let admin = app.member(Role::Admin).await;
    let post = id_of(&new_post(&app, &author, "questions?").await);

    // Each writer adds three comments and deletes its second, all writers at once.
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let app = Arc::clone(&app);
        let post = post.clone();
        let writer = app.member(Role::Customer).await;
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for n in 0..3 {
                mine.push(id_of(
                    &new_comment(&app, &writer, &post, &format!("c{n}")).await,
                ));
            }
            let path = format!("/api/v1/comments/{}", mine[1]);
            assert_eq!(delete(&app, &writer, &path).await, StatusCode::NO_CONTENT);
            (writer, mine)
        }));
    }
    let mut written = Vec::new();
    for task in tasks {
        written.push(task.await.unwrap());
    }
    let expected = i64::try_from(WRITERS * 2).unwrap();
    let comment_count = "SELECT comment_count::bigint FROM posts WHERE id = $1";
    let comment_rows = "SELECT count(*) FROM comments WHERE post_id = $1";
    assert_eq!(count(&app, comment_count, &post).await, expected);
    assert_eq!(count(&app, comment_rows, &post).await, expected);

    // Only the comment's author or an admin may delete it; the post's author may not.
    let (writer, mine) = &written[0];
    let path = format!("/api/v1/comments/{}", mine[0]);
    assert_eq!(delete(&app, &author, &path).await, StatusCode::FORBIDDEN);
    assert_eq!(delete(&app, &admin, &path).await, StatusCode::NO_CONTENT);
    assert_eq!(delete(&app, writer, &path).await, StatusCode::NOT_FOUND);
    assert_eq!(count(&app, comment_count, &post).await, expected - 1);

    // Oldest first, across pages, each comment once.
    let listed = all_pages(
        &app,
        &author,
        &format!("/api/v1/posts/{post}/comments?limit=7"),
    )
    .await;
    assert_eq!(listed.len(), WRITERS * 2 - 1);
    let times: Vec<&str> = listed
        .iter()
        .map(|c| c["created_at"].as_str().unwrap())
        .collect();
    let parsed: Vec<chrono::DateTime<chrono::Utc>> =
        times.iter().map(|t| t.parse().unwrap()).collect();
    assert!(parsed.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(
        ids(&listed).into_iter().collect::<HashSet<_>>().len(),
        listed.len()
    );
    assert_eq!(listed[0]["post_id"], post.as_str());

    // Deleting the post takes its comments (and their counts) with it.
    let post_path = format!("/api/v1/posts/{post}");
    assert_eq!(
        delete(&app, &author, &post_path).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(count(&app, comment_rows, &post).await, 0);
    let comments = app
        .call("GET", &format!("/api/v1/posts/{post}/comments"), None, None)
        .await;
    expect(&comments, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn follower_and_following_lists() {
    let app = TestApp::new().await;
    let star = app.member(Role::Seller).await;
    let mut fans = Vec::new();
    for _ in 0..5 {
        let fan = app.member(Role::Customer).await;
        let path = format!("/api/v1/members/{}/follow", star.id);
        assert_eq!(put(&app, &fan, &path).await, StatusCode::NO_CONTENT);
        fans.push(fan);
    }
    let star_follows = format!("/api/v1/members/{}/follow", fans[0].id);
    assert_eq!(
        put(&app, &star, &star_follows).await,
        StatusCode::NO_CONTENT
    );

    let followers = all_pages(
        &app,
        &star,
        &format!("/api/v1/members/{}/followers?limit=2", star.id),
    )
    .await;
    let newest_first: Vec<String> = fans.iter().rev().map(|f| f.id.to_string()).collect();
    assert_eq!(ids(&followers), newest_first);
    assert_eq!(followers[0]["name"], "Test Member");
    assert!(followers[0]["followed_at"].is_string());

    let following = get(
        &app,
        &star,
        &format!("/api/v1/members/{}/following", star.id),
    )
    .await;
    assert_eq!(
        ids(following["items"].as_array().unwrap()),
        vec![fans[0].id.to_string()]
    );
    assert!(following["next_cursor"].is_null());
    let fan_following = get(
        &app,
        &star,
        &format!("/api/v1/members/{}/following", fans[1].id),
    )
    .await;
    assert_eq!(
        ids(fan_following["items"].as_array().unwrap()),
        vec![star.id.to_string()]
    );

    let unfollow = format!("/api/v1/members/{}/follow", star.id);
    assert_eq!(
        delete(&app, &fans[2], &unfollow).await,
        StatusCode::NO_CONTENT
    );
    let followers = all_pages(
        &app,
        &star,
        &format!("/api/v1/members/{}/followers?limit=100", star.id),
    )
    .await;
    assert_eq!(followers.len(), 4);
    assert!(!ids(&followers).contains(&fans[2].id.to_string()));

    // A member nobody follows has an empty list, not a 404.
    let lonely = app.member(Role::Customer).await;
    let empty = get(
        &app,
        &lonely,
        &format!("/api/v1/members/{}/followers", lonely.id),
    )
    .await;
    assert_eq!(empty["items"], json!([]));
}

#[tokio::test]
async fn feed_scopes_and_sorts() {
    let app = TestApp::new().await;
    let reader = app.member(Role::Customer).await;
    let followed = app.member(Role::Seller).await;
    let stranger = app.member(Role::Seller).await;
    let path = format!("/api/v1/members/{}/follow", followed.id);
    assert_eq!(put(&app, &reader, &path).await, StatusCode::NO_CONTENT);

    let f1 = id_of(&new_post(&app, &followed, "f1").await);
    let s1 = id_of(&new_post(&app, &stranger, "s1").await);
    let f2 = id_of(&new_post(&app, &followed, "f2").await);
    let own = id_of(&new_post(&app, &reader, "own").await);
    let s2 = id_of(&new_post(&app, &stranger, "s2").await);

    // Likes: f1 and s2 two each, s1 one. Popular = likes desc, then newest first among equals.
    let likers = [
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
    ];
    for post in [f1.as_str(), s2.as_str()] {
        for liker in &likers {
            let like = format!("/api/v1/posts/{post}/like");
            assert_eq!(put(&app, liker, &like).await, StatusCode::NO_CONTENT);
        }
    }
    let like = format!("/api/v1/posts/{s1}/like");
    assert_eq!(put(&app, &likers[0], &like).await, StatusCode::NO_CONTENT);

    let feed = |query: &'static str| {
        let app = &app;
        let reader = &reader;
        async move { ids(&all_pages(app, reader, &format!("/api/v1/feed?{query}&limit=2")).await) }
    };
    assert_eq!(
        feed("scope=all&sort=recent").await,
        [
            s2.as_str(),
            own.as_str(),
            f2.as_str(),
            s1.as_str(),
            f1.as_str()
        ]
    );
    assert_eq!(
        feed("scope=all&sort=popular").await,
        [
            s2.as_str(),
            f1.as_str(),
            s1.as_str(),
            own.as_str(),
            f2.as_str()
        ]
    );
    assert_eq!(
        feed("scope=following&sort=recent").await,
        [f2.as_str(), f1.as_str()]
    );
    assert_eq!(
        feed("scope=following&sort=popular").await,
        [f1.as_str(), f2.as_str()]
    );
    // Defaults: following, recent.
    assert_eq!(feed("x=1").await, [f2.as_str(), f1.as_str()]);

    let member_posts = all_pages(
        &app,
        &reader,
        &format!("/api/v1/members/{}/posts?limit=1", stranger.id),
    )
    .await;
    assert_eq!(ids(&member_posts), [s2.as_str(), s1.as_str()]);
    assert_eq!(member_posts[0]["like_count"], 2);
}

/// Pages through `query` `limit` posts at a time, letting `between` write after every page.
async fn page_while_writing(
    app: &TestApp,
    reader: &TestMember,
    query: &str,
    mut between: impl FnMut(usize) -> Option<(TestMember, String)>,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for page_number in 0.. {
        let url = match &cursor {
            Some(cursor) => format!("/api/v1/feed?{query}&limit=7&cursor={cursor}"),
            None => format!("/api/v1/feed?{query}&limit=7"),
        };
        let page = get(app, reader, &url).await;
        seen.extend(ids(page["items"].as_array().unwrap()));
        if let Some((author, title)) = between(page_number) {
            new_post(app, &author, &title).await;
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    seen
}

#[tokio::test]
async fn pagination_while_inserting_neither_repeats_nor_skips() {
    let app = TestApp::new().await;
    let reader = app.member(Role::Customer).await;
    let author = app.member(Role::Seller).await;
    let follow = format!("/api/v1/members/{}/follow", author.id);
    assert_eq!(put(&app, &reader, &follow).await, StatusCode::NO_CONTENT);
    let liker = app.member(Role::Customer).await;
    let mut originals = Vec::new();
    for n in 0..30 {
        let id = id_of(&new_post(&app, &author, &format!("p{n}")).await);
        if n % 3 == 0 {
            let like = format!("/api/v1/posts/{id}/like");
            assert_eq!(put(&app, &liker, &like).await, StatusCode::NO_CONTENT);
        }
        originals.push(id);
    }
    let expected_recent: Vec<String> = originals.iter().rev().cloned().collect();
    let expected_popular: Vec<String> = originals
        .iter()
        .enumerate()
        .rev()
        .filter(|(n, _)| n % 3 == 0)
        .chain(
            originals
                .iter()
                .enumerate()
                .rev()
                .filter(|(n, _)| n % 3 != 0),
        )
        .map(|(_, id)| id.clone())
        .collect();

    for (query, expected) in [
        ("scope=all&sort=recent", &expected_recent),
        ("scope=following&sort=recent", &expected_recent),
        ("scope=all&sort=popular", &expected_popular),
        ("scope=following&sort=popular", &expected_popular),
    ] {
        let mut inserted = 0;
        let seen = page_while_writing(&app, &reader, query, |page| {
            inserted += 1;
            Some((author.clone(), format!("{query} during page {page}")))
        })
        .await;
        assert!(inserted >= 4, "{query}: paged {inserted} times");
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{query}: a post was served twice");
        let originals_seen: Vec<String> = seen
            .iter()
            .filter(|id| originals.contains(id))
            .cloned()
            .collect();
        assert_eq!(
            &originals_seen, expected,
            "{query}: originals skipped or out of order"
        );
    }
}

#[tokio::test]
async fn activity_feed_contents_and_order() {
    let app = TestApp::new().await;
    let me = app.member(Role::Seller).await;
    let friend = app.member(Role::Customer).await;
    let fan = app.member(Role::Customer).await;
    let stranger = app.member(Role::Customer).await;
    let follow_friend = format!("/api/v1/members/{}/follow", friend.id);
    assert_eq!(put(&app, &me, &follow_friend).await, StatusCode::NO_CONTENT);

    let mine = id_of(&new_post(&app, &me, "my drop").await);
    let friends_post = id_of(&new_post(&app, &friend, "friend's post").await);
    let strangers_post = id_of(&new_post(&app, &stranger, "stranger's post").await);
    // Done to me by someone I do not follow.
    let fan_comment = id_of(&new_comment(&app, &fan, &mine, "when?").await);
    assert_eq!(
        put(&app, &fan, &format!("/api/v1/posts/{mine}/like")).await,
        StatusCode::NO_CONTENT
    );
    let follow_me = format!("/api/v1/members/{}/follow", me.id);
    assert_eq!(put(&app, &fan, &follow_me).await, StatusCode::NO_CONTENT);
    // Done by someone I follow, to someone else.
    let like_strangers = format!("/api/v1/posts/{strangers_post}/like");
    assert_eq!(
        put(&app, &friend, &like_strangers).await,
        StatusCode::NO_CONTENT
    );
    // Done by someone I follow, to me: listed once.
    let friend_comment = id_of(&new_comment(&app, &friend, &mine, "nice").await);
    // Not for me: a stranger acting on a stranger, and my own actions.
    new_comment(&app, &stranger, &strangers_post, "bump").await;
    new_comment(&app, &me, &mine, "self reply").await;
    let my_reply = id_of(&new_comment(&app, &me, &friends_post, "hi").await);
    // A like on my comment is done to me.
    let like_reply = format!("/api/v1/comments/{my_reply}/like");
    assert_eq!(put(&app, &fan, &like_reply).await, StatusCode::NO_CONTENT);

    let activity = all_pages(&app, &me, "/api/v1/activity?limit=3").await;
    let summary: Vec<(String, String)> = activity
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap().to_owned(),
                a["actor_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let (me_id, friend_id, fan_id) = (me.id.to_string(), friend.id.to_string(), fan.id.to_string());
    let expected = vec![
        ("liked".to_owned(), fan_id.clone()),
        ("commented".to_owned(), friend_id.clone()),
        ("liked".to_owned(), friend_id.clone()),
        ("followed".to_owned(), fan_id.clone()),
        ("liked".to_owned(), fan_id.clone()),
        ("commented".to_owned(), fan_id.clone()),
        ("posted".to_owned(), friend_id.clone()),
    ];
    assert_eq!(summary, expected);
    assert!(summary.iter().all(|(_, actor)| *actor != me_id));
    // Shapes: ids present where they apply, absent where they do not.
    assert_eq!(activity[0]["comment_id"], my_reply.as_str());
    assert_eq!(activity[0]["post_id"], friends_post.as_str());
    assert_eq!(activity[0]["target_member_id"], me_id.as_str());
    assert_eq!(activity[1]["comment_id"], friend_comment.as_str());
    assert_eq!(activity[2]["post_id"], strangers_post.as_str());
    assert_eq!(activity[2]["target_member_id"], stranger.id.to_string());
    assert_eq!(activity[3]["target_member_id"], me_id.as_str());
    assert!(activity[3].get("post_id").is_none());
    assert_eq!(activity[5]["comment_id"], fan_comment.as_str());
    assert_eq!(activity[6]["post_id"], friends_post.as_str());
    assert!(activity[6].get("target_member_id").is_none());
    let times: Vec<chrono::DateTime<chrono::Utc>> = activity
        .iter()
        .map(|a| a["created_at"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]));

    // Undoing removes the activity; deleting a post removes the activities about it.
    assert_eq!(delete(&app, &fan, &follow_me).await, StatusCode::NO_CONTENT);
    assert_eq!(
        delete(&app, &fan, &like_reply).await,
        StatusCode::NO_CONTENT
    );
    let mine_path = format!("/api/v1/posts/{mine}");
    assert_eq!(delete(&app, &me, &mine_path).await, StatusCode::NO_CONTENT);
    let activity = all_pages(&app, &me, "/api/v1/activity?limit=100").await;
    let kinds: Vec<&str> = activity
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["liked", "posted"]);
    assert_eq!(activity[0]["actor_id"], friend_id.as_str());

    // The stranger follows nobody; of what was done to its post, only the friend's like is someone else's.
    let strangers = all_pages(&app, &stranger, "/api/v1/activity?limit=100").await;
    assert_eq!(strangers.len(), 1);
    assert_eq!(strangers[0]["kind"], "liked");
    assert_eq!(strangers[0]["actor_id"], friend_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_post_while_others_like_it_is_never_a_500() {
    let app = Arc::new(TestApp::new().await);
    for attempt in 0..5u64 {
        let author = app.member(Role::Seller).await;
        let post = id_of(&new_post(&app, &author, "short-lived").await);
        let mut comments = Vec::new();
        for n in 0..3 {
            comments.push(id_of(
                &new_comment(&app, &author, &post, &format!("c{n}")).await,
            ));
        }
        let mut tasks = Vec::new();
        for n in 0..12 {
            let app = Arc::clone(&app);
            let member = app.member(Role::Customer).await;
            let post_like = format!("/api/v1/posts/{post}/like");
            let comment_like = format!("/api/v1/comments/{}/like", comments[n % 3]);
            let comment_post = format!("/api/v1/posts/{post}/comments");
            tasks.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                for method in ["PUT", "DELETE", "PUT"] {
                    for path in [&post_like, &comment_like] {
                        statuses.push(
                            app.call(method, path, Some(&member.token), None)
                                .await
                                .status,
                        );
                    }
                }
                let body = json!({ "content": "late" });
                let response = app
                    .call("POST", &comment_post, Some(&member.token), Some(body))
                    .await;
                statuses.push(response.status);
                statuses
            }));
        }
        // Let the likers get going, a little longer each time, then delete under them.
        tokio::time::sleep(std::time::Duration::from_millis(2 + attempt * 4)).await;
        let post_path = format!("/api/v1/posts/{post}");
        let deleted = app
            .call("DELETE", &post_path, Some(&author.token), None)
            .await;
        expect(&deleted, StatusCode::NO_CONTENT);
        for task in tasks {
            for status in task.await.unwrap() {
                assert!(
                    [
                        StatusCode::NO_CONTENT,
                        StatusCode::CREATED,
                        StatusCode::NOT_FOUND
                    ]
                    .contains(&status),
                    "unexpected {status}"
                );
            }
        }
        for sql in [
            "SELECT count(*) FROM post_likes WHERE post_id = $1",
            "SELECT count(*) FROM comments WHERE post_id = $1",
            "SELECT count(*) FROM activities WHERE post_id = $1",
        ] {
            assert_eq!(count(&app, sql, &post).await, 0, "{sql}");
        }
    }
}
