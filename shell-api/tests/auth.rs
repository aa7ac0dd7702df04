//! Login, refresh-token rotation and reuse detection, logout, logout-all and password change, in-process
//! against a private Postgres database.

// Helpers outside #[test] functions panic on unexpected answers too: that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use axum::http::StatusCode;
use common::{TestApp, TestMember, PASSWORD};
use serde_json::{json, Value};
use shell_api::auth::Role;

async fn login(app: &TestApp, email: &str, password: &str) -> common::TestResponse {
    app.call(
        "POST",
        "/api/v1/auth/login",
        None,
        Some(json!({"email": email, "password": password})),
    )
    .await
}

/// Logs `member` in and returns the token pair body.
async fn session(app: &TestApp, member: &TestMember) -> Value {
    let response = login(app, &member.email, PASSWORD).await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    response.body
}

async fn refresh(app: &TestApp, refresh_token: &Value) -> common::TestResponse {
    app.call(
        "POST",
        "/api/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": refresh_token})),
    )
    .await
}

async fn me(app: &TestApp, access_token: &Value) -> StatusCode {
    app.call("GET", "/api/v1/members/me", access_token.as_str(), None)
        .await
        .status
}

#[tokio::test]
async fn login_issues_a_working_pair_and_hides_which_part_was_wrong() {
    let app = TestApp::new().await;
    let member = app.member(Role::Customer).await;

    let pair = session(&app, &member).await;
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(pair["expires_in"], 900);
    assert_eq!(pair["refresh_token"].as_str().unwrap().len(), 64);
    assert_eq!(me(&app, &pair["access_token"]).await, StatusCode::OK);

    // The email is matched without regard to case.
    let shouting = login(&app, &member.email.to_uppercase(), PASSWORD).await;
    assert_eq!(shouting.status, StatusCode::OK);

    let wrong_password = login(&app, &member.email, "not the password").await;
    let unknown_email = login(&app, "nobody@example.com", PASSWORD).await;
    for response in [&wrong_password, &unknown_email] {
        assert_eq!(response.status, StatusCode::UNAUTHORIZED);
        assert_eq!(response.code(), "invalid_credentials");
    }
    assert_eq!(
        wrong_password.body, unknown_email.body,
        "same answer for both"
    );

    // Only hashes are stored.
    let stored: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM refresh_tokens WHERE token_hash = decode($1, 'hex')",
            &[&pair["refresh_token"].as_str().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "the raw token is not in the table");
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_whole_family() {
    let app = TestApp::new().await;
    let member = app.member(Role::Customer).await;
    let first = session(&app, &member).await;

    let second = refresh(&app, &first["refresh_token"]).await;
    assert_eq!(second.status, StatusCode::OK, "{:?}", second.body);
    assert_ne!(second.body["refresh_token"], first["refresh_token"]);
    assert_eq!(me(&app, &second.body["access_token"]).await, StatusCode::OK);

    let third = refresh(&app, &second.body["refresh_token"]).await;
    assert_eq!(third.status, StatusCode::OK);

    // Someone replays the first token: 401, and the newest token of the family is dead too.
    let replay = refresh(&app, &first["refresh_token"]).await;
    assert_eq!(replay.status, StatusCode::UNAUTHORIZED);
    assert_eq!(replay.code(), "token_reused");
    let newest = refresh(&app, &third.body["refresh_token"]).await;
    assert_eq!(newest.status, StatusCode::UNAUTHORIZED);
    assert_eq!(newest.code(), "token_reused");

    // Another login (another family) is untouched.
    let other = session(&app, &member).await;
    let unaffected = refresh(&app, &other["refresh_token"]).await;
    assert_eq!(unaffected.status, StatusCode::OK);

    let unknown = refresh(&app, &json!("00".repeat(32))).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert_eq!(unknown.code(), "invalid_refresh_token");
}

#[tokio::test]
async fn concurrent_refreshes_of_one_token_let_exactly_one_succeed() {
    let app = TestApp::new().await;
    let member = app.member(Role::Customer).await;
    let pair = session(&app, &member).await;
    let token = &pair["refresh_token"];

    let attempts = futures_util::future::join_all((0..8).map(|_| refresh(&app, token))).await;
    let ok: Vec<_> = attempts
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .collect();
    assert_eq!(
        ok.len(),
        1,
        "{:?}",
        attempts.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for failed in attempts.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(failed.status, StatusCode::UNAUTHORIZED);
        assert_eq!(failed.code(), "token_reused");
    }
    // Exactly one successor was ever issued in this family.
    let issued: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM refresh_tokens WHERE member_id = $1",
            &[&member.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(issued, 2);
}

#[tokio::test]
async fn an_expired_refresh_token_is_refused() {
    let app = TestApp::new().await;
    let member = app.member(Role::Customer).await;
    let pair = session(&app, &member).await;
    app.db
        .client()
        .await
        .execute(
            "UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE member_id = $1",
            &[&member.id],
        )
        .await
        .unwrap();
    let response = refresh(&app, &pair["refresh_token"]).await;
    assert_eq!(response.status, StatusCode::UNAUTHORIZED);
    assert_eq!(response.code(), "refresh_token_expired");
}

#[tokio::test]
async fn logout_ends_one_session_and_logout_all_ends_every_one() {
    let app = TestApp::new().await;
    let member = app.member(Role::Customer).await;
    let phone = session(&app, &member).await;
    let laptop = session(&app, &member).await;

    let logout = app
        .call(
            "POST",
            "/api/v1/auth/logout",
            None,
            Some(json!({"refresh_token": phone["refresh_token"]})),
        )
        .await;
    assert_eq!(logout.status, StatusCode::NO_CONTENT);
    assert_eq!(
        refresh(&app, &phone["refresh_token"]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let laptop = refresh(&app, &laptop["refresh_token"]).await;
    assert_eq!(laptop.status, StatusCode::OK, "the other session lives");

    // logout-all needs an access token.
    let anonymous = app
        .call("POST", "/api/v1/auth/logout-all", None, None)
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    let access = &laptop.body["access_token"];
    assert_eq!(me(&app, access).await, StatusCode::OK);
    assert_eq!(me(&app, &json!(member.token)).await, StatusCode::OK);
    let all = app
        .call("POST", "/api/v1/auth/logout-all", access.as_str(), None)
        .await;
    assert_eq!(all.status, StatusCode::NO_CONTENT);

    // Every access token issued before is dead, and so is every refresh token.
    for token in [access, &json!(member.token)] {
        let response = app
            .call("GET", "/api/v1/members/me", token.as_str(), None)
            .await;
        assert_eq!(response.status, StatusCode::UNAUTHORIZED);
        assert_eq!(response.code(), "token_revoked");
    }
    assert_eq!(
        refresh(&app, &laptop.body["refresh_token"]).await.status,
        StatusCode::UNAUTHORIZED
    );
    // A new login works again.
    let again = session(&app, &member).await;
    assert_eq!(me(&app, &again["access_token"]).await, StatusCode::OK);
}

#[tokio::test]
async fn password_change_checks_the_old_one_and_ends_every_session() {
    let app = TestApp::new().await;
    let member = app.member(Role::Customer).await;
    let pair = session(&app, &member).await;
    let token = member.token.as_str();
    let path = "/api/v1/members/me/password";

    let wrong = app
        .call(
            "PUT",
            path,
            Some(token),
            Some(
                json!({"current_password": "not it at all", "new_password": "brand new password"}),
            ),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert_eq!(wrong.code(), "wrong_password");

    let short = app
        .call(
            "PUT",
            path,
            Some(token),
            Some(json!({"current_password": PASSWORD, "new_password": "short"})),
        )
        .await;
    assert_eq!(short.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(short.body["error"]["fields"]["new_password"].is_string());
    assert_eq!(
        me(&app, &json!(token)).await,
        StatusCode::OK,
        "failures change nothing"
    );

    let changed = app
        .call(
            "PUT",
            path,
            Some(token),
            Some(json!({"current_password": PASSWORD, "new_password": "brand new password"})),
        )
        .await;
    assert_eq!(changed.status, StatusCode::NO_CONTENT, "{:?}", changed.body);

    assert_eq!(me(&app, &json!(token)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        me(&app, &pair["access_token"]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        refresh(&app, &pair["refresh_token"]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        login(&app, &member.email, PASSWORD).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        login(&app, &member.email, "brand new password")
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_lock_the_account_with_429_and_retry_after() {
    let app = TestApp::new().await;
    let member = app.member(Role::Customer).await;
    let other = app.member(Role::Customer).await;
    // The default limit: 5 failures per account per window.
    for _ in 0..5 {
        let wrong = login(&app, &member.email, "not the password").await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    }
    // Now even the right password is refused, before any hashing, until the window ends.
    let locked = login(&app, &member.email, PASSWORD).await;
    assert_eq!(
        locked.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        locked.body
    );
    assert_eq!(locked.code(), "too_many_attempts");
    let retry: u64 = locked.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=301).contains(&retry), "Retry-After {retry}");
    // The same email in other case is the same account.
    let shouting = login(&app, &member.email.to_uppercase(), PASSWORD).await;
    assert_eq!(shouting.status, StatusCode::TOO_MANY_REQUESTS);
    // Another account is not affected.
    session(&app, &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_from_one_address_are_limited_across_accounts() {
    let db = common::TestDb::new().await;
    let server = common::TestServer::start(&db.url, &[("LOGIN_FAILURES_PER_ADDRESS", "3")]).await;
    let member = common::seed_member(&db, Role::Customer).await;
    let http = reqwest::Client::new();
    let attempt = |email: String| {
        let http = http.clone();
        let url = server.url("/api/v1/auth/login");
        async move {
            http.post(url)
                .json(&json!({ "email": email, "password": "guess" }))
                .send()
                .await
                .unwrap()
        }
    };
    // Three accounts guessed once each from 127.0.0.1 (none reaches the per-account limit) ...
    for i in 0..3 {
        let answer = attempt(format!("nobody-{i}@example.test")).await;
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    }
    // ... and the address is locked, for a fourth account too.
    let answer = attempt(member.email.clone()).await;
    assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(answer.headers().contains_key("retry-after"));
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_attempts");
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_hashing_never_runs_past_its_bound() {
    let hashing = shell_api::abuse::hashing();
    let bound = hashing.concurrency();
    // Many sign-ups' worth of hashes at once (each test runs in its own process under nextest, so the peak is
    // this test's).
    let hashes: Vec<_> = (0..4 * bound + 4)
        .map(|i| tokio::spawn(shell_api::auth::hash_password(format!("password {i}"))))
        .collect();
    for hash in hashes {
        assert!(hash.await.unwrap().unwrap().starts_with("$argon2"));
    }
    let (running, peak) = hashing.in_flight();
    assert_eq!(running, 0);
    assert!(peak >= 1);
    assert!(peak <= bound, "{peak} hashes ran at once, bound {bound}");
}
