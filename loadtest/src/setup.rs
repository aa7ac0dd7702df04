//! Setting a run up through the API, before anything is measured: the admin promotes a fresh seller, who creates
//! products and drops; members sign up and log in (bounded concurrency: argon2 is the cost) and their tokens are
//! cached for the goose users that act as them. Runs inside goose's `test_start`, whose user records nothing, or
//! before a `rate` run.

use anyhow::{bail, Context};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::{StreamExt, TryStreamExt};
use goose::prelude::GooseUser;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::client::{send_retrying, success, Call, Reply, RetryPolicy, Targets};

pub const API: &str = "/api/v1";
/// Members made by the harness are throwaway; a per-run tag in their emails keeps reruns against one database
/// apart.
pub const MEMBER_PASSWORD: &str = "load-member-password";
pub const PRODUCT_PRICE: i64 = 129_000;

/// A signed-in member, and the instance it signed up on (its home).
#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    pub token: String,
    pub home: usize,
}

/// A short tag unique to this run.
pub fn run_tag() -> String {
    Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Every instance must answer `/healthz`.
pub async fn check_health(user: &mut GooseUser, targets: &Targets) -> anyhow::Result<()> {
    for instance in 0..targets.count() {
        let reply = send_retrying(
            user,
            targets,
            &Call::get("/healthz", "/healthz").on(instance),
            RetryPolicy::OVERLOAD,
            success,
        )
        .await;
        if reply.status != 200 {
            bail!(
                "{} does not answer /healthz (got {})",
                targets.base(instance),
                reply.label()
            );
        }
    }
    Ok(())
}

pub async fn login(
    user: &mut GooseUser,
    targets: &Targets,
    instance: usize,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    let call = Call::post(
        "/auth/login",
        format!("{API}/auth/login"),
        json!({ "email": email, "password": password }),
    )
    .on(instance);
    let reply = send_retrying(user, targets, &call, RetryPolicy::OVERLOAD, success).await;
    expect_field(&reply, 200, "login", "access_token")
}

pub async fn signup(
    user: &mut GooseUser,
    targets: &Targets,
    instance: usize,
    email: &str,
    name: &str,
) -> anyhow::Result<String> {
    let call = Call::post(
        "/members",
        format!("{API}/members"),
        json!({ "email": email, "password": MEMBER_PASSWORD, "name": name }),
    )
    .on(instance);
    let reply = send_retrying(user, targets, &call, RetryPolicy::OVERLOAD, success).await;
    expect_field(&reply, 201, "signup", "id")
}

/// A fresh seller, promoted by the admin; its token.
pub async fn seller(
    user: &mut GooseUser,
    targets: &Targets,
    admin_email: &str,
    admin_password: &str,
    tag: &str,
) -> anyhow::Result<String> {
    let admin = login(user, targets, 0, admin_email, admin_password)
        .await
        .context("admin login (was `flashsale admin create` run with these credentials?)")?;
    let email = format!("seller-{tag}@load.flashsale.local");
    let id = signup(user, targets, 0, &email, "Load seller").await?;
    let call = Call::put(
        "/members/{id}/role",
        format!("{API}/members/{id}/role"),
        Some(json!({ "role": "seller" })),
    )
    .auth(&admin);
    let promoted = send_retrying(user, targets, &call, RetryPolicy::OVERLOAD, success).await;
    expect(&promoted, 200, "promoting the seller")?;
    login(user, targets, 0, &email, MEMBER_PASSWORD).await
}

/// A preorder product of the seller, for a drop; its id.
pub async fn preorder_product(
    user: &mut GooseUser,
    targets: &Targets,
    seller: &str,
    tag: &str,
) -> anyhow::Result<String> {
    let call = Call::post(
        "/products",
        format!("{API}/products"),
        json!({
            "name": format!("Load sneaker {tag}"),
            "description": "flashsale-load drop",
            "price": PRODUCT_PRICE,
            "currency": "KRW",
            "kind": "preorder",
        }),
    )
    .auth(seller);
    let reply = send_retrying(user, targets, &call, RetryPolicy::OVERLOAD, success).await;
    expect_field(&reply, 201, "creating the product", "id")
}

/// Words the catalog's product names are made of, so that searches find something.
pub const CATALOG_WORDS: [&str; 8] = [
    "sneaker", "hoodie", "poster", "vinyl", "ticket", "mug", "cap", "tote",
];

/// `count` regular products of the seller with `stock` units on the shelf each, created in bulk (at most 1000 a
/// call); their ids.
pub async fn catalog(
    user: &mut GooseUser,
    targets: &Targets,
    seller: &str,
    tag: &str,
    count: u32,
    stock: u32,
) -> anyhow::Result<Vec<String>> {
    const BULK_MAX: u32 = 1000;
    let mut ids = Vec::with_capacity(count as usize);
    let mut next = 0;
    while next < count {
        let end = (next + BULK_MAX).min(count);
        let items: Vec<Value> = (next..end)
            .map(|i| {
                let word = CATALOG_WORDS[i as usize % CATALOG_WORDS.len()];
                json!({
                    "name": format!("{word} {i} {tag}"),
                    "description": format!("A {word} for the load test"),
                    "price": 10_000 + i64::from(i % 50) * 1_000,
                    "currency": "KRW",
                    "kind": "regular",
                    "stock": stock,
                })
            })
            .collect();
        let call = Call::post(
            "/products/bulk",
            format!("{API}/products/bulk"),
            json!({ "items": items }),
        )
        .auth(seller);
        let reply = send_retrying(user, targets, &call, RetryPolicy::OVERLOAD, success).await;
        let created = expect(&reply, 201, "creating the catalog")?
            .get("items")
            .and_then(Value::as_array)
            .context("creating the catalog: answer without items")?;
        for item in created {
            ids.push(
                item.get("id")
                    .and_then(Value::as_str)
                    .context("creating the catalog: an item without id")?
                    .to_owned(),
            );
        }
        next = end;
    }
    Ok(ids)
}

/// `count` members, signed up and logged in `concurrency` at a time; member `i` lives on instance `i mod n`.
pub async fn members(
    user: &GooseUser,
    targets: &Targets,
    tag: &str,
    count: u32,
    concurrency: usize,
) -> anyhow::Result<Vec<Member>> {
    futures_util::stream::iter(0..count)
        .map(|i| {
            // Each signup in flight gets its own copy of the user; they share its HTTP client.
            let mut user = user.clone();
            let email = format!("member-{tag}-{i}@load.flashsale.local");
            let home = targets.next(i as usize, 0);
            async move {
                let id = signup(&mut user, targets, home, &email, &format!("Member {i}")).await?;
                let token = login(&mut user, targets, home, &email, MEMBER_PASSWORD).await?;
                anyhow::Ok(Member { id, token, home })
            }
        })
        .buffered(concurrency)
        .try_collect()
        .await
        .context("signing up members")
}

/// A drop of the product opening `opens_in` from now; its id and `opens_at` as the server stored it.
pub async fn create_drop(
    user: &mut GooseUser,
    targets: &Targets,
    seller: &str,
    body: Value,
) -> anyhow::Result<(String, DateTime<Utc>)> {
    let call = Call::post("/drops", format!("{API}/drops"), body).auth(seller);
    let created = send_retrying(user, targets, &call, RetryPolicy::OVERLOAD, success).await;
    let id = expect_field(&created, 201, "creating the drop", "id")?;
    let opens_at = expect_field(&created, 201, "creating the drop", "opens_at")?
        .parse()
        .context("creating the drop: opens_at is not a time")?;
    Ok((id, opens_at))
}

/// An RFC 3339 time with milliseconds, as the API takes it.
pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The body of an answer with the expected status, or an error that shows what came instead.
pub fn expect<'a>(reply: &'a Reply, status: u16, what: &str) -> anyhow::Result<&'a Value> {
    if reply.status == status {
        Ok(&reply.body)
    } else {
        bail!(
            "{what}: expected {status}, got {} {}",
            reply.status,
            reply.body
        )
    }
}

/// A string field of an answer with the expected status.
pub fn expect_field(reply: &Reply, status: u16, what: &str, field: &str) -> anyhow::Result<String> {
    expect(reply, status, what)?
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("{what}: answer without {field}"))
}

/// A progress line on stderr, with the time.
pub fn progress(message: impl std::fmt::Display) {
    eprintln!(
        "flashsale-load: [{}] {message}",
        Utc::now().format("%H:%M:%S%.3f")
    );
}
