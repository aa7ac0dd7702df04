//! Test support shared by the integration tests: a private database per test, the app in-process, a real
//! server on port 0, and members with tokens.
//!
//! Every test gets its own database `fs_test_<uuid>` on the server named by `DATABASE_URL` (default: local
//! Postgres), so tests run in parallel without seeing each other. The database is dropped when the test ends;
//! `scripts/test.sh` sweeps any left behind by a crashed run.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use engine::clock::{Clock, SystemClock};
use engine::payment::SimulatedGateway;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::{DbArgs, EngineArgs};
use shell_api::App;
use shell_api::{app, db, start_engine_with_gate, AppState, Settings};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_postgres::NoTls;
use tower::ServiceExt;
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery";
pub const JWT_SECRET: &str = "flashsale-test-secret";

pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A freshly created, migrated database owned by one test.
pub struct TestDb {
    pub url: String,
    pub name: String,
    pub pool: deadpool_postgres::Pool,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = format!("fs_test_{}", Uuid::new_v4().simple());
        let url = db::with_database(&server_url(), &name);
        let args = DbArgs {
            database_url: url.clone(),
            db_pool_size: 8,
            db_pool_wait_ms: 5000,
        };
        let pool = db::connect(&args).await.expect("test database");
        db::migrate(&pool).await.expect("migrations");
        Self { url, name, pool }
    }

    pub async fn client(&self) -> deadpool_postgres::Object {
        self.pool.get().await.expect("test db connection")
    }

    /// `flashsale admin create` against this database, as the demo does before a load run.
    #[allow(
        dead_code,
        reason = "only the tests that drive the load harness make an admin this way"
    )]
    pub async fn create_admin(&self, email: &str, password: &str) {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
            .args(["admin", "create", "--email", email, "--password", password])
            .env("DATABASE_URL", &self.url)
            .output()
            .await
            .expect("run flashsale admin create");
        assert!(
            output.status.success(),
            "admin create: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.pool.close();
        let admin = db::with_database(&self.url, "postgres");
        let name = self.name.clone();
        // Drop runs inside the test's runtime, so the cleanup gets a runtime of its own on a plain thread.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let config = tokio_postgres::Config::from_str(&admin).expect("admin url");
                if let Ok((client, conn)) = config.connect(NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A member created directly in the database, with a valid access token.
#[derive(Debug, Clone)]
pub struct TestMember {
    pub id: Uuid,
    pub email: String,
    pub token: String,
}

/// The response of an in-process or real request, body parsed as JSON (Null when empty or not JSON).
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    /// The body as text (an HTML page's).
    pub text: String,
}

impl TestResponse {
    /// The `error.code` of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

static PASSWORD_HASH: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn password_hash() -> String {
    PASSWORD_HASH
        .get_or_init(|| async {
            shell_api::auth::hash_password(PASSWORD.to_owned())
                .await
                .expect("hash")
        })
        .await
        .clone()
}

/// The app in-process, over its own database.
pub struct TestApp {
    /// Shared by the instances of a multi-instance test; dropped with the last of them.
    pub db: Arc<TestDb>,
    pub state: AppState,
    pub router: App,
    pub gateway: Arc<SimulatedGateway>,
    args: EngineArgs,
    /// The Redis this instance shares with others, when its gate is the Redis gate.
    pub redis: Option<shell_api::Redis>,
    redis_urls: Vec<String>,
}

/// The Redis the tests use (`REDIS_URL`, default the local one).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses, so tests share one Redis without seeing each other.
pub fn redis_prefix() -> String {
    format!("fs_test_{}:", Uuid::new_v4().simple())
}

/// The Redis gate settings tests run with over `urls` under `prefix`.
pub fn test_redis_args(urls: &[String], prefix: &str) -> shell_api::config::RedisArgs {
    shell_api::config::RedisArgs {
        redis_url: Some(urls.join(",")),
        redis_key_prefix: prefix.to_owned(),
        // Entries a dead (or fake) consumer left pending are claimed quickly, so tests see it happen.
        journal_claim_idle_ms: 300,
        ..shell_api::config::RedisArgs::default()
    }
}

impl TestApp {
    pub async fn new() -> Self {
        Self::with_engine_args(EngineArgs::default()).await
    }

    /// The app with chosen engine settings and the system clock.
    pub async fn with_engine_args(args: EngineArgs) -> Self {
        Self::with_clock(args, Arc::new(SystemClock)).await
    }

    /// The app with chosen engine settings and clock, on the embedded gate.
    pub async fn with_clock(args: EngineArgs, clock: Arc<dyn Clock>) -> Self {
        let gate = Arc::new(engine::gate::EmbeddedGate::new(args.engine_shards));
        Self::build(args, gate, clock).await
    }

    /// The app over a gate of the test's choosing (to make the stock authority slow or unreachable).
    pub async fn with_gate(args: EngineArgs, gate: Arc<dyn engine::gate::Gate>) -> Self {
        Self::build(args, gate, Arc::new(SystemClock)).await
    }

    async fn build(
        args: EngineArgs,
        gate: Arc<dyn engine::gate::Gate>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::over(Arc::new(TestDb::new().await), args, gate, clock, None).await
    }

    /// The app on the Redis gate over a fresh database and a fresh key prefix on `REDIS_URL`.
    pub async fn with_redis(args: EngineArgs) -> Self {
        Self::redis_instance(
            Arc::new(TestDb::new().await),
            args,
            &[redis_url()],
            &redis_prefix(),
        )
        .await
    }

    /// One more instance beside `self`: the same database, the same Redis and key prefix, its own engine, gate and
    /// memory, as another process behind the same load balancer would be.
    pub async fn another_instance(&self) -> Self {
        let redis = self
            .redis
            .as_ref()
            .expect("another_instance needs a Redis-gated app");
        let urls = self.redis_urls.clone();
        Self::redis_instance(
            Arc::clone(&self.db),
            self.args.clone(),
            &urls,
            &redis.key_prefix,
        )
        .await
    }

    /// The app on the Redis gate over a fresh database and key prefix, with the given clock.
    pub async fn with_redis_clock(args: EngineArgs, clock: Arc<dyn Clock>) -> Self {
        Self::redis_instance_with_clock(
            Arc::new(TestDb::new().await),
            args,
            &[redis_url()],
            &redis_prefix(),
            clock,
        )
        .await
    }

    /// `another_instance` with the given clock.
    pub async fn another_instance_with_clock(&self, clock: Arc<dyn Clock>) -> Self {
        let redis = self
            .redis
            .as_ref()
            .expect("another_instance needs a Redis-gated app");
        let urls = self.redis_urls.clone();
        Self::redis_instance_with_clock(
            Arc::clone(&self.db),
            self.args.clone(),
            &urls,
            &redis.key_prefix,
            clock,
        )
        .await
    }

    /// The app on the Redis gate over `urls` (one server, or cluster seeds), under `prefix`.
    pub async fn redis_instance(
        db: Arc<TestDb>,
        args: EngineArgs,
        urls: &[String],
        prefix: &str,
    ) -> Self {
        Self::redis_instance_with_clock(db, args, urls, prefix, Arc::new(SystemClock)).await
    }

    /// `redis_instance` with the given clock (instances of one test share one, as processes share time).
    pub async fn redis_instance_with_clock(
        db: Arc<TestDb>,
        args: EngineArgs,
        urls: &[String],
        prefix: &str,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::redis_instance_with_args(db, args, test_redis_args(urls, prefix), clock).await
    }

    /// The app on the Redis gate configured by `redis_args` (start from `test_redis_args`).
    pub async fn redis_instance_with_args(
        db: Arc<TestDb>,
        args: EngineArgs,
        redis_args: shell_api::config::RedisArgs,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let config = redis_args.gate_config().expect("redis config");
        Self::redis_instance_with_config(db, args, config, clock).await
    }

    /// The app on a Redis gate of exactly `config` (start from `test_redis_args(..).gate_config()`).
    pub async fn redis_instance_with_config(
        db: Arc<TestDb>,
        args: EngineArgs,
        config: engine::gate::redis::RedisGateConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let prefix = config.key_prefix.clone();
        let urls = config.urls.clone();
        let gate = engine::gate::redis::RedisGate::connect(config, db.pool.clone())
            .await
            .expect("redis gate");
        let redis = shell_api::Redis {
            conn: gate.connection(),
            key_prefix: prefix,
        };
        let mut app = Self::over(db, args, Arc::new(gate), clock, Some(redis)).await;
        app.redis_urls = urls;
        app
    }

    async fn over(
        db: Arc<TestDb>,
        args: EngineArgs,
        gate: Arc<dyn engine::gate::Gate>,
        clock: Arc<dyn Clock>,
        redis: Option<shell_api::Redis>,
    ) -> Self {
        let pool = db.pool.clone();
        Self::over_engine_pool(db, pool, args, gate, clock, redis).await
    }

    /// The app on the embedded gate whose engine (its writer, its reads) reaches the database through a pool of
    /// the test's own, such as one through a `TcpProxy` the test can cut; the rest of the app uses `db`'s pool.
    pub async fn with_engine_pool(db: Arc<TestDb>, engine_pool: deadpool_postgres::Pool) -> Self {
        let args = EngineArgs::default();
        let gate = Arc::new(engine::gate::EmbeddedGate::new(args.engine_shards));
        Self::over_engine_pool(db, engine_pool, args, gate, Arc::new(SystemClock), None).await
    }

    async fn over_engine_pool(
        db: Arc<TestDb>,
        engine_pool: deadpool_postgres::Pool,
        args: EngineArgs,
        gate: Arc<dyn engine::gate::Gate>,
        clock: Arc<dyn Clock>,
        redis: Option<shell_api::Redis>,
    ) -> Self {
        let (engine, gateway) = start_engine_with_gate(engine_pool, &args, gate, clock)
            .await
            .expect("engine");
        let state = AppState::new(
            db.pool.clone(),
            Settings::for_tests(),
            engine,
            redis.as_ref(),
        );
        let router = app(state.clone());
        Self {
            db,
            state,
            router,
            gateway,
            args,
            redis,
            redis_urls: Vec::new(),
        }
    }

    /// Stops the engine (draining its writer) and starts a new app on the same database with a fresh embedded gate
    /// and the system clock, as a restarted process would. Tokens stay valid (same secret); in-memory state such
    /// as idempotency records and the simulated gateway's charges is gone.
    /// Another in-process instance on this app's database, with its own embedded gate and the given clock (for
    /// what Postgres alone decides across instances, such as a draw's claim).
    pub async fn sharing_db_with_clock(&self, clock: Arc<dyn Clock>) -> Self {
        let gate = Arc::new(engine::gate::EmbeddedGate::new(self.args.engine_shards));
        Self::over(Arc::clone(&self.db), self.args.clone(), gate, clock, None).await
    }

    pub async fn restart(self) -> Self {
        self.state.engine.shutdown().await;
        let gate = Arc::new(engine::gate::EmbeddedGate::new(self.args.engine_shards));
        Self::over(self.db, self.args, gate, Arc::new(SystemClock), None).await
    }

    /// Sends one request through the router. `body` is sent as JSON when given.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> TestResponse {
        let mut builder = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path);
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => builder
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
            None => builder.body(Body::empty()).unwrap(),
        };
        self.send(request).await
    }

    /// Sends a raw request (for malformed bodies, odd headers).
    pub async fn send(&self, request: Request<Body>) -> TestResponse {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        TestResponse {
            status,
            headers,
            body,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// Inserts a member with `role` and returns it with a fresh access token.
    pub async fn member(&self, role: Role) -> TestMember {
        let id = Uuid::now_v7();
        let email = format!("{}@example.test", id.simple());
        let hash = password_hash().await;
        self.db
            .client()
            .await
            .execute(
                "INSERT INTO members (id, email, password_hash, name, role) VALUES ($1, $2, $3, $4, $5)",
                &[&id, &email, &hash, &"Test Member", &role.as_str()],
            )
            .await
            .expect("insert member");
        let token = self.state.tokens.issue(id, role, 0).expect("token");
        TestMember { id, email, token }
    }
}

/// The real `flashsale` binary serving on a free port, killed when dropped.
pub struct TestServer {
    pub child: tokio::process::Child,
    pub base_url: String,
}

impl TestServer {
    /// Starts `flashsale serve` against `database_url` with extra environment `env`; waits for its
    /// `listening on` line.
    pub async fn start(database_url: &str, env: &[(&str, &str)]) -> Self {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"));
        command
            .arg("serve")
            .env_remove("REDIS_URL")
            .env("DATABASE_URL", database_url)
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("JWT_SECRET", JWT_SECRET)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn flashsale");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base_url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return addr.trim().to_owned();
                }
            }
            panic!("flashsale exited before listening");
        })
        .await
        .expect("server did not start within 60 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, base_url }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// SIGKILL: no graceful shutdown, no drain. Waits until the process is gone.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }

    /// SIGTERM, then waits (up to `timeout`) for a clean exit; returns whether it exited successfully.
    pub async fn terminate(mut self, timeout: Duration) -> bool {
        let pid = self.child.id().expect("pid");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => false,
        }
    }
}

