//! Shop browsing as a goose scenario, named `browse`: anonymous shoppers page through the product list, search
//! it and open product pages, pausing between clicks. Setup (`test_start`) creates a catalog of regular products
//! whose names are made of a few words (`setup::CATALOG_WORDS`), so that every search finds something.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use goose::prelude::{GooseError, GooseUser, Scenario, Transaction, TransactionFunction};
use rand::Rng;

use crate::client::{send, success, Call, Targets};
use crate::config::{CatalogArgs, TargetArgs};
use crate::setup::{self, progress, API, CATALOG_WORDS};

/// Shelf stock of each browsed product (nobody buys them here).
const CATALOG_STOCK: u32 = 1_000;
/// A shopper's pause between clicks.
const THINK_MIN: Duration = Duration::from_millis(100);
const THINK_MAX: Duration = Duration::from_millis(500);

/// Shared by every shopper and by setup.
#[derive(Debug)]
pub struct Shop {
    args: CatalogArgs,
    target: TargetArgs,
    targets: Arc<Targets>,
    /// The catalog's product ids, once set up.
    products: OnceLock<Vec<String>>,
}

impl Shop {
    pub fn new(args: CatalogArgs, target: TargetArgs, targets: Arc<Targets>) -> Arc<Self> {
        Arc::new(Self {
            args,
            target,
            targets,
            products: OnceLock::new(),
        })
    }

    /// Setup, run from goose's `test_start`: a seller and the catalog.
    pub async fn setup(&self, user: &mut GooseUser) -> anyhow::Result<()> {
        let tag = setup::run_tag();
        progress(format!(
            "browse setup: a catalog of {} products (run tag {tag})",
            self.args.products
        ));
        let seller = setup::seller(
            user,
            &self.targets,
            &self.target.admin_email,
            &self.target.admin_password,
            &tag,
        )
        .await?;
        let ids = setup::catalog(
            user,
            &self.targets,
            &seller,
            &tag,
            self.args.products,
            CATALOG_STOCK,
        )
        .await?;
        anyhow::ensure!(self.products.set(ids).is_ok(), "the shop was set up twice");
        Ok(())
    }

    /// The goose scenario: list (3), search (2), product page (4), by weight.
    pub fn scenario(self: &Arc<Self>) -> Result<Scenario, GooseError> {
        let step = |weight: usize, name: &str, f: fn(Arc<Shop>, &mut GooseUser) -> Call| {
            let shop = Arc::clone(self);
            let function: TransactionFunction = Arc::new(move |user| {
                let shop = Arc::clone(&shop);
                Box::pin(async move {
                    if shop.products.get().is_none() {
                        // Setup failed (it said why, and stopped the run).
                        return Ok(());
                    }
                    let call = f(Arc::clone(&shop), user);
                    send(user, &shop.targets, &call, success).await;
                    Ok(())
                })
            });
            Transaction::new(function).set_name(name).set_weight(weight)
        };
        let scenario = Scenario::new("browse")
            .set_wait_time(THINK_MIN, THINK_MAX)?
            .register_transaction(step(3, "product list", |shop, user| {
                Call::get("/products", format!("{API}/products?kind=regular&limit=20"))
                    .on(shop.instance(user))
            })?)
            .register_transaction(step(2, "search", |shop, user| {
                let word = CATALOG_WORDS[rand::thread_rng().gen_range(0..CATALOG_WORDS.len())];
                Call::get("/products?q=", format!("{API}/products?q={word}&limit=20"))
                    .on(shop.instance(user))
            })?)
            .register_transaction(step(4, "product page", |shop, user| {
                let id = shop.products.get().map_or_else(String::new, |ids| {
                    ids[rand::thread_rng().gen_range(0..ids.len())].clone()
                });
                Call::get("/products/{id}", format!("{API}/products/{id}")).on(shop.instance(user))
            })?);
        Ok(scenario)
    }

    /// Shopper `i` browses instance `i mod n`.
    fn instance(&self, user: &GooseUser) -> usize {
        self.targets.next(user.weighted_users_index, 0)
    }
}
