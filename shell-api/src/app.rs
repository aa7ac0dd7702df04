//! The composition root: the state every handler reaches (`AppState`, `Settings`), the engine's start, the routes
//! of every area merged into one service (`routes`, `app`), and the OpenAPI document merged from every area's `Doc`
//! (`document`). It may import anything; nothing but `lib.rs`, `server.rs` and the commands imports it, except the
//! state types that every handler takes.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, MethodRouter};
use axum::Router;
use deadpool_postgres::Pool;

use anyhow::Context;
use engine::gate::redis::{RedisConn, RedisGate};
use engine::gate::EmbeddedGate;
use engine::payment::SimulatedGateway;
use engine::Engine;

use crate::auth::{MemberCache, TokenKeys};
use crate::drops::hot::App;
use crate::error::ApiError;
use crate::idempotency::IdempotencyStore;
use crate::{
    abuse, admin, campaigns, catalog, config, drops, feeds, guard, live, members, openapi, ops,
    shop, stores, subscriptions,
};

/// Settings the handlers need, resolved from the command line once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub jwt_secret: Vec<u8>,
    pub access_token_seconds: u64,
    pub refresh_token_seconds: u64,
    pub max_body_bytes: usize,
    /// How long a request may take to get its response head (`guard`).
    pub request_timeout: std::time::Duration,
    pub login_limits: abuse::LoginLimits,
    pub live: live::LiveConfig,
    pub campaigns: campaigns::CampaignConfig,
}

impl Settings {
    /// Settings for tests and tools: a fixed secret, the documented defaults.
    pub fn for_tests() -> Self {
        Self {
            jwt_secret: b"flashsale-test-secret".to_vec(),
            access_token_seconds: 900,
            refresh_token_seconds: 1_209_600,
            max_body_bytes: 1_048_576,
            request_timeout: std::time::Duration::from_secs(30),
            login_limits: abuse::LoginLimits::default(),
            live: live::LiveConfig::default(),
            campaigns: campaigns::CampaignConfig::default(),
        }
    }
}

/// Everything a handler can reach. One `Arc`, so the clone axum makes for every request is one atomic increment.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

impl std::ops::Deref for AppState {
    type Target = AppInner;

    fn deref(&self) -> &AppInner {
        &self.0
    }
}

/// What `AppState` shares.
pub struct AppInner {
    pub db: Pool,
    pub settings: Arc<Settings>,
    pub tokens: Arc<TokenKeys>,
    pub members: Arc<MemberCache>,
    pub engine: Arc<Engine>,
    pub idempotency: Arc<IdempotencyStore>,
    /// Set when instances share Redis; `/readyz` checks it.
    pub redis: Option<RedisConn>,
    /// Event streams, their producers and the notifier's subscribers (`live/`).
    pub live: Arc<live::Live>,
    /// Failed logins per account and per address (`abuse`).
    pub login_limiter: abuse::LoginLimiter,
    /// The key admission passes are signed with (`drops::queue`), derived from the JWT secret once here rather than
    /// on every reservation that carries a pass.
    pub admission_key: [u8; 32],
}

impl AppState {
    /// State over a started engine; `redis` is where idempotency records live when instances share Redis.
    pub fn new(db: Pool, settings: Settings, engine: Arc<Engine>, redis: Option<&Redis>) -> Self {
        let tokens = TokenKeys::new(&settings.jwt_secret, settings.access_token_seconds);
        let settings_live = settings.live;
        let admission_key = drops::queue::pass_key(&settings.jwt_secret);
        let login_limits = settings.login_limits;
        let idempotency = match redis {
            Some(redis) => IdempotencyStore::shared(redis.conn.clone(), &redis.key_prefix),
            None => IdempotencyStore::default(),
        };
        Self(Arc::new(AppInner {
            db,
            settings: Arc::new(settings),
            tokens: Arc::new(tokens),
            members: Arc::new(MemberCache::default()),
            engine,
            idempotency: Arc::new(idempotency),
            redis: redis.map(|redis| redis.conn.clone()),
            live: Arc::new(live::Live::new(settings_live)),
            login_limiter: abuse::LoginLimiter::new(login_limits),
            admission_key,
        }))
    }
}

impl AppInner {
    /// Whether the shared Redis answers a PING within `timeout`; `None` without Redis (the embedded gate).
    pub async fn redis_answers(&self, timeout: std::time::Duration) -> Option<bool> {
        let mut redis = self.redis.clone()?;
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut redis);
        Some(matches!(
            tokio::time::timeout(timeout, ping).await,
            Ok(Ok(_))
        ))
    }
}

/// The shared Redis of a multi-instance deployment, as the HTTP layer uses it.
#[derive(Debug, Clone)]
pub struct Redis {
    pub conn: RedisConn,
    pub key_prefix: String,
}

/// A started engine and what the service needs beside it.
#[derive(Debug)]
pub struct Started {
    pub engine: Arc<Engine>,
    pub gateway: Arc<SimulatedGateway>,
    /// Set when Redis is the stock authority.
    pub redis: Option<Redis>,
}