impl TestApp {
    /// Inserts a product owned by `seller` directly and returns its id.
    pub async fn product(&self, seller: &TestMember, price: i64) -> Uuid {
        let id = Uuid::now_v7();
        self.db
            .client()
            .await
            .execute(
                "INSERT INTO products (id, seller_id, name, price, currency, kind) VALUES ($1, $2, $3, $4, 'KRW', 'preorder')",
                &[&id, &seller.id, &"Test sneakers", &price],
            )
            .await
            .expect("insert product");
        id
    }

    /// Creates a drop through the API and returns its JSON (asserting 201).
    pub async fn drop(&self, seller: &TestMember, body: Value) -> Value {
        let response = self
            .call("POST", "/api/v1/drops", Some(&seller.token), Some(body))
            .await;
        assert_eq!(
            response.status,
            StatusCode::CREATED,
            "create drop: {:?}",
            response.body
        );
        response.body
    }

    /// A seller, a product at `price`, and an open drop of `stock` with `extra` fields merged in.
    pub async fn open_drop(&self, stock: u32, price: i64, extra: Value) -> (TestMember, Value) {
        let seller = self.member(Role::Seller).await;
        let product = self.product(&seller, price).await;
        let mut body = serde_json::json!({
            "product_id": product,
            "stock": stock,
            "opens_at": (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339(),
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let drop = self.drop(&seller, body).await;
        (seller, drop)
    }

    /// Sends a request with extra headers.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> TestResponse {
        let mut builder = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .header("authorization", format!("Bearer {token}"));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = match body {
            Some(body) => builder
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
            None => builder.body(Body::empty()).unwrap(),
        };
        self.send(request).await
    }
}

/// Inserts a member straight into `db` and signs a token with the test secret, for tests that talk to a real
/// server (which signs with `JWT_SECRET`).
pub async fn seed_member(db: &TestDb, role: Role) -> TestMember {
    let id = Uuid::now_v7();
    let email = format!("{}@example.test", id.simple());
    db.client()
        .await
        .execute(
            "INSERT INTO members (id, email, password_hash, name, role) VALUES ($1, $2, 'not-a-hash', 'Load Member', $3)",
            &[&id, &email, &role.as_str()],
        )
        .await
        .expect("insert member");
    let keys = shell_api::auth::TokenKeys::new(JWT_SECRET.as_bytes(), 3600);
    let token = keys.issue(id, role, 0).expect("token");
    TestMember { id, email, token }
}

/// Inserts a product owned by `seller` into `db`.
pub async fn seed_product(db: &TestDb, seller: &TestMember, price: i64) -> Uuid {
    let id = Uuid::now_v7();
    db.client()
        .await
        .execute(
            "INSERT INTO products (id, seller_id, name, price, currency, kind) VALUES ($1, $2, 'Drop item', $3, 'KRW', 'preorder')",
            &[&id, &seller.id, &price],
        )
        .await
        .expect("insert product");
    id
}

/// POSTs JSON to a real server; `None` when the request itself failed (e.g. the server was killed).
pub async fn post_json(
    http: &reqwest::Client,
    url: String,
    member: &TestMember,
    body: Value,
) -> Option<(reqwest::StatusCode, Value)> {
    let response = http
        .post(url)
        .bearer_auth(&member.token)
        .json(&body)
        .send()
        .await
        .ok()?;
    let status = response.status();
    Some((status, response.json().await.unwrap_or(Value::Null)))
}

/// `GET /drops/{id}` on a real server, checking conservation on what it serves.
pub async fn live_drop_state(http: &reqwest::Client, base_url: &str, drop: &str) -> Value {
    let body: Value = http
        .get(format!("{base_url}/api/v1/drops/{drop}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let n = |k: &str| body[k].as_u64().unwrap();
    assert_eq!(
        n("available") + n("held") + n("sold"),
        n("stock"),
        "conservation: {body}"
    );
    body
}

/// `(purchase rows, distinct reservations, units)` stored for a drop: equal numbers mean one purchase per paid
/// reservation.
/// The drop's paid units as Postgres counts them (`drops.sold`, the backstop's counter).
pub async fn stored_sold(db: &TestDb, drop: Uuid) -> i32 {
    db.client()
        .await
        .query_one("SELECT sold FROM drops WHERE id = $1", &[&drop])
        .await
        .expect("drops.sold")
        .get(0)
}

pub async fn purchase_tally(db: &TestDb, drop: Uuid) -> (i64, i64, i64) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT count(*), count(DISTINCT reservation_id), COALESCE(sum(quantity), 0)::int8
             FROM purchases WHERE drop_id = $1",
            &[&drop],
        )
        .await
        .expect("purchase tally");
    (row.get(0), row.get(1), row.get(2))
}

// ---- drop routes, in-process

pub async fn reserve(
    app: &TestApp,
    member: &TestMember,
    drop: &Value,
    quantity: i64,
) -> TestResponse {
    let path = format!(
        "/api/v1/drops/{}/reservations",
        drop["id"].as_str().unwrap()
    );
    app.call(
        "POST",
        &path,
        Some(&member.token),
        Some(json!({ "quantity": quantity })),
    )
    .await
}

pub async fn pay(
    app: &TestApp,
    member: &TestMember,
    reservation: &str,
    token: &str,
) -> TestResponse {
    let path = format!("/api/v1/reservations/{reservation}/payment");
    app.call(
        "POST",
        &path,
        Some(&member.token),
        Some(json!({ "payment_token": token })),
    )
    .await
}

/// `GET /reservations/{id}` as `member`.
pub async fn read_reservation(app: &TestApp, member: &TestMember, id: &str) -> TestResponse {
    app.call(
        "GET",
        &format!("/api/v1/reservations/{id}"),
        Some(&member.token),
        None,
    )
    .await
}

/// `DELETE /reservations/{id}` as `member`.
pub async fn cancel(app: &TestApp, member: &TestMember, id: &str) -> TestResponse {
    app.call(
        "DELETE",
        &format!("/api/v1/reservations/{id}"),
        Some(&member.token),
        None,
    )
    .await
}

/// A POST carrying an `Idempotency-Key`.
pub async fn keyed(
    app: &TestApp,
    path: &str,
    member: &TestMember,
    key: &str,
    body: Value,
) -> TestResponse {
    app.call_with(
        "POST",
        path,
        &member.token,
        &[("idempotency-key", key)],
        Some(body),
    )
    .await
}

pub async fn drop_state(app: &TestApp, drop: &Value) -> Value {
    let path = format!("/api/v1/drops/{}", drop["id"].as_str().unwrap());
    let response = app.call("GET", &path, None, None).await;
    assert_eq!(response.status, StatusCode::OK);
    let body = response.body;
    // Conservation, read back where it is served.
    let (stock, available, held, sold) = (
        body["stock"].as_u64().unwrap(),
        body["available"].as_u64().unwrap(),
        body["held"].as_u64().unwrap(),
        body["sold"].as_u64().unwrap(),
    );
    assert_eq!(available + held + sold, stock, "conservation: {body}");
    body
}

pub async fn purchase_rows(app: &TestApp, reservation: &str) -> i64 {
    purchases_of_reservation(&app.db, reservation.parse().unwrap()).await
}

/// How many purchases Postgres has for one reservation.
pub async fn purchases_of_reservation(db: &TestDb, reservation: Uuid) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM purchases WHERE reservation_id = $1",
            &[&reservation],
        )
        .await
        .unwrap()
        .get(0)
}

