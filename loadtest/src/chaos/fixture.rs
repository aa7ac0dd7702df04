//! The sale a chaos run sets up through the API before anything is recorded, with the harness's usual set-up
//! helpers (`crate::setup`): the admin promotes a fresh seller, who creates a preorder product and a drop that is
//! already open; the members sign up and log in, spread over the instances.

use std::time::Duration;

use serde_json::json;

use super::world::{World, ADMIN_EMAIL, ADMIN_PASSWORD};
use crate::client::{plain_user, Targets};
use crate::config::ChaosArgs;
use crate::setup::{self, progress, Member};

/// The drop and the members who buy it.
#[derive(Debug)]
pub struct Sale {
    pub drop_id: String,
    pub members: Vec<Member>,
}

/// Longest one set-up call may take (signups queue for argon2 on two cores).
const SETUP_CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn set_up(world: &World, args: &ChaosArgs) -> anyhow::Result<Sale> {
    let bases: Vec<String> = world
        .addrs
        .all()
        .iter()
        .map(|addr| format!("http://{addr}"))
        .collect();
    let targets = Targets::new(bases.clone())?;
    let mut user = plain_user(&bases[0], SETUP_CALL_TIMEOUT)?;
    let tag = setup::run_tag();
    let count = args.member_count();
    progress(format!(
        "chaos: setting up a drop of {} and {count} members (run tag {tag})",
        args.stock
    ));
    let seller = setup::seller(&mut user, &targets, ADMIN_EMAIL, ADMIN_PASSWORD, &tag).await?;
    let product = setup::preorder_product(&mut user, &targets, &seller, &tag).await?;
    let members = setup::members(&user, &targets, &tag, count, args.setup_concurrency).await?;
    let opens_at = chrono::Utc::now() - chrono::Duration::seconds(1);
    let (drop_id, _) = setup::create_drop(
        &mut user,
        &targets,
        &seller,
        json!({
            "product_id": product,
            "stock": args.stock,
            "opens_at": setup::rfc3339(opens_at),
            "per_member_limit": args.per_member_limit,
            "hold_seconds": args.hold_seconds,
        }),
    )
    .await?;
    progress(format!("chaos: drop {drop_id} is open"));
    Ok(Sale { drop_id, members })
}