/// Starts the drop engine over `db` with the simulated payment gateway, on the Redis gate when `redis` names a
/// Redis and on the embedded gate otherwise.
pub async fn start_engine(
    db: Pool,
    args: &config::EngineArgs,
    redis: &config::RedisArgs,
    clock: Arc<dyn engine::clock::Clock>,
) -> anyhow::Result<Started> {
    let Some(gate_config) = redis.gate_config() else {
        let gate = Arc::new(EmbeddedGate::new(args.engine_shards));
        let (engine, gateway) = start_engine_with_gate(db, args, gate, clock).await?;
        return Ok(Started {
            engine,
            gateway,
            redis: None,
        });
    };
    let key_prefix = gate_config.key_prefix.clone();
    let gate = RedisGate::connect(gate_config, db.clone())
        .await
        .context("connecting to Redis")?;
    let conn = gate.connection();
    let (engine, gateway) = start_engine_with_gate(db, args, Arc::new(gate), clock).await?;
    Ok(Started {
        engine,
        gateway,
        redis: Some(Redis { conn, key_prefix }),
    })
}

/// Starts the drop engine over `db` with the given stock authority and the simulated payment gateway.
pub async fn start_engine_with_gate(
    db: Pool,
    args: &config::EngineArgs,
    gate: Arc<dyn engine::gate::Gate>,
    clock: Arc<dyn engine::clock::Clock>,
) -> Result<(Arc<Engine>, Arc<SimulatedGateway>), engine::EngineError> {
    let gateway = Arc::new(SimulatedGateway::new(args.gateway_config()));
    if args.simulated_gateway_ledger {
        gateway.use_refund_ledger(Arc::new(GatewayRefundLedger(db.clone())));
    }
    let engine = Engine::start(db, args.engine_config(), gate, gateway.clone(), clock).await?;
    Ok((engine, gateway))
}

/// The simulated gateway's refund idempotency records in Postgres (`SIMULATED_GATEWAY_LEDGER`), so they outlive a
/// killed process as a real gateway's would, and a test counts refunds at the gateway across restarts.
#[derive(Debug)]
struct GatewayRefundLedger(Pool);

#[async_trait::async_trait]
impl engine::payment::RefundLedger for GatewayRefundLedger {
    async fn record(&self, request: &engine::payment::RefundRequest) -> Result<bool, String> {
        let client = self.0.get().await.map_err(|err| err.to_string())?;
        let row = client
            .query_one(
                "INSERT INTO simulated_gateway_refunds AS g (refund_id, charge_key, amount) VALUES ($1, $2, $3)
                 ON CONFLICT (refund_id) DO UPDATE SET calls = g.calls + 1 RETURNING calls",
                &[&request.refund_id, &request.charge_key, &request.amount],
            )
            .await
            .map_err(|err| err.to_string())?;
        Ok(row.get::<_, i32>(0) == 1)
    }
}

/// The service's routes, each path kept beside the router: `tests/openapi.rs` compares them with the OpenAPI
/// document, which axum's `Router` cannot list.
#[derive(Default)]
pub struct Routes {
    router: Router<AppState>,
    paths: Vec<&'static str>,
}

impl Routes {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn route(mut self, path: &'static str, methods: MethodRouter<AppState>) -> Self {
        self.router = self.router.route(path, methods);
        self.paths.push(path);
        self
    }

    pub fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.paths.extend(other.paths);
        self
    }

    /// Every route's path template, as given to `route`.
    pub fn paths(&self) -> &[&'static str] {
        &self.paths
    }
}

/// Every route of the service.
pub fn routes() -> Routes {
    Routes::new()
        .merge(ops::router())
        .route(api!("/openapi.json"), get(openapi_json))
        .route("/docs", get(openapi::docs_page))
        .merge(members::router())
        .merge(catalog::router())
        .merge(stores::router())
        .merge(drops::router())
        .merge(feeds::router())
        .merge(shop::router())
        .merge(subscriptions::router())
        .merge(live::router())
        .merge(campaigns::router())
        .merge(admin::router())
}

/// The whole HTTP service.
pub fn app(state: AppState) -> App {
    app_from(routes(), state)
}

/// The service over the given routes (tests add one to see the OpenAPI coverage check catch it).
pub fn app_from(routes: Routes, state: AppState) -> App {
    let router = routes
        .router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(guard::GuardLayer::new(guard::GuardConfig {
            max_body_bytes: state.settings.max_body_bytes,
            request_timeout: state.settings.request_timeout,
        }))
        .with_state(state.clone());
    App::new(router, state)
}

/// The composition root's own route in the document: the document itself.
#[derive(utoipa::OpenApi)]
#[openapi(paths(openapi_json))]
struct RootDoc;

/// The whole OpenAPI document, assembled where the routes are: the root's routes, then every area's `Doc`.
pub fn document() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi as _;
    openapi::assemble([
        ops::Doc::openapi(),
        RootDoc::openapi(),
        members::Doc::openapi(),
        members::sessions::Doc::openapi(),
        catalog::Doc::openapi(),
        stores::Doc::openapi(),
        drops::Doc::openapi(),
        feeds::Doc::openapi(),
        shop::Doc::openapi(),
        subscriptions::Doc::openapi(),
        live::Doc::openapi(),
        campaigns::Doc::openapi(),
        admin::Doc::openapi(),
    ])
}

/// The OpenAPI 3.1 document of this service.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json",
        body = serde_json::Value)))]
pub async fn openapi_json() -> axum::response::Response {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    openapi::json_response(JSON.get_or_init(|| {
        // A document of plain maps, strings and numbers always serializes.
        serde_json::to_string(&document()).unwrap_or_else(|_| "{}".to_owned())
    }))
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found").with_message("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