// ---- processes the fault tests start, stop and kill

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private `redis-server` (from `REDIS_SERVER_BIN`) with append-only persistence in a folder of its own, which a
/// test may stop, kill, restart on the same port and data, or flush.
pub struct RedisServer {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("fs-test-redis-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port: free_port(),
            dir,
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on its port and data folder (AOF replayed), and waits until it answers.
    pub async fn restart(&mut self) {
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (set REDIS_SERVER_BIN)");
        self.child = Some(child);
        let url = self.url();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(client) = redis::Client::open(url.as_str()) {
                    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                        if redis::cmd("PING")
                            .query_async::<String>(&mut conn)
                            .await
                            .is_ok()
                        {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("redis-server did not answer within 10 s");
    }

    /// A clean stop: SHUTDOWN (the AOF is written out), then waits for the process.
    pub async fn stop(&mut self) {
        if let Ok(mut conn) = self.connection().await {
            let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut conn).await;
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url().as_str())?
            .get_multiplexed_async_connection()
            .await
    }

    /// The calls this server has answered, by command (`INFO commandstats`; a script's inner commands count too).
    pub async fn command_calls(&self) -> std::collections::HashMap<String, u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.connection().await.unwrap())
            .await
            .unwrap();
        info.lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
                Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
            })
            .collect()
    }

    /// Pauses every client of this server for `ms` (CLIENT PAUSE ... ALL), so the calls made meanwhile queue up.
    pub async fn pause(&self, ms: u64) {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("ALL")
            .query_async(&mut self.connection().await.unwrap())
            .await
            .unwrap();
    }

    /// Runs `work` and returns with its output the commands clients sent this server meanwhile, by lowercase name,
    /// as MONITOR shows them: round trips, where `command_calls` also counts what scripts call inside.
    pub async fn client_commands_during<F: std::future::Future>(
        &self,
        work: F,
    ) -> (F::Output, std::collections::HashMap<String, u64>) {
        use futures_util::StreamExt;
        let client = redis::Client::open(self.url().as_str()).unwrap();
        let mut lines = client
            .get_async_monitor()
            .await
            .unwrap()
            .into_on_message::<String>();
        let output = work.await;
        // The monitor has seen every command sent before this one once it shows this one.
        let marker = format!("end-of-work-{}", uuid::Uuid::new_v4().simple());
        let _: String = redis::cmd("ECHO")
            .arg(&marker)
            .query_async(&mut self.connection().await.unwrap())
            .await
            .unwrap();
        let mut commands = std::collections::HashMap::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next().await {
                if line.contains(&marker) {
                    return;
                }
                // `<time> [<db> <client address>] "<COMMAND>" ...`, or `[<db> lua]` for a script's own calls.
                let Some((client, command)) = line
                    .split_once('[')
                    .and_then(|(_, rest)| rest.split_once(']'))
                else {
                    continue;
                };
                if client.ends_with(" lua") {
                    continue;
                }
                if let Some(name) = command.split('"').nth(1) {
                    *commands.entry(name.to_lowercase()).or_insert(0) += 1;
                }
            }
            panic!("the monitor stream ended");
        })
        .await
        .expect("the monitor did not show the marker within 10 s");
        (output, commands)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy on a free port in front of `target`, which a test can cut (every connection closed, new ones
/// refused) and restore, to take a dependency away from a server and give it back.
pub struct TcpProxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (up_task, cut_task) = (Arc::clone(&up), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up_task.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let target = target.clone();
                let mut cut = cut_task.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            up,
            cut,
            task,
        }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits (bounded by `limit`) until `check` holds, polling every 20 ms; fails the test with `what` if it never does.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
