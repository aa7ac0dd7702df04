//! Feeds as a goose scenario, named `feed`: signed-in members read the newsfeed (recent and popular), post, like
//! and comment, pausing between clicks. Setup (`test_start`) signs members up and caches their tokens, and a few of
//! them post so that the first readers find something; each goose user acts as member `i mod members` from its
//! `on_start` on. Posts to like and comment on come from a bounded pool of recent post ids.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use goose::prelude::{GooseError, GooseUser, Scenario, Transaction, TransactionFunction};
use rand::Rng;
use serde_json::json;

use crate::client::{send, success, Call, Reply, Targets};
use crate::config::SocialArgs;
use crate::setup::{self, progress, Member, API};

/// A reader's pause between clicks.
const THINK_MIN: Duration = Duration::from_millis(100);
const THINK_MAX: Duration = Duration::from_millis(500);
/// Post ids kept to like and comment on.
const POST_POOL_MAX: usize = 1_000;
/// Members who post during setup.
const SEED_POSTS_MAX: usize = 20;

/// Shared by every reader and by setup.
#[derive(Debug)]
pub struct Social {
    args: SocialArgs,
    targets: Arc<Targets>,
    members: OnceLock<Vec<Member>>,
    posts: Mutex<VecDeque<String>>,
}

/// A reader's member, kept in its session.
#[derive(Debug, Clone)]
struct Reader(usize);

type Step = fn(&Social, &Member, usize, Option<String>) -> Call;

impl Social {
    pub fn new(args: SocialArgs, targets: Arc<Targets>) -> Arc<Self> {
        Arc::new(Self {
            args,
            targets,
            members: OnceLock::new(),
            posts: Mutex::new(VecDeque::with_capacity(POST_POOL_MAX)),
        })
    }

    fn remember(&self, reply: &Reply) {
        if reply.status != 201 {
            return;
        }
        if let Some(id) = reply.str_field("id") {
            // Only pushes and pops run under this lock; a poisoned one still holds usable ids.
            let mut posts = self
                .posts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if posts.len() == POST_POOL_MAX {
                posts.pop_front();
            }
            posts.push_back(id.to_owned());
        }
    }

    fn some_post(&self) -> Option<String> {
        let posts = self
            .posts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if posts.is_empty() {
            return None;
        }
        posts
            .get(rand::thread_rng().gen_range(0..posts.len()))
            .cloned()
    }

    /// Setup, run from goose's `test_start`: members, and a few first posts.
    pub async fn setup(
        &self,
        user: &mut GooseUser,
        setup_concurrency: usize,
    ) -> anyhow::Result<()> {
        let tag = setup::run_tag();
        progress(format!(
            "feed setup: signing up and logging in {} members (run tag {tag})",
            self.args.members
        ));
        let members = setup::members(
            user,
            &self.targets,
            &tag,
            self.args.members,
            setup_concurrency,
        )
        .await?;
        for (i, member) in members.iter().take(SEED_POSTS_MAX).enumerate() {
            let reply = send(user, &self.targets, &post(self, member, i, None), success).await;
            setup::expect(&reply, 201, "a first post")?;
            self.remember(&reply);
        }
        anyhow::ensure!(
            self.members.set(members).is_ok(),
            "the feed was set up twice"
        );
        Ok(())
    }

    /// The goose scenario: recent feed (4), popular feed (2), post (1), like (2), comment (1), by weight.
    #[allow(
        clippy::too_many_lines,
        reason = "a goose scenario is its list of transactions"
    )]
    pub fn scenario(self: &Arc<Self>) -> Result<Scenario, GooseError> {
        let social = Arc::clone(self);
        let claim: TransactionFunction = Arc::new(move |user| {
            let social = Arc::clone(&social);
            Box::pin(async move {
                let count = social.members.get().map_or(0, Vec::len);
                if count > 0 {
                    user.set_session_data(Reader(user.weighted_users_index % count));
                }
                Ok(())
            })
        });
        let step = |weight: usize, name: &str, needs_post: bool, f: Step| {
            let social = Arc::clone(self);
            let function: TransactionFunction = Arc::new(move |user| {
                let social = Arc::clone(&social);
                Box::pin(async move {
                    let (Some(members), Some(Reader(i))) = (
                        social.members.get(),
                        user.get_session_data::<Reader>().cloned(),
                    ) else {
                        // Setup failed (it said why, and stopped the run).
                        return Ok(());
                    };
                    let post_id = social.some_post();
                    if needs_post && post_id.is_none() {
                        return Ok(());
                    }
                    let call = f(&social, &members[i], i, post_id);
                    let reply = send(user, &social.targets, &call, success).await;
                    social.remember_if_post(&call, &reply);
                    Ok(())
                })
            });
            Transaction::new(function).set_name(name).set_weight(weight)
        };
        let scenario = Scenario::new("feed")
            .set_wait_time(THINK_MIN, THINK_MAX)?
            .register_transaction(
                Transaction::new(claim)
                    .set_name("sign in as a member")
                    .set_on_start(),
            )
            .register_transaction(step(4, "recent feed", false, |_, m, _, _| {
                Call::get(
                    "/feed?sort=recent",
                    format!("{API}/feed?scope=all&sort=recent"),
                )
                .auth(&m.token)
                .on(m.home)
            })?)
            .register_transaction(step(2, "popular feed", false, |_, m, _, _| {
                Call::get(
                    "/feed?sort=popular",
                    format!("{API}/feed?scope=all&sort=popular"),
                )
                .auth(&m.token)
                .on(m.home)
            })?)
            .register_transaction(step(1, "post", false, post)?)
            .register_transaction(step(2, "like", true, |_, m, _, post| {
                let post = post.unwrap_or_default();
                Call::put("/posts/{id}/like", format!("{API}/posts/{post}/like"), None)
                    .auth(&m.token)
                    .on(m.home)
            })?)
            .register_transaction(step(1, "comment", true, |_, m, i, post| {
                let post = post.unwrap_or_default();
                Call::post(
                    "/posts/{id}/comments",
                    format!("{API}/posts/{post}/comments"),
                    json!({ "content": format!("A comment from member {i}") }),
                )
                .auth(&m.token)
                .on(m.home)
            })?);
        Ok(scenario)
    }

    fn remember_if_post(&self, call: &Call, reply: &Reply) {
        if call.name() == EP_POST {
            self.remember(reply);
        }
    }
}

const EP_POST: &str = "/posts";

fn post(_: &Social, m: &Member, i: usize, _: Option<String>) -> Call {
    Call::post(
        EP_POST,
        format!("{API}/posts"),
        json!({ "title": format!("Post by member {i}"), "content": "What a drop that was." }),
    )
    .auth(&m.token)
    .on(m.home)
}
