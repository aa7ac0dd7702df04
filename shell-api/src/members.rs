//! Members routes (signup, login, profile, roles) and the `admin create` command.

use anyhow::Context;
use axum::Router;
use uuid::Uuid;

use crate::config::AdminCreateArgs;
use crate::{auth, db, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
}

/// `flashsale admin create`: creates an admin, or promotes the existing member with that email.
pub async fn admin_create(args: AdminCreateArgs) -> anyhow::Result<()> {
    let email = args.email.trim().to_lowercase();
    anyhow::ensure!(email.contains('@'), "--email must be an email address");
    anyhow::ensure!(
        args.password.chars().count() >= 8,
        "--password must have at least 8 characters"
    );
    let pool = db::connect(&args.db).await?;
    db::migrate(&pool).await?;
    let hash = auth::hash_password(args.password)
        .await
        .map_err(|err| anyhow::anyhow!("hashing the password: {err:?}"))?;
    let client = pool.get().await.context("connecting to Postgres")?;
    let row = client
        .query_one(
            "INSERT INTO members (id, email, password_hash, name, role)
             VALUES ($1, $2, $3, $4, 'admin')
             ON CONFLICT (email) DO UPDATE SET role = 'admin', updated_at = now()
             RETURNING id, (xmax = 0) AS created",
            &[&Uuid::now_v7(), &email, &hash, &args.name],
        )
        .await
        .context("creating the admin")?;
    let id: Uuid = row.get(0);
    let created: bool = row.get(1);
    let verb = if created { "created" } else { "promoted" };
    println!("{verb} admin {email} ({id})");
    Ok(())
}
